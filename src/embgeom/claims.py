"""The two papers' claims as explicit rules on one model's layer table.

Each rule reads the rows of one model, stack and view (`layers.csv`), decides a mark
(✔ holds, ✘ does not, "partly": one of its parts holds) and returns the numbers it
was decided on. The rules and their thresholds are stated in `RULES`, which
docs/findings.md prints beside the table, so a reader can redo every mark by hand.

Depth trends are read over the blocks' outputs (layers 1..L): the embedding layer of
a decoder has no context (every type has V = 0), which would make any trend start
from a degenerate point.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

YES, NO, PARTLY, NA = "✔", "✘", "partly", "n/a"

NEAR_ONE = 0.9  # anisotropy "close to 1"
BELL_MARGIN = 0.1  # the middle exceeds both ends by at least this much
LOW = 0.2  # encoder anisotropy "low"
FLAT = 0.1  # encoder anisotropy "flat": max - min over layers
ID_CHANGE = 0.1  # ID "rises" / "falls": by at least 10%
STRONG_R2, WEAK_R2 = 0.5, 0.2  # trade-off strength
TREND_RHO, WEAK_RHO = 0.7, 0.3  # Spearman correlation with depth
Q_CONSTANT = 0.2  # CV of Q across types: "nearly constant"

RULES = {
    "A1": (f"decoder: ✔ if the median anisotropy of the middle layers (depth 0.25–0.75) is ≥ {NEAR_ONE} and "
           f"exceeds the first block's and the last layer's by ≥ {BELL_MARGIN} (a bell near 1); partly if one "
           f"of the two holds. Encoder: ✔ if every layer is ≤ {LOW} (low) and max − min ≤ {FLAT} (flat); "
           "partly if one holds."),
    "A2": (f"✔ if the TwoNN ID of the blocks (layers 1..L) peaks at least {ID_CHANGE:.0%} above the first block "
           f"and the last layer is at least {ID_CHANGE:.0%} below the peak; partly if one holds."),
    "B1": (f"a layer (1..L) trades off strongly if its slope of V on M is < 0 with R² ≥ {STRONG_R2}. ✔ if at "
           f"least half the layers do; partly if one layer does or at least half have slope < 0 with "
           f"R² ≥ {WEAK_R2}."),
    "B2": (f"Spearman ρ of V_within/V against the layer (1..L): ✔ if ρ ≥ {TREND_RHO}, partly if "
           f"{WEAK_RHO} ≤ ρ < {TREND_RHO}, ✘ below (V_between/V = 1 − V_within/V falls exactly as much)."),
    "B3": (f"Spearman ρ of M against the layer (1..L): ✔ if ρ ≥ {TREND_RHO}, partly if "
           f"{WEAK_RHO} ≤ ρ < {TREND_RHO}, ✘ below."),
    "B4": (f"share of layers (1..L) whose CV of Q across types is ≤ {Q_CONSTANT}. Post-LN (Q expected nearly "
           "constant, so V ≈ c − M): ✔ if ≥ 2/3, ✘ if < 1/3. Pre-LN and sandwich norms (the residual stream is "
           "not normalised: Q expected to vary): ✔ if < 1/3, ✘ if ≥ 2/3; partly between."),
}

CLAIMS = {
    "A1": "anisotropy near 1 in a decoder's middle layers, low and flat in an encoder",
    "A2": "intrinsic dimension rises, then falls over depth",
    "B1": "M and V trade off across token types (negative slope, high R²)",
    "B2": "V_within/V rises and V_between/V falls with depth",
    "B3": "M (squared norm of the mean) grows with depth",
    "B4": "post-LN keeps Q per type nearly constant (V ≈ c − M); pre-LN does not",
}


@dataclass
class Verdict:
    """One claim on one model and view: the mark and the numbers behind it."""

    claim: str
    mark: str
    numbers: str
    values: dict = field(default_factory=dict)


def _fmt(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "nan"
    a = abs(x)
    if a != 0 and (a >= 1e4 or a < 1e-2):
        return f"{x:.2g}"
    return f"{x:.3g}" if a >= 10 else f"{x:.2f}"


def _blocks(layers: pd.DataFrame, column: str) -> pd.Series:
    """`column` by layer over layers 1..L, finite values only."""
    df = layers[layers["layer"] >= 1].sort_values("layer")
    s = pd.Series(pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=float), index=df["layer"].to_numpy())
    return s[np.isfinite(s.to_numpy())]


def _mark(a: bool, b: bool) -> str:
    return YES if a and b else PARTLY if a or b else NO


def _missing(claim: str, column: str) -> Verdict:
    return Verdict(claim, NA, f"no finite {column} in this run")


def spearman(x, y) -> float:
    """Spearman rank correlation (ties get their mean rank); NaN if either is constant."""
    rx = pd.Series(np.asarray(x, dtype=float)).rank().to_numpy()
    ry = pd.Series(np.asarray(y, dtype=float)).rank().to_numpy()
    if len(rx) < 3 or rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def anisotropy_profile(layers: pd.DataFrame, kind: str) -> Verdict:
    """A1. `kind`: "decoder" or "encoder" (a model's kind from run.json)."""
    if kind == "encoder":
        full = layers.sort_values("layer")
        a = pd.to_numeric(full["anisotropy"], errors="coerce").dropna()
        if len(a) < 2:
            return _missing("A1", "anisotropy")
        hi, lo = float(a.max()), float(a.min())
        low, flat = hi <= LOW, hi - lo <= FLAT
        return Verdict("A1", _mark(low, flat), f"layers 0–{int(full['layer'].max())}: {_fmt(lo)}–{_fmt(hi)}",
                       dict(max=hi, min=lo, low=low, flat=flat))
    s = _blocks(layers, "anisotropy")
    if len(s) < 3:
        return _missing("A1", "anisotropy")
    n_layers = int(layers["n_layers"].iloc[0])
    middle = s[(s.index / n_layers >= 0.25) & (s.index / n_layers <= 0.75)]
    if middle.empty:
        return _missing("A1", "anisotropy in the middle layers")
    med, first, last = float(middle.median()), float(s.iloc[0]), float(s.iloc[-1])
    near, bell = med >= NEAR_ONE, med >= max(first, last) + BELL_MARGIN
    text = (f"middle (layers {int(middle.index[0])}–{int(middle.index[-1])}) median {_fmt(med)}, range "
            f"{_fmt(float(middle.min()))}–{_fmt(float(middle.max()))}; layer {int(s.index[0])} {_fmt(first)}, "
            f"layer {int(s.index[-1])} {_fmt(last)}")
    return Verdict("A1", _mark(near, bell), text, dict(middle_median=med, first=first, last=last, near_one=near, bell=bell))


def id_hump(layers: pd.DataFrame, column: str = "id_twonn") -> Verdict:
    """A2: ID rises, then falls, over the blocks."""
    s = _blocks(layers, column)
    if len(s) < 3:
        return _missing("A2", column)
    peak_layer = int(s.idxmax())
    peak, first, last = float(s.max()), float(s.iloc[0]), float(s.iloc[-1])
    rise, fall = peak / first - 1 if first > 0 else math.nan, 1 - last / peak if peak > 0 else math.nan
    rises, falls = bool(rise >= ID_CHANGE), bool(fall >= ID_CHANGE)
    text = (f"{_fmt(first)} (layer {int(s.index[0])}) → peak {_fmt(peak)} (layer {peak_layer}) → {_fmt(last)} "
            f"(layer {int(s.index[-1])}): +{rise:.0%}, −{fall:.0%}")
    return Verdict("A2", _mark(rises, falls), text, dict(first=first, peak=peak, peak_layer=peak_layer, last=last,
                                                           rise=rise, fall=fall))


def mv_tradeoff(layers: pd.DataFrame) -> Verdict:
    """B1: negative slope of V on M across types, with its R², layer by layer."""
    df = layers[layers["layer"] >= 1].sort_values("layer")
    slope = pd.to_numeric(df["mv_slope"], errors="coerce").to_numpy(dtype=float)
    r2 = pd.to_numeric(df["mv_r2"], errors="coerce").to_numpy(dtype=float)
    ok = np.isfinite(slope) & np.isfinite(r2)
    if not ok.any():
        return _missing("B1", "mv_slope")
    slope, r2, lay = slope[ok], r2[ok], df["layer"].to_numpy()[ok]
    strong = (slope < 0) & (r2 >= STRONG_R2)
    weak = (slope < 0) & (r2 >= WEAK_R2)
    n = len(slope)
    holds = strong.sum() >= n / 2
    some = strong.any() or weak.sum() >= n / 2
    best = int(np.argmax(np.where(slope < 0, r2, -np.inf))) if (slope < 0).any() else int(np.argmax(r2))
    text = (f"strong in {int(strong.sum())}/{n} layers, R² ≥ {WEAK_R2} in {int(weak.sum())}/{n}; "
            f"layer {int(lay[best])}: slope {_fmt(slope[best])}, "
            f"R² {_fmt(r2[best])}; median slope {_fmt(float(np.median(slope)))}, R² {_fmt(float(np.median(r2)))}")
    mark = YES if holds else PARTLY if some else NO
    return Verdict("B1", mark, text, dict(strong=int(strong.sum()), weak=int(weak.sum()), layers=n,
                                          best_layer=int(lay[best]), best_slope=float(slope[best]),
                                          best_r2=float(r2[best])))


def _trend(claim: str, s: pd.Series, label: str) -> Verdict:
    if len(s) < 3:
        return _missing(claim, label)
    rho = spearman(s.index.to_numpy(), s.to_numpy())
    mark = NO if not math.isfinite(rho) or rho < WEAK_RHO else YES if rho >= TREND_RHO else PARTLY
    lo, hi = int(s.idxmin()), int(s.idxmax())
    text = (f"{label} {_fmt(float(s.iloc[0]))} (layer {int(s.index[0])}) → {_fmt(float(s.iloc[-1]))} "
            f"(layer {int(s.index[-1])}), min {_fmt(float(s.min()))} (layer {lo}), max {_fmt(float(s.max()))} "
            f"(layer {hi}); ρ {_fmt(rho)}")
    return Verdict(claim, mark, text, dict(rho=rho, first=float(s.iloc[0]), last=float(s.iloc[-1])))


def within_share_rises(layers: pd.DataFrame) -> Verdict:
    """B2: V_within/V rises with depth (so V_between/V falls)."""
    df = layers.copy()
    df["within_share"] = pd.to_numeric(df["V_within"], errors="coerce") / pd.to_numeric(df["V"], errors="coerce")
    return _trend("B2", _blocks(df, "within_share"), "V_within/V")


def m_grows(layers: pd.DataFrame) -> Verdict:
    """B3: M grows with depth."""
    return _trend("B3", _blocks(layers, "M"), "M")


def q_constant(layers: pd.DataFrame, norm_placement: str) -> Verdict:
    """B4: where blocks end in a norm (post-LN), Q per type is nearly constant."""
    s = _blocks(layers, "q_cv")
    if s.empty:
        return _missing("B4", "q_cv")
    share = float((s <= Q_CONSTANT).mean())
    post = norm_placement == "post-LN"
    if post:
        mark = YES if share >= 2 / 3 else NO if share < 1 / 3 else PARTLY
    else:
        mark = YES if share < 1 / 3 else NO if share >= 2 / 3 else PARTLY
    text = (f"{norm_placement}: CV of Q ≤ {Q_CONSTANT} in {int((s <= Q_CONSTANT).sum())}/{len(s)} layers "
            f"(median {_fmt(float(s.median()))}, range {_fmt(float(s.min()))}–{_fmt(float(s.max()))})")
    return Verdict("B4", mark, text, dict(share=share, median=float(s.median()), post_ln=post))


def evaluate(layers: pd.DataFrame, kind: str, norm_placement: str) -> list[Verdict]:
    """Every claim on the rows of one model, stack and view."""
    return [anisotropy_profile(layers, kind), id_hump(layers), mv_tradeoff(layers),
            within_share_rises(layers), m_grows(layers), q_constant(layers, norm_placement)]


def claims_table(layers: pd.DataFrame, facts: dict) -> pd.DataFrame:
    """One row per (model, claim): the mark and numbers in each view.

    `layers`: layers.csv of one or more models (one stack each); `facts`: model name ->
    {"kind": ..., "norm_placement": ...} (run.json's "model" entry).
    """
    rows = []
    for model, g in layers.groupby("model", sort=False):
        f = facts[model]
        by_view = {view: evaluate(v, f["kind"], f["norm_placement"]) for view, v in g.groupby("view")}
        for i, claim in enumerate(CLAIMS):
            row = {"claim": claim, "model": model}
            for view in ("all", "inliers"):
                verdict = by_view[view][i] if view in by_view else Verdict(claim, NA, "view not in this run")
                row[f"mark_{view}"], row[f"numbers_{view}"] = verdict.mark, verdict.numbers
            rows.append(row)
    return pd.DataFrame(rows, columns=["claim", "model", "mark_all", "numbers_all", "mark_inliers", "numbers_inliers"])
