"""report.md: a one-page reading of a finished run, written next to its tables.

What was measured (model, corpus, options, time), the headline numbers of each model,
stack and view read off the tables (no new computation), a per-layer table of the
main metrics, and links to the figures. Deterministic: the same Result gives the
same text.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ._atomic import write_text
from .report_beyond import beyond_headlines, plateau_table
from .results import groups_by_run

# Per-layer tables are printed for at most this many (model, revision, stack) groups;
# a longer sweep gets one summary row per group instead.
MAX_LAYER_TABLES = 6

FIGURE_CAPTIONS = [
    ("layer_profiles.png", "every metric against relative depth, runs overlaid"),
    ("anisotropy_id.png", "anisotropy and intrinsic dimension against depth (paper A)"),
    ("tradeoff_depth.png", "norm–variance trade-off across token types against depth (paper B)"),
    ("within_share.png", "share of the variance within token types against depth"),
    ("cross_layer.png", "linear CKA and linearity of each layer with the previous one against depth"),
    ("curvature_entropy.png", "per-window curvature and prompt entropy against depth"),
]


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, (int,)) or (isinstance(x, float) and x.is_integer() and abs(x) < 1e6):
        return f"{int(x):,}"
    return f"{x:.{digits}g}"


def _other_widths(layer_widths: dict | None, width) -> str:
    """' (STACK layer L: W, ...)' for the hidden states whose width is not the model's."""
    odd = [f"{stack} layer {layer}: {w}" for stack, ws in (layer_widths or {}).items()
           for layer, w in enumerate(ws) if w != width]
    return f" ({', '.join(odd)})" if odd else ""


def _runs(run: dict) -> list[dict]:
    return run.get("runs") or [run] if run else []


def _run_section(run: dict) -> list[str]:
    model = run.get("model") or {}
    counts = run.get("counts") or {}
    cfg = run.get("config") or {}
    corpus = run.get("corpus") or {}
    t = run.get("timings_s") or {}
    layers = ", ".join(f"{k} {v}" for k, v in (model.get("n_layers") or {}).items())
    params = model.get("n_parameters")
    rows = [
        ("model", f"`{cfg.get('model', model.get('path', '?'))}`"
                  + (f" @ {cfg['revision']}" if cfg.get("revision") else "")),
        ("architecture", f"{model.get('architecture', '?')} ({model.get('kind', '?')}, "
                         f"{model.get('norm_placement', '?')}), blocks: {layers}, width {model.get('width', '?')}"
                         + _other_widths(model.get("layer_widths"), model.get("width"))
                         + (f", {params / 1e6:.1f}M parameters" if params else "")),
        ("corpus", f"`{corpus.get('path', '?')}` ({corpus.get('format', '?')}): "
                   f"{_fmt(counts.get('documents'))} documents, {_fmt(counts.get('windows'))} windows, "
                   f"{_fmt(counts.get('tokens_counted'))} counted tokens, "
                   f"{_fmt(counts.get('token_types'))} token types, "
                   f"padding {_fmt(100 * counts.get('padding_fraction', math.nan), 2)}%"),
        ("options", f"seq_len {cfg.get('seq_len')}, batch {cfg.get('batch_size')}, dtype {cfg.get('dtype')}, "
                    f"token types `{cfg.get('token_types')}`, "
                    + (f"ID on the first {cfg['id_first']} tokens, " if cfg.get("id_first")
                       else f"ID sample {cfg.get('id_sample')}, ")
                    + f"protocol `{cfg.get('protocol', 'embgeom')}`, "
                    f"outlier factor {cfg.get('outlier_factor')}, trade-off counts "
                    f"{cfg.get('min_count')}–{cfg.get('max_count')}"
                    + (", special tokens excluded" if cfg.get("exclude_special") else "")
                    + (f", positions {cfg['exclude_positions']} excluded" if cfg.get("exclude_positions") else "")),
    ]
    if t:
        rate = counts.get("tokens_counted", 0) / t["stream"] if t.get("stream") else math.nan
        rows.append(("time", f"load {t.get('load', 0):.1f} s, stream {t.get('stream', 0):.1f} s "
                             f"({rate:,.0f} tokens/s), metrics {t.get('metrics', 0):.1f} s, "
                             f"{run.get('processes', 1)} process(es) on {run.get('device', '?')}"))
    if run.get("resumed_from_tokens"):
        rows.append(("resumed", f"from a snapshot at {_fmt(run['resumed_from_tokens'])} tokens"))
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _peak(g: pd.DataFrame, col: str, fn=max):
    s = g[col].dropna()
    if s.empty:
        return None
    value = fn(s)
    layer = int(g.loc[s[s == value].index[0], "layer"])
    return value, layer


