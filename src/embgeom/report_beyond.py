"""report.md lines for the metrics beyond the two papers (GRIDE's plateau, linear CKA
and linearity, curvature and prompt entropy), read off the tables."""
from __future__ import annotations

import math

import pandas as pd

from .metrics.gride import gride_plateau

PLATEAU_RULE = ("the pair of consecutive scales (n1, 2·n1) whose IDs differ least relative to their mean; "
                "its ID is the mean of the two")


def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def _range(g: pd.DataFrame, col: str) -> str | None:
    s = pd.to_numeric(g[col], errors="coerce")
    s = s[s.notna()]
    if s.empty:
        return None
    lo, hi = s.idxmin(), s.idxmax()
    return (f"{_fmt(s[lo])} (layer {int(g.loc[lo, 'layer'])}) to {_fmt(s[hi])} "
            f"(layer {int(g.loc[hi, 'layer'])})")


def beyond_headlines(g: pd.DataFrame) -> list[str]:
    """Headline bullets of one (model, revision, stack) group of layers.csv."""
    a = g[g["view"] == "all"]
    out = []
    cka, lin = (_range(a, c) if c in a.columns else None for c in ("linear_cka", "linearity"))
    if cka or lin:
        out.append(f"- With the previous layer (all tokens): linear CKA from {cka or '–'}; "
                   f"linearity from {lin or '–'}.")
    curv, ent = (_range(a, c) if c in a.columns else None for c in ("curvature", "prompt_entropy"))
    if curv or ent:
        out.append(f"- Per window (mean over windows): curvature from {curv or '–'} rad; "
                   f"prompt entropy from {ent or '–'} nats.")
    return out


def plateau_table(id_scale: pd.DataFrame | None, model, revision, stack) -> list[str]:
    """A per-layer table of GRIDE's plateau (all tokens) for one group, or nothing."""
    if id_scale is None or not len(id_scale):
        return []
    t = id_scale[(id_scale["model"] == model) & (id_scale["stack"] == stack) & (id_scale["view"] == "all")]
    if "revision" in t.columns:
        t = t[t["revision"].fillna("").astype(str) == str(revision or "")]
    if t.empty:
        return []
    lines = [f"ID across scales (GRIDE, all tokens; plateau: {PLATEAU_RULE}):", "",
             "| | plateau ID | n1 | scale | ID at n1 = 1 | ID at the largest scale |", "|---|---|---|---|---|---|"]
    for layer, g in t.groupby("layer", sort=True):
        g = g.sort_values("n1")
        p = gride_plateau(g)
        n1 = "–" if math.isnan(p["id"]) else f"{p['n1_low']}–{p['n1_high']}"
        scale = "–" if math.isnan(p["id"]) else f"{_fmt(p['scale_low'])}–{_fmt(p['scale_high'])}"
        lines.append(f"| layer {layer} | {_fmt(p['id'])} | {n1} | {scale} | {_fmt(float(g['id'].iloc[0]))} "
                     f"| {_fmt(float(g['id'].iloc[-1]))} |")
    return lines + [""]
