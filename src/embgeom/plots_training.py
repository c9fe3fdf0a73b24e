"""Figures of geometry over training: checkpoint sweeps and GeometryCallback runs.

One pair of figures per (model, stack) whose layers carry more than one step:

* `training_heatmaps_<model>_<stack>.png`: layer x step heatmaps of anisotropy (view
  `all` and view `inliers`), TwoNN intrinsic dimension (when measured) and
  V_within / V;
* `training_dynamics_<model>_<stack>.png`: the training loss (when the callback
  recorded one), anisotropy (solid: all tokens, dashed: inliers) and intrinsic
  dimension against step for a few layers.

Steps are columns in order, whatever their spacing (Pythia's checkpoints are
log-spaced early on); line plots switch to a symmetric-log step axis when the steps
span more than two orders of magnitude.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ._names import slug  # noqa: E402
from ._png import save_png  # noqa: E402

HEATMAPS = [  # (column, view, title)
    ("anisotropy", "all", "anisotropy λ₁/Σλ, all tokens"),
    ("anisotropy", "inliers", "anisotropy λ₁/Σλ, inliers"),
    ("id_twonn", "all", "intrinsic dimension (TwoNN)"),
    ("within_share", "all", "V_within / V"),
]


def training_layers(layers: pd.DataFrame) -> pd.DataFrame:
    """The rows that carry a step, with `step` as integers and `within_share` = V_within / V."""
    if "step" not in layers.columns:
        return layers.iloc[0:0]
    d = layers[pd.to_numeric(layers["step"], errors="coerce").notna()].copy()
    d["step"] = pd.to_numeric(d["step"]).astype("int64")
    for col in ("anisotropy", "id_twonn", "V_within", "V", "train_loss"):
        d[col] = pd.to_numeric(d[col], errors="coerce") if col in d.columns else np.nan
    d["within_share"] = d["V_within"] / d["V"]
    if "view" not in d.columns:
        d["view"] = "all"
    return d


def has_dynamics(layers: pd.DataFrame) -> bool:
    """More than one distinct non-null step."""
    return "step" in layers.columns and pd.to_numeric(layers["step"], errors="coerce").dropna().nunique() > 1


def _grid(d: pd.DataFrame, column: str, view: str):
    g = d[d["view"] == view]
    if g.empty or not np.isfinite(g[column].to_numpy(dtype=float)).any():
        return None
    return g.pivot_table(index="layer", columns="step", values=column, aggfunc="mean").sort_index().sort_index(axis=1)


def _step_ticks(ax, steps) -> None:
    n = len(steps)
    every = max(1, int(np.ceil(n / 10)))
    idx = list(range(0, n, every))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    ax.set_xticks(idx)
    ax.set_xticklabels([f"{int(steps[i]):,}" for i in idx], rotation=45, ha="right", fontsize=7)


def plot_heatmaps(d: pd.DataFrame, path: Path, title: str) -> Path | None:
    """Layer x step heatmaps of anisotropy (both views), TwoNN ID and V_within / V."""
    panels = [(col, view, t, _grid(d, col, view)) for col, view, t in HEATMAPS]
    panels = [p for p in panels if p[3] is not None]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (col, view, t, grid) in zip(axes.flat, panels):
        im = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", origin="lower", cmap="viridis",
                       interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        _step_ticks(ax, grid.columns.to_numpy())
        layers = grid.index.to_numpy()
        yt = range(0, len(layers), max(1, int(np.ceil(len(layers) / 12))))
        ax.set_yticks(list(yt))
        ax.set_yticklabels([str(int(layers[i])) for i in yt])
        ax.set_xlabel("training step")
        ax.set_ylabel("layer")
        ax.set_title(t, fontsize=10)
    fig.suptitle(title, fontsize=11)
    return save_png(fig, path)


def pick_layers(n_layers: int, k: int = 5) -> list[int]:
    """A few layers spread over depth: the embeddings, the last block and some between."""
    return sorted({int(round(x)) for x in np.linspace(0, n_layers, min(k, n_layers + 1))})


def _step_axis(ax, steps) -> None:
    steps = np.asarray(sorted(set(int(s) for s in steps)))
    positive = steps[steps > 0]
    if len(positive) and positive.max() / positive.min() > 100:
        ax.set_xscale("symlog", linthresh=float(positive.min()))
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)


def plot_dynamics(d: pd.DataFrame, loss: pd.DataFrame | None, path: Path, title: str, layers=None) -> Path | None:
    """Loss, anisotropy (solid: all, dashed: inliers) and TwoNN ID against step for a few layers."""
    if d.empty:
        return None
    n_layers = int(d["n_layers"].max()) if "n_layers" in d.columns else int(d["layer"].max())
    layers = pick_layers(n_layers) if layers is None else list(layers)
    has_id = np.isfinite(d.loc[d["view"] == "all", "id_twonn"].to_numpy(dtype=float)).any()
    has_loss = loss is not None and len(loss) > 0
    panels = (["loss"] if has_loss else []) + ["anisotropy"] + (["id_twonn"] if has_id else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.9), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, panel in zip(axes.flat, panels):
        if panel == "loss":
            ax.plot(loss["step"], loss["loss"], color="black", lw=1.2)
            ax.set_ylabel("training loss")
            ax.set_title("training loss", fontsize=10)
            _step_axis(ax, d["step"])  # the same step axis as the geometry panels
            continue
        for i, layer in enumerate(layers):
            color = cmap(i / max(1, len(layers) - 1))
            for view, ls in (("all", "-"), ("inliers", "--")):
                if panel == "id_twonn" and view != "all":
                    continue
                g = d[(d["layer"] == layer) & (d["view"] == view)].groupby("step")[panel].mean().sort_index()
                if g.empty or not np.isfinite(g.to_numpy(dtype=float)).any():
                    continue
                ax.plot(g.index, g.to_numpy(), ls=ls, marker="o", ms=2.5, lw=1.3, color=color,
                        label=f"layer {layer}" if view == "all" else None)
        ax.set_title("anisotropy (— all, -- inliers)" if panel == "anisotropy" else "intrinsic dimension (TwoNN)",
                     fontsize=10)
        _step_axis(ax, d["step"])
    axes.flat[panels.index("anisotropy")].legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    return save_png(fig, path)


def _runs(run: dict):
    yield run
    for r in run.get("runs", []) or []:
        if isinstance(r, dict):
            yield from _runs(r)


def loss_curve(results, model: str, d: pd.DataFrame) -> pd.DataFrame | None:
    """(step, loss) of `model`: the full log a GeometryCallback kept in run.json, else
    the `train_loss` column at the measured steps."""
    for r in results:
        for run in _runs(getattr(r, "run", {}) or {}):
            training = run.get("training")
            if isinstance(training, dict) and training.get("model") == model and training.get("log"):
                log = pd.DataFrame(training["log"])
                if {"step", "loss"} <= set(log.columns):
                    log = log[["step", "loss"]].dropna()
                    if len(log):
                        return log.sort_values("step")
    if "train_loss" in d.columns:
        log = d.groupby("step")["train_loss"].first().dropna()
        if len(log):
            return pd.DataFrame({"step": log.index.to_numpy(), "loss": log.to_numpy()})
    return None


def plot_training(results, figdir, warnings: list | None = None) -> list[Path]:
    """Every training-dynamics figure for the results (Result objects) whose layers
    carry more than one step. A figure that cannot be drawn is skipped with a line
    appended to `warnings` (raised when it is None)."""
    figdir = Path(figdir)
    figdir.mkdir(parents=True, exist_ok=True)
    layers = pd.concat([r.layers for r in results], ignore_index=True)
    d = training_layers(layers)
    written = []
    for (model, stack), g in d.groupby(["model", "stack"], sort=False):
        if g["step"].nunique() < 2:
            continue
        tag = slug(model, stack)
        title = f"{model} {stack}: geometry over training"
        for name, draw, args in (("heatmaps", plot_heatmaps, (g,)),
                                 ("dynamics", plot_dynamics, (g, loss_curve(results, model, g)))):
            path = figdir / f"training_{name}_{tag}.png"
            try:
                written.append(draw(*args, path, title))
            except Exception as exc:  # noqa: BLE001 - a figure is never worth the run
                if warnings is None:
                    raise
                warnings.append(f"figure {path.name} was not drawn ({type(exc).__name__}: {exc}); the tables are complete")
    return [w for w in written if w is not None]
