"""Figures from result tables: layer profiles against relative depth, runs overlaid."""
from __future__ import annotations

import math
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ._names import slug  # noqa: E402
from ._png import save_png  # noqa: E402
from ._profiles import LABELS, LOG_SCALE, SKIP, _draw_metric, _series, plottable_metrics  # noqa: E402,F401
from .errors import EmbgeomError  # noqa: E402
from .plots_training import has_dynamics, plot_training  # noqa: E402
from .results import METRIC_COLUMNS, groups_by_run  # noqa: E402

def plot_profiles(layers: pd.DataFrame, path: Path, metrics: list[str] | None = None) -> Path:
    """One panel per metric against relative depth; every (model, stack, view) a line."""
    metrics = metrics or plottable_metrics(layers)
    ncol = min(4, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.3 * nrow), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        _draw_metric(ax, layers, metric)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), frameon=False)
    return save_png(fig, path, rect=(0, 0.04 + 0.02 * math.ceil(len(labels) / 4), 1, 1))


def plot_metric(layers: pd.DataFrame, metric: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    _draw_metric(ax, layers, metric)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def middle_layer(n_layers: int) -> int:
    return n_layers // 2


def types_layer(tokens: pd.DataFrame, n_layers: int, layer: int | None = None) -> int:
    """The layer of the per-type figures: `layer` if given, else of the layers with
    per-type statistics (all, unless --type-layers chose some) the nearest the middle."""
    if layer is not None:
        return layer
    mid = middle_layer(n_layers)
    have = set(int(v) for v in tokens["layer"].unique()) if len(tokens) else set()
    return min(have, key=lambda v: (abs(v - mid), v)) if have else mid


def plot_mv_scatter(tokens: pd.DataFrame, layers: pd.DataFrame, path: Path, layer: int | None = None,
                    min_count: int = 10, max_count: int = 100000) -> Path | None:
    """M(X_t) against V(X_t) per token type at one layer (middle by default), one
    panel per view, with the least-squares line, coloured by log10 n_t."""
    L = int(layers["n_layers"].iloc[0])
    layer = types_layer(tokens, L, layer)
    views = [v for v in ("all", "inliers") if "view" not in tokens.columns or v in set(tokens["view"])]
    fig, axes = plt.subplots(1, len(views), figsize=(5.6 * len(views), 4.6), squeeze=False)
    drawn = False
    for ax, view in zip(axes.flat, views):
        t = tokens[(tokens["layer"] == layer) & (tokens["n"] >= min_count) & (tokens["n"] <= max_count)]
        if "view" in t.columns:
            t = t[t["view"] == view]
        rows = layers[(layers["layer"] == layer) & (layers["view"] == view)]
        if len(t) < 3 or rows.empty:
            ax.axis("off")
            continue
        row = rows.iloc[0]
        sc = ax.scatter(t["M"], t["V"], c=np.log10(t["n"]), s=12, cmap="viridis", alpha=0.8)
        fig.colorbar(sc, ax=ax, label="log10 n_t (occurrences)")
        xs = np.linspace(t["M"].min(), t["M"].max(), 50)
        ax.plot(xs, row["mv_intercept"] + row["mv_slope"] * xs, color="crimson",
                label=f"OLS slope {row['mv_slope']:.3g}, R² {row['mv_r2']:.2f} ({int(row['n_types'])} types)")
        ax.set_xlabel("M(X_t) = ‖mean of type‖²")
        ax.set_ylabel("V(X_t) = variance of type")
        ax.set_title(f"{row['model']} {row['stack']}, layer {layer}/{L}, view {view}", fontsize=10)
        ax.legend(fontsize=8)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    return save_png(fig, path)


def plot_tradeoff_depth(layers: pd.DataFrame, path: Path) -> Path | None:
    metrics = [m for m in ("mv_slope", "mv_r2", "q_cv") if m in plottable_metrics(layers)]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.4 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        _draw_metric(ax, layers, metric)
    axes.flat[0].legend(fontsize=7)
    return save_png(fig, path)


def plot_variance_shares(layers: pd.DataFrame, path: Path, title: str) -> Path | None:
    """Stacked bars per layer: M/Q, V_between/Q and V_within/Q (they add up to 1)."""
    d = layers[layers["view"] == "all"].sort_values("layer")
    if d["V_within"].isna().all():
        return None
    fig, ax = plt.subplots(figsize=(max(5, 0.28 * len(d) + 2), 3.8))
    x = d["layer"].to_numpy()
    parts = [("M", "M/Q (norm of mean)"), ("V_between", "V_between/Q"), ("V_within", "V_within/Q")]
    bottom = np.zeros(len(d))
    for col, label in parts:
        share = (d[col] / d["Q"]).to_numpy()
        ax.bar(x, share, bottom=bottom, label=label, width=0.8)
        bottom += share
    ax.set_xlabel("layer")
    ax.set_ylabel("share of Q")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_png(fig, path)


def plot_within_share(layers: pd.DataFrame, path: Path) -> Path | None:
    d = layers.copy()
    if d["V_within"].isna().all():
        return None
    d["V_within_over_V"] = d["V_within"] / d["V"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, view, g in _series(d[d["view"] == "all"]):
        ax.plot(g["depth"], g["V_within_over_V"], marker="o", ms=3, label=label)
    ax.set_xlabel("relative depth (layer / layers)")
    ax.set_ylabel("V_within / V")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_types_vs_count(tokens: pd.DataFrame, layers: pd.DataFrame, path: Path, layer: int | None = None) -> Path | None:
    L = int(layers["n_layers"].iloc[0])
    layer = types_layer(tokens, L, layer)
    t = tokens[tokens["layer"] == layer]
    if "view" in t.columns:
        t = t[t["view"] == "all"]
    if len(t) < 3:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, col in zip(axes, ("Q", "M", "V")):
        ax.scatter(np.log10(t["n"]), t[col], s=8, alpha=0.5)
        ax.set_xlabel("log10 n_t")
        ax.set_ylabel(f"{col}(X_t)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"token types at layer {layer} of {L}", fontsize=10)
    return save_png(fig, path)


def plot_anisotropy_id(layers: pd.DataFrame, path: Path) -> Path:
    """Paper A's first figure: anisotropy (both views) and intrinsic dimension against depth."""
    has_id = "id_twonn" in plottable_metrics(layers)
    fig, axes = plt.subplots(1, 2 if has_id else 1, figsize=(11 if has_id else 6, 4), squeeze=False)
    _draw_metric(axes[0, 0], layers, "anisotropy")
    axes[0, 0].legend(fontsize=7)
    if has_id:
        _draw_metric(axes[0, 1], layers, "id_twonn")
    return save_png(fig, path)


def plot_spectrum(spectrum: pd.DataFrame, path: Path, title: str) -> Path | None:
    s = spectrum[spectrum["view"] == "all"]
    # Log axes: only positive eigenvalues of layers with some variance (one token, or
    # a zeroed layer, has none: nothing to draw there).
    s = s[s["eigenvalue"] > 0]
    if s.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2))
    layers_ = sorted(s["layer"].unique())
    cmap = plt.get_cmap("viridis")
    for i, layer in enumerate(layers_):
        g = s[s["layer"] == layer].sort_values("rank")
        lam = g["eigenvalue"].to_numpy()
        ax.plot(g["rank"], lam / lam.sum(), color=cmap(i / max(1, len(layers_) - 1)), lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rank")
    ax.set_ylabel("λ_i / Σλ")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(min(layers_), max(layers_)))
    fig.colorbar(sm, ax=ax, label="layer")
    ax.set_title(title, fontsize=10)
    return save_png(fig, path)


def plot_outliers(outliers: pd.DataFrame, n_layers: int, path: Path, title: str, max_positions: int = 64) -> Path | None:
    """Where massive activations sit: count per (layer, position in window), and
    their most frequent tokens."""
    if outliers is None or outliers.empty:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    pos = outliers["position"].clip(upper=max_positions)
    grid = np.zeros((n_layers + 1, max_positions + 1))
    np.add.at(grid, (outliers["layer"].to_numpy(), pos.to_numpy()), 1)
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma_r")
    fig.colorbar(im, ax=ax, label="outlier tokens")
    ax.set_xlabel(f"position in window (≥{max_positions} pooled)")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    top = outliers["token"].astype(str).value_counts().head(12)[::-1]
    ax2.barh([repr(t) for t in top.index], top.to_numpy())
    ax2.set_xlabel("outlier (token, layer) pairs")
    ax2.set_title("most frequent outlier tokens", fontsize=10)
    return save_png(fig, path)


def plot_runs(results, figdir, layer: int | None = None, workers: int | None = None,
              warnings: list | None = None) -> list[Path]:
    """Every figure for one or several results (Result objects), overlaid. `layer`:
    the layer of the per-type figures (default: each model's middle layer).
    `workers`: processes drawing figures at once (default: the usable cores, at most
    4; 1 draws them here). Each figure is independent and matplotlib draws on one
    core, so on Linux forked workers share them out.

    A figure that cannot be drawn (e.g. a log scale with nothing positive to show) is
    skipped: a line saying so is appended to `warnings` (or issued as a Python
    warning when it is None); the other figures are drawn."""
    if layer is not None:
        for r in results:
            for (model, _, stack), g in groups_by_run(r.layers):
                L = int(g["n_layers"].iloc[0])
                if isinstance(layer, bool) or not 0 <= layer <= L:
                    raise EmbgeomError(f"--layer {layer} is not a layer of {model} {stack} (0 to {L}); "
                                       "choose one every model has, or leave it out for each model's middle layer")
    figdir = Path(figdir)
    figdir.mkdir(parents=True, exist_ok=True)
    written, failed = [], []
    for path in _draw_all(figure_tasks(results, figdir, layer), workers):
        if isinstance(path, _Failed):
            failed.append(f"figure {path.name} was not drawn ({path.error}); the tables are complete")
            continue
        written.extend(path if isinstance(path, list) else [path])
    if warnings is not None:
        warnings.extend(failed)
    else:
        import warnings as _py_warnings

        for text in failed:
            _py_warnings.warn(text, RuntimeWarning, stacklevel=2)
    return [w for w in written if w is not None]


def figure_tasks(results, figdir: Path, layer: int | None = None) -> list[tuple]:
    """The figures of `plot_runs` as (function, args, kwargs) tasks, each writing one
    file (the training figures: one task writing several)."""
    layers = pd.concat([r.layers for r in results], ignore_index=True)
    tasks = [(plot_profiles, (layers, figdir / "layer_profiles.png"), {})]
    for metric in plottable_metrics(layers):
        tasks.append((plot_metric, (layers, metric, figdir / f"profile_{metric}.png"), {}))
    tasks.append((plot_anisotropy_id, (layers, figdir / "anisotropy_id.png"), {}))
    tasks.append((plot_tradeoff_depth, (layers, figdir / "tradeoff_depth.png"), {}))
    tasks.append((plot_within_share, (layers, figdir / "within_share.png"), {}))
    for r in results:
        for (model, revision, stack), g in groups_by_run(r.layers):
            tag = slug(model, revision, stack)
            title = f"{model} {stack}" + (f" @{revision}" if revision else "")
            tasks.append((plot_variance_shares, (g, figdir / f"shares_{tag}.png", title), {}))
            if r.tokens is not None and len(r.tokens):
                t = r.tokens[(r.tokens["model"] == model) & (r.tokens["stack"] == stack)]
                if "revision" in t.columns:
                    t = t[t["revision"].fillna("").astype(str) == revision]
                run = r.run or {}
                config = run.get("config") or ((run.get("runs") or [{}])[0] or {}).get("config") or {}
                tasks.append((plot_mv_scatter, (t, g, figdir / f"mv_scatter_{tag}.png"),
                              dict(layer=layer, min_count=int(config.get("min_count", 10)),
                                   max_count=int(config.get("max_count", 100000)))))
                tasks.append((plot_types_vs_count, (t, g, figdir / f"types_vs_count_{tag}.png"), dict(layer=layer)))
            if r.spectrum is not None and len(r.spectrum):
                sp = r.spectrum[(r.spectrum["model"] == model) & (r.spectrum["stack"] == stack)]
                tasks.append((plot_spectrum, (sp, figdir / f"spectrum_{tag}.png", title), {}))
            if r.outliers is not None and len(r.outliers):
                o = r.outliers[(r.outliers["model"] == model) & (r.outliers["stack"] == stack)]
                tasks.append((plot_outliers, (o, int(g["n_layers"].iloc[0]), figdir / f"outliers_{tag}.png", title),
                              {}))

    from .plots_beyond import beyond_tasks  # GRIDE, cross-layer, per-window figures

    tasks += beyond_tasks(results, layers, figdir)
    # ---- geometry over training (checkpoint sweeps, GeometryCallback): see plots_training.py
    if has_dynamics(layers):
        tasks.append((plot_training, (results, figdir), {}))
    return tasks


_TASKS: list = []  # read by forked workers, which inherit it (nothing is pickled but an index)


@dataclass(frozen=True)
class _Failed:
    """A figure task that raised: its file name and the error, one line."""

    name: str
    error: str


def _draw(fn, args, kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - one figure never costs the others or the run
        target = next((a for a in args if isinstance(a, Path) and a.suffix), None)  # the file it writes
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return _Failed(target.name if target is not None else getattr(fn, "__name__", "?"),
                       f"{type(exc).__name__}{': ' + text if text else ''}")
    finally:
        plt.close("all")


def _draw_one(i: int):
    fn, args, kwargs = _TASKS[i]
    return _draw(fn, args, kwargs)


def _default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


def _draw_all(tasks: list, workers: int | None) -> list:
    """Run the figure tasks, in forked worker processes where that helps; results
    in task order. Fork is used only on Linux (macOS's system libraries are not
    fork-safe; spawn would re-import everything, costing more than it saves)."""
    global _TASKS
    workers = _default_workers() if workers is None else max(1, int(workers))
    workers = min(workers, len(tasks))
    if workers < 2 or not sys.platform.startswith("linux"):
        return [_draw(fn, args, kwargs) for fn, args, kwargs in tasks]
    _TASKS = tasks
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return pool.map(_draw_one, range(len(tasks)), chunksize=1)
    finally:
        _TASKS = []
