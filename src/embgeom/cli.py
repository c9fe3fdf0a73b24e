"""The command line: `embgeom run`, `embgeom plot`, `embgeom demo`.

Bad input (an EmbgeomError) becomes one line on stderr and exit status 2.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import EmbgeomError
from .options import AnalysisConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Exact, streaming geometry of transformer hidden states, layer by layer.",
)


def _say(msg: str) -> None:
    typer.echo(msg, err=True)


_HELD: list = []  # directories this command locked, released when it returns


def _hold(out: Path) -> None:
    """Lock OUT for the rest of the command (rank 0 for a torchrun job)."""
    from ._lock import acquire

    _HELD.append(acquire(out, "--out"))


def _with_analysis_options(command):
    """`command`'s signature extended, after its `step` parameter, by one option per
    AnalysisConfig field (flag, type, default and help read from the field), which
    typer reads as if they were written in the `def`. The command receives them in
    `**analysis`, as the command line gave them (see `_analysis_options`)."""
    import inspect
    import typing

    from .options import flag, options

    hints = typing.get_type_hints(AnalysisConfig)
    extra = []
    for f in options():
        if f.metadata["repeat"]:
            kind, default = List[int], []
        elif f.metadata["preset"]:  # None: not given, so that --protocol fills it
            kind, default = Optional[hints[f.name]], None
        else:
            kind, default = hints[f.name], f.default
        info = typer.Option(default, flag(f), help=f.metadata["help"])
        extra.append(inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=info, annotation=kind))
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.kind != p.VAR_KEYWORD]
    cut = [p.name for p in own].index("step") + 1
    params = own[:cut] + extra + own[cut:]
    command.__signature__ = inspect.Signature(params, return_annotation=None)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def _analysis_options(given: dict) -> dict:
    """analyze()'s options from the command line's values: repeated flags as tuples
    (--type-layers: None when not given), and the options a protocol sets only when
    given, so that the preset fills in the others."""
    from .options import options

    out = {}
    for f in options():
        value = given[f.name]
        if f.metadata["repeat"]:
            value = tuple(value) or f.default
        elif f.metadata["preset"] and value is None:
            continue
        out[f.name] = value
    return out


@app.command()
@_with_analysis_options
def run(
    models: List[str] = typer.Argument(..., metavar="MODEL...", help="Model directory, .gguf file or Hub id."),
    corpus: Path = typer.Option(..., "--corpus", help=".txt (one document per line), .jsonl, .csv, .parquet, or a datasets directory."),
    out: Path = typer.Option(..., "--out", help="Output directory (created if missing)."),
    revision: List[str] = typer.Option([], "--revision", help="Hub revision; repeat for several checkpoints (a training directory: checkpoint folder names)."),
    step: List[int] = typer.Option([], "--step", help="Training step of each checkpoint, in the order named (default: parsed from stepN, global_stepN, checkpoint-N)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where fp32 copies of GGUF models are kept."),
    snapshot_every: float = typer.Option(300.0, "--snapshot-every", help="Seconds between crash-safe snapshots in OUT/snapshots (0: every batch)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its last snapshot (same command otherwise)."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Write PNG figures into OUT/figures."),
    progress: bool = typer.Option(True, "--progress/--no-progress",
                                  help="Progress on stderr: model loading (and a note before a GGUF file is dequantized), tokens streamed, then layers' metrics."),
    **analysis,
) -> None:
    """Analyse MODEL(s) over a corpus and write tables, figures and run.json to OUT.

    Under `torchrun --nproc_per_node N -m embgeom run ...` the corpus is shared among
    N processes and their statistics merged exactly; rank 0 writes OUT.

    Several models or revisions, or a training directory of checkpoint-N folders, make
    a sweep: each checkpoint is kept in OUT/checkpoints/ and a rerun skips those
    already finished; OUT gets the combined tables and training-dynamics figures.
    """
    from .output import save_run
    from .pipeline import analyze
    from .results import prepare_out_dir
    from .snapshot import SNAPSHOT_DIR, SUFFIX
    from .sweep import expand_targets, is_sweep, run_sweep

    _hold(out)  # one run per OUT: a second is refused while this one lives
    prepare_out_dir(out)
    options = _analysis_options(analysis)
    targets = expand_targets(models, revision, step)
    if is_sweep(targets, models):
        result = run_sweep(targets, corpus, out, progress=progress, figures=figures, cache_dir=cache_dir,
                           say=_say, snapshot_every=snapshot_every, resume=resume, **options)
        if result is None:  # not rank 0 of a torchrun job
            return
        where = f"{out}/layers.csv ({len(result.layers)} rows, {len(targets)} checkpoints in {out}/checkpoints)"
    else:
        t = targets[0]
        snapshots = out / SNAPSHOT_DIR
        if not resume and any(snapshots.glob(f"rank*-of-*{SUFFIX}")) and os.environ.get("RANK", "0") == "0":
            _say(f"note: {snapshots} holds a snapshot of an unfinished run; starting over "
                 "(stop and add --resume to continue it instead)")
        result = analyze(t.spec, corpus, revision=t.revision, step=t.step, progress=progress, cache_dir=cache_dir,
                         snapshot_dir=snapshots, snapshot_every=snapshot_every, resume=resume, **options)
        if result is None:  # not rank 0 of a torchrun job: rank 0 writes
            return
        save_run(result, out, figures=figures)
        shutil.rmtree(snapshots, ignore_errors=True)  # the results are written: nothing left to resume
        where = f"{out}/layers.csv ({len(result.layers)} rows)"
    _say_warnings(result.run, out)
    _say(f"wrote {where}" + (f", figures in {out}/figures" if figures else "") + f"; read {out}/report.md first")


def _say_warnings(run: dict, out, most: int = 5) -> None:
    """The run's warnings (metrics left NaN, figures not drawn) on stderr, the first
    few; all of them are in run.json and report.md."""
    found = list(run.get("warnings") or []) + [w for r in run.get("runs") or [] for w in r.get("warnings") or []]
    for w in found[:most]:
        _say(f"embgeom: warning: {w}")
    if len(found) > most:
        _say(f"embgeom: warning: ... and {len(found) - most} more in {out}/run.json")


@app.command()
def plot(
    dirs: List[Path] = typer.Argument(..., metavar="DIR...", help="Output directories of `embgeom run`."),
    out: Path = typer.Option(..., "--out", help="Directory for the figures."),
    layer: Optional[int] = typer.Option(None, "--layer", help="Layer of the per-type figures (M against V, Q/M/V against count); default: the middle one."),
) -> None:
    """Figures of one or several runs, overlaid (e.g. an encoder against a decoder),
    and a report.md that reads them side by side."""
    from .output import save_comparison
    from .results import Result

    results = [Result.load(d) for d in dirs]
    if out.exists() and not out.is_dir():
        raise EmbgeomError(f"--out {out} is a file; name a directory for the figures")
    warnings: list = []
    written, report = save_comparison(results, out, layer=layer, warnings=warnings)
    _say_warnings({"warnings": warnings}, out)
    _say(f"wrote {len(written)} figures and {report.name} to {out}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-output"), "--out", help="Output directory."),
    max_tokens: int = typer.Option(20000, "--max-tokens", help="Counted tokens per model."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
) -> None:
    """Analyse the packaged encoder (all-MiniLM-L6-v2) and decoder (SmolLM2-135M) on English Wikipedia text."""
    from .demo import run_demo

    run_demo(out, max_tokens=max_tokens, progress=progress, say=_say)


def _leave_process_group() -> None:
    """Under torchrun, end this process's membership of the process group (only
    if a run joined one: `embgeom --help` need not import torch)."""
    if "embgeom.distributed" in sys.modules:
        from .distributed import leave_process_group

        leave_process_group()


def main(argv: list[str] | None = None) -> None:
    """Entry point: EmbgeomError -> one line on stderr, exit status 2."""
    try:
        try:
            app(args=argv, prog_name="embgeom", standalone_mode=False)
        finally:
            _leave_process_group()
            while _HELD:
                from ._lock import release

                release(_HELD.pop())
    except EmbgeomError as exc:
        _say(f"embgeom: error: {exc.command_line()}")
        sys.exit(2)
    except KeyboardInterrupt:
        _say("embgeom: interrupted; no layers.csv was written")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:
        # Usage errors of the command-line parser (typer vendors its own click, so
        # match by shape rather than class).
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            message = exc.format_message()
            if message:  # empty when help was shown for a bare command
                _say(f"embgeom: error: {message}")
            sys.exit(2)
        if type(exc).__name__ == "Abort":
            sys.exit(130)
        raise


def console_main() -> None:
    """The `embgeom` command (and `python -m embgeom`): `main`, then a fast exit.

    Once a command has returned, its files are written and closed; what is left is
    the interpreter's teardown, which frees every module of torch and transformers
    one by one (~1.2 s after a model was loaded, measured). The exit handlers still
    run (logging, multiprocessing, torch), the standard streams are flushed, and the
    process ends without the teardown. Tests call `main` instead."""
    import atexit

    try:
        main()
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:  # a message, as sys.exit("...") would print it
            print(exc.code, file=sys.stderr)
            code = 1
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is None:  # not CPython: the ordinary exit
        sys.exit(code)
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`embgeom ... | head`) or stream
            pass
    os._exit(code)


if __name__ == "__main__":
    console_main()