def _headlines(g: pd.DataFrame, outliers: pd.DataFrame | None, model: str, stack: str) -> list[str]:
    out = []
    views = {v: gv for v, gv in g.groupby("view")}
    all_v, inl = views.get("all"), views.get("inliers")
    if all_v is not None:
        a = _peak(all_v, "anisotropy")
        if a:
            line = f"- Anisotropy peaks at **{_fmt(a[0])}** (layer {a[1]}) over all tokens"
            b = _peak(inl, "anisotropy") if inl is not None else None
            if b:
                line += f", at **{_fmt(b[0])}** (layer {b[1]}) without the massive-activation tokens"
            out.append(line + ".")
        idc = _peak(all_v, "id_twonn")
        if idc:
            lo = _peak(all_v, "id_twonn", min)
            out.append(f"- Intrinsic dimension (TwoNN, all tokens) ranges from {_fmt(lo[0])} (layer {lo[1]}) "
                       f"to {_fmt(idc[0])} (layer {idc[1]}).")
        within = (all_v["V_within"] / all_v["V"]).dropna()
        if not within.empty:
            first, last = within.index[0], within.index[-1]  # the first and last layers with per-type statistics
            out.append(f"- Variance within token types: {_fmt(100 * within[first], 2)}% of the variance at layer "
                       f"{int(all_v.loc[first, 'layer'])}, {_fmt(100 * within[last], 2)}% at layer "
                       f"{int(all_v.loc[last, 'layer'])}.")
        slope = all_v[["layer", "mv_slope", "mv_r2", "n_types"]].dropna()
        if not slope.empty:
            mid = slope.iloc[len(slope) // 2]
            out.append(f"- Norm–variance trade-off at layer {int(mid['layer'])}: slope {_fmt(mid['mv_slope'])} "
                       f"(R² {_fmt(mid['mv_r2'])}) over {_fmt(mid['n_types'])} token types.")
    if outliers is not None and len(outliers):
        o = outliers[(outliers["model"] == model) & (outliers["stack"] == stack)]
        if len(o):
            first = (o["position"] == 0).mean()
            top = o["token" if "token" in o.columns else "token_id"].astype(str).value_counts().head(3)
            out.append(f"- {_fmt(len(o))} massive activations (norm above the factor × the layer's median) "
                       f"in {o['layer'].nunique()} layers; {_fmt(100 * first, 2)}% at position 0; most often "
                       + ", ".join(f"`{t!r}` ({n})" for t, n in top.items()) + ".")
    return out


def _layer_table(g: pd.DataFrame) -> list[str]:
    wide = g.pivot_table(index="layer", columns="view", values=["anisotropy", "mean_cosine", "effective_rank",
                                                                  "id_twonn", "V_within", "V", "mv_slope"],
                         aggfunc="first", dropna=False)

    def cell(col, view, layer):
        try:
            return wide.loc[layer, (col, view)]
        except KeyError:
            return math.nan

    lines = ["| layer | anisotropy (all / inliers) | mean cosine | effective rank | ID TwoNN | V within / V | M–V slope |",
             "|---|---|---|---|---|---|---|"]
    for layer in wide.index:
        share = cell("V_within", "all", layer) / cell("V", "all", layer) if cell("V", "all", layer) else math.nan
        lines.append(f"| {layer} | {_fmt(cell('anisotropy', 'all', layer))} / {_fmt(cell('anisotropy', 'inliers', layer))} "
                     f"| {_fmt(cell('mean_cosine', 'all', layer))} | {_fmt(cell('effective_rank', 'all', layer))} "
                     f"| {_fmt(cell('id_twonn', 'all', layer))} | {_fmt(share)} | {_fmt(cell('mv_slope', 'all', layer))} |")
    return lines


def _protocol_lines(runs: list[dict]) -> list[str]:
    """One line per distinct protocol among the runs: which one the numbers follow and
    how they differ from the others."""
    from .protocols import describe

    seen = list(dict.fromkeys(describe(run.get("config") or {}) for run in runs if run.get("config")))
    return [*seen, ""] if seen else []


def report_markdown(result, figures_dir: Path | None = None, base: Path | None = None) -> str:
    """The report of `result` (a Result); figure links relative to `base`."""
    layers = result.layers
    names = list(dict.fromkeys(str(m) for m in layers["model"]))
    lines = [f"# embgeom report: {', '.join(names)}", ""]
    lines += ["Read off `layers.csv` (one row per model, stack, layer and view); `view = all` counts every "
              "token, `inliers` leaves out the massive-activation tokens. Column meanings: README.", ""]
    runs = _runs(result.run)
    lines += _protocol_lines(runs)
    groups = [(key, g.sort_values("layer")) for key, g in groups_by_run(layers)]
    few = len(groups) <= MAX_LAYER_TABLES
    for i, run in enumerate(runs if few else runs[:1]):
        label = Path(str((run.get("config") or {}).get("model", ""))).name or f"{i + 1}"
        lines += [f"## Run: {label}", "", *_run_section(run), ""]
    if not few:
        lines += [f"… and {len(runs) - 1} more runs (checkpoints) with the same options; each is in run.json.", ""]
    warned = [(run, w) for run in runs for w in (run.get("warnings") or [])] + \
        ([(result.run, w) for w in result.run.get("warnings") or []] if result.run.get("runs") else [])
    if warned:
        lines += ["## Warnings", "", "What could not be computed or drawn (NaN in the tables; also in run.json):", ""]
        for run, w in warned:
            label = Path(str((run.get("config") or {}).get("model", ""))).name
            lines.append(f"- {label + ': ' if len(runs) > 1 and label else ''}{w}")
        lines.append("")
    if few:
        lines += ["## Headlines", ""]
        for (model, revision, stack), g in groups:
            title = f"{model}" + (f" @ {revision}" if revision else "") + f", {stack}"
            lines += [f"**{title}**", "",
                      *(_headlines(g, result.outliers, model, stack) + beyond_headlines(g)
                        or ["- (no metric to read)"]), ""]
    if few:
        for (model, revision, stack), g in groups:
            lines += [f"## Layers: {model}" + (f" @ {revision}" if revision else "") + f", {stack}", "",
                      *_layer_table(g), "", *plateau_table(getattr(result, "id_scale", None), model, revision, stack)]
    else:
        lines += ["## Checkpoints", "", "| model | revision | step | stack | max anisotropy (all) | "
                  "max anisotropy (inliers) | max ID TwoNN |", "|---|---|---|---|---|---|---|"]
        for (model, revision, stack), g in groups:
            a, i = g[g["view"] == "all"], g[g["view"] == "inliers"]
            step = g["step"].dropna().iloc[0] if "step" in g and g["step"].notna().any() else None
            lines.append(f"| {model} | {revision} | {_fmt(step)} | {stack} | {_fmt(a['anisotropy'].max())} | "
                         f"{_fmt(i['anisotropy'].max())} | {_fmt(a['id_twonn'].max())} |")
        lines.append("")
    if figures_dir is not None and Path(figures_dir).is_dir():
        base = Path(base) if base is not None else Path(figures_dir).parent
        present = {p.name for p in Path(figures_dir).glob("*.png")}
        rel = Path(figures_dir).resolve().relative_to(base.resolve()) if Path(figures_dir).resolve().is_relative_to(
            base.resolve()) else Path(figures_dir)
        shown = [(n, c) for n, c in FIGURE_CAPTIONS if n in present]
        if shown:
            lines += ["## Figures", ""]
            for n, caption in shown:
                lines += [f"![{caption}]({(rel / n).as_posix()})", "", f"*{caption}*", ""]
            others = sorted(present - {n for n, _ in shown})
            if others:
                lines += ["Also in `" + rel.as_posix() + "/`: " + ", ".join(f"`{n}`" for n in others) + ".", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(result, out, figures_dir: Path | None = None) -> Path:
    """Write OUT/report.md for `result` (a Result), linking the figures found in
    `figures_dir` (none when it is None); return its path."""
    path = Path(out) / "report.md"
    return write_text(path, report_markdown(result, figures_dir, base=Path(out)))
