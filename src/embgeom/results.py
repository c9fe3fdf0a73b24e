"""Result tables: build them from accumulators' numbers, save and load them.

Tables only: the figures and report.md are drawn from these tables by the floors
above (embgeom.plots, embgeom.report), and `embgeom.save_run` writes all of them.
`layers.csv` is written last and atomically, so a directory that has it holds a
finished run; a run that did not finish leaves none.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ._atomic import atomic_writer, write_text
from ._lock import holding
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


def prepare_out_dir(out, keep_finished: bool = False) -> Path:
    """Check OUT can hold results (creating it); remove a stale layers.csv so an
    unfinished rerun never looks finished. `keep_finished`: keep it (a directory
    rewritten in place while it is read, where the new layers.csv replaces it)."""
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
    if stale.exists() and not keep_finished:
        stale.unlink()
    return out


@contextmanager
def writing_to(out):
    """Turn a failed write under `out` (disk full, permissions) into an EmbgeomError
    that names the directory and the fix."""
    try:
        yield
    except OSError as exc:
        raise EmbgeomError(
            f"writing results to {out} failed ({exc.strerror or exc}); free space or choose another --out"
        ) from None


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    with atomic_writer(path, binary=True) as fh:
        df.to_parquet(fh, index=False)


def write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_writer(path, newline="") as fh:
        df.to_csv(fh, index=False)


@dataclass
class Result:
    """Everything one analysis produced: tables only (figures and report.md are drawn
    from them by `embgeom.save_run`).

    Parameters
    ----------
    layers : one row per (model, revision, step, stack, layer, view), the columns of
        layers.csv (the README's "Columns").
    spectrum : the covariance eigenvalues of each layer and view (spectrum.parquet).
    tokens : per token type n, Q, M, V (tokens.parquet), or None.
    outliers : the vectors whose norm exceeds the outlier factor (outliers.csv), or None.
    run : run.json's record: versions, options, corpus, counts, timings, warnings.
    id_scale : GRIDE's intrinsic dimension against scale (id_scale.parquet), or None.

    >>> import tempfile
    >>> from embgeom import Result, analyze
    >>> from embgeom.packaged import minilm_path
    >>> res = analyze(minilm_path(), ["A short text."], id_sample=0, token_types="none", cross_layer=False)
    >>> res.layers[["stack", "layer", "view"]].drop_duplicates().shape  # 7 hidden states x 2 views
    (14, 3)
    >>> out = res.save(tempfile.mkdtemp())  # the tables, layers.csv last
    >>> Result.load(out).layers["n_tokens"].tolist() == res.layers["n_tokens"].tolist()
    True
    """

    layers: pd.DataFrame
    spectrum: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SPECTRUM_TABLE_COLUMNS))
    tokens: pd.DataFrame | None = None
    outliers: pd.DataFrame | None = None
    run: dict = field(default_factory=dict)
    id_scale: pd.DataFrame | None = None  # GRIDE's ID against scale (id_scale.parquet)

    @holding("out", "out")  # a run directory is written by one run at a time
    def save(self, out) -> Path:
        """Write the tables and run.json to `out`, layers.csv last (atomically).
        `embgeom.save_run` writes the figures and report.md as well."""
        out = prepare_out_dir(out)
        with writing_to(out):
            self.write_tables(out)
            self.write_layers_csv(out)
        return out

    def write_tables(self, out) -> None:
        """run.json, layers.parquet, spectrum.parquet, tokens.parquet, outliers.csv and
        id_scale.parquet (those present), each atomically; not layers.csv, which marks
        a finished run."""
        out = Path(out)
        self.write_run_json(out)
        write_parquet(self.layers, out / "layers.parquet")
        write_parquet(self.spectrum, out / "spectrum.parquet")
        if self.tokens is not None:
            write_parquet(self.tokens, out / "tokens.parquet")
        if self.outliers is not None:
            write_csv(self.outliers, out / "outliers.csv")
        if self.id_scale is not None:
            write_parquet(self.id_scale, out / "id_scale.parquet")

    def write_run_json(self, out) -> None:
        """run.json, atomically (written again once figures and report have added
        their warnings)."""
        write_text(Path(out) / "run.json", json.dumps(self.run, indent=2, default=str) + "\n")

    def write_layers_csv(self, out) -> Path:
        """layers.csv, atomically: written last, it marks `out` as a finished run."""
        path = Path(out) / "layers.csv"
        write_csv(self.layers, path)
        return path

    @classmethod
    def load(cls, out) -> "Result":
        """Read a finished output directory (one that has layers.csv)."""
        out = Path(out)
        if not (out / "layers.csv").exists():
            raise EmbgeomError(f"{out} holds no finished run (no layers.csv); run `embgeom run ... --out {out}` first")

        def read(name, how):
            # Data-only readers (parquet, CSV, JSON): nothing read back is unpickled or run.
            path = out / name
            if not path.exists():
                return None
            try:
                return how(path)
            except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: one line
                text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                raise EmbgeomError(f"{path} cannot be read as embgeom's {name} ({type(exc).__name__}"
                                   f"{': ' + text if text else ''}); the run in {out} is damaged or not embgeom's: "
                                   f"run `embgeom run ... --out {out}` again") from None

        layers = read("layers.parquet", pd.read_parquet)
        if layers is None:
            layers = read("layers.csv", pd.read_csv)
        missing = [c for c in ("model", "stack", "layer", "n_layers", "view", "n_tokens") if c not in layers.columns]
        if missing:
            raise EmbgeomError(f"{out}/layers.csv is not an embgeom table (no column {', '.join(missing)}); "
                               "name the output directory of `embgeom run`")
        for col in LAYER_COLUMNS:  # a table of an older version lacks some metrics: NaN
            if col not in layers.columns:
                layers[col] = float("nan")
        spectrum = read("spectrum.parquet", pd.read_parquet)
        tokens = read("tokens.parquet", pd.read_parquet)
        outliers = read("outliers.csv", pd.read_csv)
        run = read("run.json", lambda p: json.loads(p.read_text()))
        if not isinstance(run, dict):
            run = {}
        id_scale = read("id_scale.parquet", pd.read_parquet)
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
