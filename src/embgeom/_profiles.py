"""Metric-against-depth series, shared by the figures (plots.py, plots_beyond.py):
one line per (model, revision, stack, view), the metrics worth drawing, their labels."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .results import METRIC_COLUMNS, groups_by_run

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
    for key, group in groups_by_run(layers, keys=("model", "revision", "stack", "view")):
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
