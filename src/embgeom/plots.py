"""Figures from result tables: layer profiles against relative depth, runs overlaid."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .results import METRIC_COLUMNS  # noqa: E402

LABELS = {
    "Q": "Q = mean ‖x‖²",
    "M": "M = ‖mean‖²",
    "V": "V = trace of covariance",
    "V_within": "V within token types",
    "V_between": "V between token types",
    "anisotropy": "anisotropy λ₁/Σλ",
    "anisotropy_uncentered": "anisotropy (uncentred)",
    "mean_cosine": "mean cosine",
    "isoscore": "IsoScore",
    "effective_rank": "effective rank",
    "participation_ratio": "participation ratio",
    "mv_slope": "M–V slope",
    "mv_intercept": "M–V intercept",
    "mv_r2": "M–V R²",
    "mv_pearson": "M–V Pearson r",
    "q_cv": "CV of Q across types",
    "n_types": "token types in fit",
    "id_twonn": "ID (TwoNN)",
    "id_twonn_ml": "ID (TwoNN, ML)",
    "id_mle": "ID (MLE, k=20)",
}
LOG_SCALE = {"Q", "M", "V", "V_within", "V_between"}
SKIP = {"id_twonn_ml_low", "id_twonn_ml_high", "id_n"}


def _series(layers: pd.DataFrame):
    keys = ["model", "revision", "stack", "view"]
    df = layers.copy()
    for k in keys:
        if k not in df.columns:
            df[k] = ""
    df["revision"] = df["revision"].fillna("").astype(str)
    for key, group in df.groupby(keys, sort=False, dropna=False):
        model, revision, stack, view = key
        label = str(model)
        if revision:
            label += f"@{revision}"
        label += f" {stack}"
        if view != "all":
            label += f" ({view})"
        yield label, view, group.sort_values("depth")


def plottable_metrics(layers: pd.DataFrame) -> list[str]:
    return [
        c
        for c in METRIC_COLUMNS
        if c in layers.columns and c not in SKIP and pd.to_numeric(layers[c], errors="coerce").notna().any()
    ]


def _draw_metric(ax, layers: pd.DataFrame, metric: str) -> None:
    for label, view, g in _series(layers):
        y = pd.to_numeric(g[metric], errors="coerce").to_numpy(dtype=float)
        if not np.isfinite(y).any():
            continue
        ax.plot(g["depth"], y, marker="o", ms=3, lw=1.4, ls="--" if view != "all" else "-", label=label)
        if metric == "id_twonn_ml" and "id_twonn_ml_low" in g:
            ax.fill_between(g["depth"], g["id_twonn_ml_low"], g["id_twonn_ml_high"], alpha=0.2)
    if metric in LOG_SCALE and (pd.to_numeric(layers[metric], errors="coerce") > 0).all():
        ax.set_yscale("log")
    ax.set_title(LABELS.get(metric, metric), fontsize=10)
    ax.set_xlabel("relative depth (layer / layers)")
    ax.grid(alpha=0.3)


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
    fig.tight_layout(rect=(0, 0.04 + 0.02 * math.ceil(len(labels) / 4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metric(layers: pd.DataFrame, metric: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    _draw_metric(ax, layers, metric)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_runs(results, figdir) -> list[Path]:
    """Every figure for one or several results (Result objects), overlaid."""
    figdir = Path(figdir)
    figdir.mkdir(parents=True, exist_ok=True)
    layers = pd.concat([r.layers for r in results], ignore_index=True)
    written = [plot_profiles(layers, figdir / "layer_profiles.png")]
    for metric in plottable_metrics(layers):
        written.append(plot_metric(layers, metric, figdir / f"profile_{metric}.png"))
    return written
