"""Figures of the metrics beyond the two papers: GRIDE's ID against scale, linear CKA
and linearity between consecutive layers, per-window curvature and prompt entropy."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .metrics.gride import gride_plateau
from ._names import slug
from ._png import save_png
from ._profiles import _draw_metric, plottable_metrics
from .results import groups_by_run


def _depth_panels(layers: pd.DataFrame, metrics: list[str], path: Path, ylabels: dict) -> Path | None:
    shown = [m for m in metrics if m in plottable_metrics(layers)]
    if not shown:
        return None
    fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 4), squeeze=False)
    for ax, metric in zip(axes[0], shown):
        _draw_metric(ax, layers, metric)
        ax.set_title(ylabels[metric], fontsize=10)
    axes[0, 0].legend(fontsize=7)
    return save_png(fig, path)


def plot_cross_layer(layers: pd.DataFrame, path: Path) -> Path | None:
    """Linear CKA and linearity of each layer with the previous one, against depth."""
    return _depth_panels(layers, ["linear_cka", "linearity"], path,
                         {"linear_cka": "linear CKA with the previous layer",
                          "linearity": "linearity score (previous layer → this one)"})


def plot_trajectory(layers: pd.DataFrame, path: Path) -> Path | None:
    """Mean per-window curvature and prompt entropy against depth."""
    return _depth_panels(layers, ["curvature", "prompt_entropy"], path,
                         {"curvature": "curvature (mean angle between steps, rad)",
                          "prompt_entropy": "prompt entropy (nats, α = 1)"})


def plot_id_scale(table: pd.DataFrame, path: Path, title: str) -> Path | None:
    """GRIDE's ID against scale (mean distance to the n2-th neighbour), one line per
    layer (all tokens), error bars ±1 s.e., the flattest pair of scales marked."""
    t = table[table["view"] == "all"]
    if t.empty or not np.isfinite(pd.to_numeric(t["id"], errors="coerce")).any():
        return None
    layers = sorted(t["layer"].unique())
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, layer in enumerate(layers):
        g = t[t["layer"] == layer].sort_values("n1")
        color = cmap(i / max(1, len(layers) - 1))
        ax.errorbar(g["scale"], g["id"], yerr=g["id_err"], marker="o", ms=3, lw=1.2, color=color,
                    label=f"layer {layer}", capsize=2)
        p = gride_plateau(g)
        if np.isfinite(p["id"]):
            ax.plot([p["scale_low"], p["scale_high"]], [p["id"], p["id"]], color=color, lw=5, alpha=0.35)
    ax.set_xscale("log")
    ax.set_xlabel("scale: mean distance to the n2-th neighbour (n2 = 2, 4, 8, …)")
    ax.set_ylabel("intrinsic dimension (GRIDE)")
    ax.set_title(f"{title}: ID against scale (band: flattest pair of scales)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_png(fig, path)


def beyond_tasks(results, layers: pd.DataFrame, figdir: Path) -> list[tuple]:
    """The figure tasks of this module, as plots.figure_tasks lists them."""
    tasks = [(plot_cross_layer, (layers, figdir / "cross_layer.png"), {}),
             (plot_trajectory, (layers, figdir / "curvature_entropy.png"), {})]
    for r in results:
        scales = getattr(r, "id_scale", None)
        if scales is None or not len(scales):
            continue
        for (model, revision, stack), g in groups_by_run(scales):
            title = f"{model} {stack}" + (f" @{revision}" if revision else "")
            tasks.append((plot_id_scale, (g, figdir / f"id_scale_{slug(model, revision, stack)}.png", title), {}))
    return tasks
