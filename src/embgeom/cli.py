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


@app.command()
def run(
    models: List[str] = typer.Argument(..., metavar="MODEL...", help="Model directory, .gguf file or Hub id."),
    corpus: Path = typer.Option(..., "--corpus", help=".txt (one document per line), .jsonl, .csv, .parquet, or a datasets directory."),
    out: Path = typer.Option(..., "--out", help="Output directory (created if missing)."),
    revision: List[str] = typer.Option([], "--revision", help="Hub revision; repeat for several checkpoints (a training directory: checkpoint folder names)."),
    step: List[int] = typer.Option([], "--step", help="Training step of each checkpoint, in the order named (default: parsed from stepN, global_stepN, checkpoint-N)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Stop after this many counted tokens."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Window length in tokens, special tokens included (default: 512, or the model's positions if fewer)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Windows per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (under torchrun: each rank's own GPU)."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="auto: spread a model too large for one device over all devices (accelerate)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16 (statistics are float64)."),
    precision: str = typer.Option("auto", "--precision", help="auto: each batch's covariance products in float32 (IEEE, no TF32), on data centred by a reference row, accumulated in float64; float64: every product in float64 (slower)."),
    id_sample: int = typer.Option(10000, "--id-sample", help="Token positions sampled for intrinsic dimension."),
    id_first: Optional[int] = typer.Option(None, "--id-first", help="Intrinsic dimension on the first N counted tokens of each layer (the same tokens in every layer) instead of --id-sample random positions; 0: the random sample (the default; paper-a sets 4096)."),
    twonn_discard: Optional[float] = typer.Option(None, "--twonn-discard", help="TwoNN: fraction of the largest ratios r2/r1 left out of the fit (default 0.1; paper-a sets 0.8)."),
    twonn_duplicates: Optional[str] = typer.Option(None, "--twonn-duplicates", help="TwoNN: drop (points at distance 0 from their nearest neighbour dropped before ranking; the default) or keep-rank (points with mu <= 1+1e-8 left out of the fit but keeping their ranks, as paper A; paper-a sets it)."),
    types_filtered: Optional[bool] = typer.Option(None, "--types-filtered/--all-types", help="Layer-level Q, M, V, V_within, V_between over the tokens of the types with --min-count <= n_t <= --max-count only (paper-b sets it), or over every token (the default)."),
    protocol: str = typer.Option("embgeom", "--protocol", help="embgeom, paper-a or paper-b: a preset of --id-first, --twonn-discard, --twonn-duplicates, --token-types and --types-filtered that reproduces how each paper computed its numbers (paper-a: ID on the first 4096 counted tokens, 20% of the TwoNN ratios kept, mu <= 1+1e-8 left out but ranked; paper-b: string types, Q/M/V over the types within --min-count/--max-count). Any of those options given explicitly overrides the preset."),
    token_types: Optional[str] = typer.Option(None, "--token-types", help="id (vocabulary id; the default), string (surface form), or none: no per-type statistics, so memory stays constant however many types a long run meets. --protocol paper-b sets string."),
    type_layers: List[int] = typer.Option([], "--type-layers", help="Keep per-type statistics only at these layers (0 = embeddings; -1 = last); repeatable. Per-type tables hold d float64 per type and layer, most of a long run's memory on a big model."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampled positions for intrinsic dimension "
                             "(the same positions in every layer, whatever the batching or ranks)."),
    exclude_special: bool = typer.Option(False, "--exclude-special", help="Do not count special tokens."),
    exclude_positions: List[int] = typer.Option([], "--exclude-positions", help="Window positions not counted (0 = first; -1 = last); repeatable."),
    outlier_factor: float = typer.Option(10.0, "--outlier-factor", help="Inliers: norm <= factor x median norm."),
    min_count: int = typer.Option(10, "--min-count", help="Norm-variance trade-off over token types seen at least this often..."),
    max_count: int = typer.Option(100000, "--max-count", help="...and at most this often."),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="Text column/field of .jsonl/.csv/.parquet/datasets."),
    encoding_errors: str = typer.Option("strict", "--encoding-errors", help="strict, replace or ignore invalid UTF-8."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where fp32 copies of GGUF models are kept."),
    snapshot_every: float = typer.Option(300.0, "--snapshot-every", help="Seconds between crash-safe snapshots in OUT/snapshots (0: every batch)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its last snapshot (same command otherwise)."),
    cross_layer: bool = typer.Option(True, "--cross-layer/--no-cross-layer", help="Float64 cross-moments of consecutive layers for linear_cka and linearity (2 x width² per layer pair)."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Write PNG figures into OUT/figures."),
    progress: bool = typer.Option(True, "--progress/--no-progress",
                                  help="Progress on stderr: model loading (and a note before a GGUF file is dequantized), tokens streamed, then layers' metrics."),
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
    options = dict(
        max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, device=device, dtype=dtype,
        id_sample=id_sample, type_layers=tuple(type_layers) or None, seed=seed, exclude_special=exclude_special,
        exclude_positions=tuple(exclude_positions), outlier_factor=outlier_factor, text_field=text_field,
        encoding_errors=encoding_errors, device_map=device_map, min_count=min_count, max_count=max_count,
        protocol=protocol,
        precision=precision,
        cross_layer=cross_layer,
    )
    # The options a protocol sets are passed only when given, so that the preset fills in the others.
    given = dict(token_types=token_types, id_first=id_first, twonn_discard=twonn_discard,
                 twonn_duplicates=twonn_duplicates, types_filtered=types_filtered)
    options.update({k: v for k, v in given.items() if v is not None})
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
