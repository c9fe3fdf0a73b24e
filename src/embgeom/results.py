"""Result tables: build them from accumulators' numbers, save and load them.

`layers.csv` is written last and atomically, so a directory that has it holds a
finished run; a run that did not finish leaves none.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ._atomic import atomic_writer
from .errors import EmbgeomError

ID_COLUMNS = ["model", "revision", "step", "stack", "layer", "n_layers", "depth", "view", "n_tokens"]
MOMENT_COLUMNS = ["Q", "M", "V", "V_within", "V_between"]
SPECTRUM_COLUMNS = [
    "anisotropy",
    "anisotropy_uncentered",
    "mean_cosine",
    "isoscore",
    "effective_rank",
    "participation_ratio",
]
TRADEOFF_COLUMNS = ["mv_slope", "mv_intercept", "mv_r2", "mv_pearson", "q_cv", "n_types"]
ID_DIM_COLUMNS = ["id_twonn", "id_twonn_ml", "id_twonn_ml_low", "id_twonn_ml_high", "id_mle", "id_n"]
BEYOND_COLUMNS = ["linear_cka", "linearity", "curvature", "prompt_entropy"]
LAYER_COLUMNS = ID_COLUMNS + MOMENT_COLUMNS + SPECTRUM_COLUMNS + TRADEOFF_COLUMNS + ID_DIM_COLUMNS + BEYOND_COLUMNS
METRIC_COLUMNS = MOMENT_COLUMNS + SPECTRUM_COLUMNS + TRADEOFF_COLUMNS + ID_DIM_COLUMNS + BEYOND_COLUMNS
ID_SCALE_COLUMNS = ["model", "revision", "step", "stack", "layer", "view", "n1", "n2", "scale", "id", "id_err"]
SPECTRUM_TABLE_COLUMNS = ["model", "revision", "step", "stack", "layer", "view", "rank", "eigenvalue"]


def layers_frame(rows: list[dict]) -> pd.DataFrame:
    """Long table, one row per (model, revision, step, stack, layer, view); missing
    metrics (of analyses that were not run) are NaN."""
    df = pd.DataFrame(rows)
    for col in LAYER_COLUMNS:
        if col not in df.columns:
            df[col] = float("nan")
    extra = [c for c in df.columns if c not in LAYER_COLUMNS]
    return df[LAYER_COLUMNS + extra]


def id_scale_frame(frames: list) -> pd.DataFrame:
    """id_scale.parquet: GRIDE's ID at every scale, one row per (stack, layer, view,
    n1); the columns of ID_SCALE_COLUMNS even when empty."""
    frames = [f for f in frames if f is not None and len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series([], dtype=float if c in ("scale", "id", "id_err") else object)
                             for c in ID_SCALE_COLUMNS})
    return pd.concat(frames, ignore_index=True)[ID_SCALE_COLUMNS]


def groups_by_run(df: pd.DataFrame, keys=("model", "revision", "stack")):
    """`df` grouped by model, revision and stack (in order of appearance; a missing
    key column counts as "", and so does a missing revision)."""
    df = df.copy()
    for k in keys:
        if k not in df.columns:
            df[k] = ""
    df["revision"] = df["revision"].fillna("").astype(str)
    return df.groupby(list(keys), sort=False, dropna=False)


def empty_tokens_frame() -> pd.DataFrame:
    """The per-type table with no rows (``--token-types none``): same columns and
    dtypes as a filled one, before the model and token texts are added."""
    return pd.DataFrame({
        "stack": pd.Series([], dtype=object), "layer": pd.Series([], dtype="int64"),
        "view": pd.Series([], dtype=object), "token_id": pd.Series([], dtype="int64"),
        "n": pd.Series([], dtype="int64"), "Q": pd.Series([], dtype="float64"),
        "M": pd.Series([], dtype="float64"), "V": pd.Series([], dtype="float64"),
    })


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_writer(path) as fh:
        fh.write(text)


def prepare_out_dir(out) -> Path:
    """Check OUT can hold results; remove a stale layers.csv so an unfinished rerun
    never looks finished."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EmbgeomError(f"--out {out} is a file; name a directory (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".embgeom-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise EmbgeomError(f"cannot write to output directory {out} ({exc.strerror}); choose another --out") from None
    stale = out / "layers.csv"
    if stale.exists():
        stale.unlink()
    return out


@dataclass
class Result:
    """Everything one analysis produced. `layers` has the columns of layers.csv."""

    layers: pd.DataFrame
    spectrum: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SPECTRUM_TABLE_COLUMNS))
    tokens: pd.DataFrame | None = None
    outliers: pd.DataFrame | None = None
    run: dict = field(default_factory=dict)
    id_scale: pd.DataFrame | None = None  # GRIDE's ID against scale (id_scale.parquet)

    def save(self, out, figures: bool = True) -> Path:
        """Write the output directory of SPEC §5; layers.csv last, atomically."""
        out = prepare_out_dir(out)
        try:
            _atomic_write_text(out / "run.json", json.dumps(self.run, indent=2, default=str) + "\n")
            self.layers.to_parquet(out / "layers.parquet", index=False)
            self.spectrum.to_parquet(out / "spectrum.parquet", index=False)
            if self.tokens is not None:
                self.tokens.to_parquet(out / "tokens.parquet", index=False)
            if self.outliers is not None:
                self.outliers.to_csv(out / "outliers.csv", index=False)
            if self.id_scale is not None:
                self.id_scale.to_parquet(out / "id_scale.parquet", index=False)
            if figures:
                from .plots import plot_runs

                plot_runs([self], out / "figures")
            self.write_report(out, out / "figures" if figures else None)
            _atomic_write_text(out / "layers.csv", self.layers.to_csv(index=False))
        except OSError as exc:
            raise EmbgeomError(
                f"writing results to {out} failed ({exc.strerror or exc}); free space or choose another --out"
            ) from None
        return out

    def write_report(self, out, figures_dir=None) -> Path:
        """Write OUT/report.md: the run, headline numbers and per-layer table read
        off the tables, and links to the figures in `figures_dir` (see embgeom.report)."""
        from .report import report_markdown

        path = Path(out) / "report.md"
        _atomic_write_text(path, report_markdown(self, figures_dir, base=Path(out)))
        return path

    @classmethod
    def load(cls, out) -> "Result":
        """Read a finished output directory (one that has layers.csv)."""
        out = Path(out)
        if not (out / "layers.csv").exists():
            raise EmbgeomError(f"{out} holds no finished run (no layers.csv); run `embgeom run ... --out {out}` first")
        layers = pd.read_parquet(out / "layers.parquet") if (out / "layers.parquet").exists() else pd.read_csv(out / "layers.csv")
        spectrum = pd.read_parquet(out / "spectrum.parquet") if (out / "spectrum.parquet").exists() else None
        tokens = pd.read_parquet(out / "tokens.parquet") if (out / "tokens.parquet").exists() else None
        outliers = pd.read_csv(out / "outliers.csv") if (out / "outliers.csv").exists() else None
        run = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
        id_scale = pd.read_parquet(out / "id_scale.parquet") if (out / "id_scale.parquet").exists() else None
        res = cls(layers=layers, tokens=tokens, outliers=outliers, run=run, id_scale=id_scale)
        if spectrum is not None:
            res.spectrum = spectrum
        return res


def combine(results: list["Result"]) -> "Result":
    """One Result for several models or revisions (tables stacked, run.json listing each)."""
    if len(results) == 1:
        return results[0]

    def cat(frames):
        frames = [f for f in frames if f is not None and len(f)]
        return pd.concat(frames, ignore_index=True) if frames else None

    spectrum = cat([r.spectrum for r in results])
    outliers = cat([r.outliers for r in results])
    if outliers is None:  # keep an empty outliers.csv with its columns
        outliers = next((r.outliers for r in results if r.outliers is not None), None)
    merged = Result(
        layers=cat([r.layers for r in results]),
        tokens=cat([r.tokens for r in results]),
        outliers=outliers,
        run={"runs": [r.run for r in results]},
        id_scale=cat([r.id_scale for r in results]),
    )
    if spectrum is not None:
        merged.spectrum = spectrum
    return merged
