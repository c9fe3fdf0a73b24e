"""The end of a run: every layer's metrics into the Result tables (rows, spectra,
per-type tables, ID across scales, outliers), with a warning for each metric that
could not be computed or is undefined."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..progress import layer_progress
from ..results import SPECTRUM_TABLE_COLUMNS, empty_tokens_frame, id_scale_frame, layers_frame
from ..stats.layers import VIEWS, LayerStatistics
from .config import AnalysisConfig


def _guarded(what: str, warnings_: list, fn, *args):
    """fn(*args), or None with a warning when it fails: one metric that cannot be
    computed (a numerical library's error on degenerate data) costs its columns (NaN),
    never the run's tables."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - any failure of one metric, reported
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        warnings_.append(f"{what} failed ({type(exc).__name__}{': ' + text if text else ''}); "
                         "its columns are NaN")
        return None


def _layer_values(acc, cfg: AnalysisConfig, where: str, warnings_: list):
    """(metric values, covariance eigenvalues or None, per-type table or None) of one
    layer's view; a part that fails leaves its columns NaN, with a warning."""
    lam_out: list = []
    values = _guarded(f"{where}: spectrum metrics", warnings_, acc.moments.metrics, lam_out)
    if values is None:  # the moments themselves are plain sums: keep them
        values = {"Q": acc.moments.Q, "M": acc.moments.M, "V": acc.moments.V}
    table = None
    if acc.types is not None:  # --token-types none: those columns stay NaN
        dec = _guarded(f"{where}: per-type decomposition", warnings_, acc.types.decomposition)
        if dec is not None:
            values.update(V_within=dec["V_within"], V_between=dec["V_between"])
        table = _guarded(f"{where}: per-type table", warnings_, acc.types.table)
        if table is not None:
            values.update(_guarded(f"{where}: norm-variance trade-off", warnings_,
                                   lambda: acc.types.tradeoff(min_count=cfg.min_count, max_count=cfg.max_count,
                                                              table=table)) or {})
    return values, (lam_out[0] if lam_out else None), table


def undefined_metric_warnings(layers: pd.DataFrame, id_sample: int) -> list[str]:
    """Warnings for metrics that are NaN because the data leave them undefined: too
    few tokens for a spread, no variance at all (every vector equal, e.g. a zeroed
    final norm), too few distinct vectors for intrinsic dimension."""
    out = []

    def where(mask) -> str:
        sel = layers[mask]
        parts = [f"{stack} {', '.join(str(v) for v in sorted(set(g['layer'].tolist())))}"
                 for stack, g in sel.groupby("stack", sort=False)]
        return "; ".join(parts)

    counted = layers["n_tokens"] > 0
    few = counted & (layers["n_tokens"] < 2)
    if few.any():
        out.append(f"only 1 token counted at layers {where(few)}: anisotropy, isoscore, effective rank, "
                   "participation ratio and mean cosine need at least 2 and are NaN; count more tokens")
    flat = counted & ~few & (layers["V"] == 0)
    if flat.any():
        out.append(f"every counted vector is the same (variance V = 0) at layers {where(flat)}: anisotropy, "
                   "isoscore, effective rank and participation ratio are undefined there (NaN)")
    if id_sample > 0:
        no_id = counted & (layers["id_n"].fillna(0) < 3)
        if no_id.any():
            out.append(f"fewer than 3 distinct sampled vectors at layers {where(no_id)}: intrinsic dimension "
                       "is undefined there (NaN)")
    return out


def _filtered_moments(types, cfg: AnalysisConfig) -> dict:
    """Q, M, V, V_within, V_between over the tokens of the types with min_count ≤ n_t ≤
    max_count (--types-filtered); NaN at a layer that keeps no per-type statistics
    (--type-layers), where they cannot be restricted."""
    nan = float("nan")
    if types is None:
        return dict(Q=nan, M=nan, V=nan, V_within=nan, V_between=nan)
    out = types.pooled(min_count=cfg.min_count, max_count=cfg.max_count)
    return {k: out[k] for k in ("Q", "M", "V", "V_within", "V_between")}


OUTLIER_COLUMNS = ["model", "revision", "stack", "layer", "token_id", "token", "document", "window", "position",
                   "norm", "norm_over_median"]


def outlier_table(records: list, tokenizer, model: str, revision: str) -> pd.DataFrame:
    """outliers.csv: one row per (outlier token, layer)."""
    if not records:
        return pd.DataFrame(columns=OUTLIER_COLUMNS)
    frames = []
    for r in records:
        n = len(r["norm"])
        frames.append(pd.DataFrame({
            "stack": [r["stack"]] * n, "layer": r["layer"], "token_id": r["token_id"].numpy(),
            "document": r["document"].numpy(), "window": r["window"].numpy(), "position": r["position"].numpy(),
            "norm": r["norm"].numpy(), "norm_over_median": r["norm"].numpy() / r["median"],
        }))
    df = pd.concat(frames, ignore_index=True)
    df.insert(0, "revision", revision)
    df.insert(0, "model", model)
    ids = df["token_id"].to_numpy()
    uniq = np.unique(ids)
    texts = dict(zip(uniq.tolist(), tokenizer.convert_ids_to_tokens(uniq.tolist())))
    df.insert(df.columns.get_loc("token_id") + 1, "token", [texts[i] for i in ids.tolist()])
    return df.sort_values(["stack", "layer", "window", "position"], ignore_index=True)[OUTLIER_COLUMNS]


@dataclass
class Frames:
    """The tables' pieces as the layers are read: layer rows, spectra, per-type
    tables, ID across scales, and what could not be computed."""

    rows: list = field(default_factory=list)
    spectrum: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    scales: list = field(default_factory=list)
    warnings: list = field(default_factory=list)  # in run.json and report.md


def _views_of_layer(stats: LayerStatistics, cfg: AnalysisConfig, stack: str, layer: int, warnings_: list) -> dict:
    """{view: (n, metric values, eigenvalues, per-type table)} of one layer."""
    # Inliers first: then 'all' merges the few outliers into the inliers'
    # own accumulators (no copy of the per-type table), and a layer
    # without outliers computes everything once for both views.
    per_view, done = {}, None
    for view in ("inliers", "all"):
        acc = stats.view(view, stack, layer, in_place=True)
        n = acc.moments.n
        if n == 0:
            per_view[view] = (n, None, None, None)
        elif done is not None and n == done[0]:
            per_view[view] = (n, done[1], done[2], None if done[3] is None else done[3].copy())
        else:
            where = f"{stack} layer {layer} ({view})"
            done = per_view[view] = (n, *_layer_values(acc, cfg, where, warnings_))
            if cfg.types_filtered:  # paper B: over the tokens of the fitted types only
                done[1].update(_filtered_moments(acc.types, cfg))
    return per_view


def _add_view(frames: Frames, stats: LayerStatistics, cfg: AnalysisConfig, ident: dict, L: int, view: str,
              cross: dict, measured: tuple) -> None:
    """One view of one layer into the tables: its row, spectrum, per-type table and
    ID across scales."""
    stack, layer = ident["stack"], ident["layer"]
    warnings_ = frames.warnings
    n, values, lam, table = measured
    row = dict(ident, n_layers=L, depth=layer / L, view=view, n_tokens=n)
    if n == 0:
        frames.rows.append(row)
        return
    row.update(values)
    row.update(cross.get(layer, {}).get(view, {}))
    row.update(stats.window_means(stack, layer, view))
    if cfg.id_points > 0:
        row.update(_guarded(f"{stack} layer {layer} ({view}): intrinsic dimension", warnings_,
                            lambda: stats.intrinsic_dimension(
                                stack, layer, view, discard_fraction=cfg.twonn_discard,
                                duplicates=cfg.twonn_duplicates, shared_rank=cfg.gride_max_rank)) or {})
        if cfg.gride_max_rank:
            scales = _guarded(f"{stack} layer {layer} ({view}): ID across scales", warnings_,
                              stats.id_scales, stack, layer, view, cfg.gride_max_rank)
            if scales is not None:
                frames.scales.append(scales.assign(**ident, view=view))
    frames.rows.append(row)
    if lam is not None:
        frames.spectrum.append(pd.DataFrame(dict(ident, view=view, rank=np.arange(1, len(lam) + 1),
                                                 eigenvalue=lam)))
    if table is not None:
        table.insert(0, "view", view)
        table.insert(0, "layer", layer)
        table.insert(0, "stack", stack)
        frames.tokens.append(table)


def layer_frames(stats: LayerStatistics, n_layers: dict, cfg: AnalysisConfig, *, name: str, rev: str, step,
                 progress: bool, description: str) -> Frames:
    """Every layer's metrics, both views, read off `stats` (whose views are merged
    in place on the way)."""
    frames = Frames()
    n_layer_rows = sum(L + 1 for L in n_layers.values())
    with layer_progress(n_layer_rows, enabled=progress, description=description) as advance_layer:
        for stack, L in n_layers.items():
            cross = _guarded(f"{stack}: cross-layer CKA and linearity", frames.warnings, stats.cross_layer_metrics,
                             stack) or {}  # before the views are merged in place
            for layer in range(L + 1):
                per_view = _views_of_layer(stats, cfg, stack, layer, frames.warnings)
                for view in VIEWS:
                    ident = dict(model=name, revision=rev, step=step, stack=stack, layer=layer)
                    _add_view(frames, stats, cfg, ident, L, view, cross, per_view[view])
                advance_layer(1)
    return frames


def result_tables(frames: Frames, cfg: AnalysisConfig, type_text, *, name: str, rev: str, step) -> tuple:
    """(layers, spectrum, tokens, id_scale) tables from the frames; adds the warnings
    for metrics the data leave undefined."""
    layers = layers_frame(frames.rows)
    frames.warnings += undefined_metric_warnings(layers, cfg.id_points)
    spectrum = (pd.concat(frames.spectrum, ignore_index=True) if frames.spectrum
                else pd.DataFrame(columns=SPECTRUM_TABLE_COLUMNS))
    tokens = pd.concat(frames.tokens, ignore_index=True) if frames.tokens else empty_tokens_frame()
    if type_text is not None:
        tokens.insert(2, "token", type_text(tokens["token_id"].to_numpy()))
    else:
        tokens.insert(2, "token", pd.Series([], dtype=object))
    for col, value in (("step", step), ("revision", rev), ("model", name)):
        tokens.insert(0, col, value)
    return layers, spectrum, tokens, id_scale_frame(frames.scales)


def run_tables(stats: LayerStatistics, n_layers: dict, cfg: AnalysisConfig, type_text, tokenizer, *, name: str,
               rev: str, step, progress: bool, description: str) -> tuple[dict, list]:
    """(the Result's tables by field name, the metrics' warnings) read off the merged
    `stats`."""
    frames = layer_frames(stats, n_layers, cfg, name=name, rev=rev, step=step, progress=progress,
                          description=description)
    layers, spectrum, tokens, id_scale = result_tables(frames, cfg, type_text, name=name, rev=rev, step=step)
    outliers = outlier_table(stats.outlier_records(), tokenizer, name, rev)
    tables = dict(layers=layers, spectrum=spectrum, tokens=tokens, outliers=outliers, id_scale=id_scale)
    return tables, frames.warnings
