"""Saving a run: tables, then figures, then report.md; layers.csv last.

The one place that writes a run's output directory (the command line, the demo,
sweeps and GeometryProbe call it). It sits above the tables (results.py), the
figures (plots.py, plots_training.py) and the report (report.py), so none of those
needs to reach up into another: data flows one way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ._lock import holding
from .report import write_report
from .results import Result, combine, prepare_out_dir, write_csv, writing_to


@holding("out", "out")  # a run directory is written by one run at a time
def save_run(result: Result, out, *, figures: bool = True, report: bool = True,
             draw: Callable | None = None, extra_tables: dict | None = None, rewrite: bool = False) -> Path:
    """Write `result` to the directory `out` and return it.

    In order: run.json, layers.parquet, spectrum.parquet, tokens.parquet,
    outliers.csv and `extra_tables` (name -> DataFrame, written as CSV); then, with
    `figures`, `draw(results, out / "figures", warnings=list)` (default: every figure,
    `embgeom.plots.plot_runs`; matplotlib is imported only when figures are drawn);
    then, with `report`, report.md; last, atomically, layers.csv, so a directory that
    has it holds a finished run.

    Parameters
    ----------
    result : the Result to write (`embgeom.analyze`, a sweep, a probe).
    out : the output directory (created; a finished run there is replaced).
    figures, report : draw the figures, write report.md.
    draw : the figure function, called as above (None: `embgeom.plots.plot_runs`).
    extra_tables : more tables, name -> DataFrame, written as CSV.
    rewrite : `out` is rewritten again and again while it may be read (GeometryProbe
        after each measurement): its previous layers.csv stays until the new one
        replaces it, instead of being removed first.

    >>> import tempfile
    >>> from embgeom import analyze, save_run
    >>> from embgeom.packaged import minilm_path
    >>> res = analyze(minilm_path(), ["A short text."], id_sample=0, token_types="none", cross_layer=False)
    >>> out = save_run(res, tempfile.mkdtemp(), figures=False)  # figures=True draws figures/*.png
    >>> [(out / name).exists() for name in ("run.json", "report.md", "layers.csv")]
    [True, True, True]
    """
    out = prepare_out_dir(out, keep_finished=rewrite)
    figdir = out / "figures"
    # A figure or the report that fails is a warning (recorded in run.json, which is
    # written again after them), never a lost run.
    warnings = result.run.setdefault("warnings", [])
    with writing_to(out):
        result.write_tables(out)
        for name, table in (extra_tables or {}).items():
            write_csv(table, out / name)
        if figures:
            if draw is None:
                from .plots import plot_runs as draw
            draw([result], figdir, warnings=warnings)
        if report:
            try:
                write_report(result, out, figdir if figures else None)
            except OSError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported in run.json
                warnings.append(f"report.md was not written ({type(exc).__name__}: {exc}); the tables are complete")
        result.write_run_json(out)
        result.write_layers_csv(out)
    return out


def save_comparison(results: list[Result], out, figures_dir=None, layer: int | None = None,
                    warnings: list | None = None):
    """Several runs side by side: their figures overlaid in `figures_dir` (default:
    `out`) and one report.md in `out` reading them. `layer`: the layer of the
    per-type figures (default: each model's middle layer). A figure that cannot be
    drawn is skipped with a line appended to `warnings`. Returns (figure paths,
    report path)."""
    from .plots import plot_runs

    out = Path(out)
    figures_dir = out if figures_dir is None else Path(figures_dir)
    written = plot_runs(results, figures_dir, layer=layer, warnings=warnings)
    with writing_to(out):
        report = write_report(combine(results), out, figures_dir)
    return written, report

