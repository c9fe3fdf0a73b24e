"""analyze(): corpus x model -> streaming accumulators -> metrics -> Result.

The steps live in this package's modules, in the order they run: `config` (the
options), `prepare` (before the weights load: corpus, tokenizer, windows, the
counting pre-pass, the memory plan), `resume` (snapshots), `stream` (batches into
the LayerStatistics), `tables` (the end-of-run metrics into the Result tables) and
`record` (run.json's record).
"""
from __future__ import annotations

import time

import torch

from ..distributed import Shard
from ..errors import EmbgeomError
from ..memory import processes_on_this_machine
from ..options import option_docs
from ..results import Result
from ..snapshot import Snapshots, check_interval
from ..windows import iter_windows, pad_token_id, validate_plan
from .config import AnalysisConfig, resolve_type_layers
from .prepare import (MARKERS, _check_memory, _corpus_record, _documents, corpus_contents, count_windows,
                      load_weights, open_source, preflight, token_type_table, window_plan)
from .record import run_record
from .resume import open_snapshots, resume_state
from .stream import merge_ranks, new_statistics, stream_batches
from .tables import (GRIDE_MAX_RANK, OUTLIER_COLUMNS, layer_frames, outlier_table, result_tables,
                     undefined_metric_warnings)

__all__ = ["AnalysisConfig", "analyze", "preflight", "resolve_type_layers", "token_type_table", "outlier_table",
           "undefined_metric_warnings", "corpus_contents", "OUTLIER_COLUMNS", "MARKERS", "GRIDE_MAX_RANK",
           "KEEP_WINDOW_TOKENS"]

# Windows of at most this many tokens in all (~5 bytes each, ~40 MiB) are kept from
# the counting pre-pass for the stream instead of being tokenized again.
KEEP_WINDOW_TOKENS = 1 << 23


def analyze(
    model,
    corpus,
    *,
    revision: str | None = None,
    step: int | None = None,
    name: str | None = None,
    progress: bool = False,
    cache_dir=None,
    snapshot_dir=None,
    snapshot_every: float = 300.0,
    resume: bool | str = False,
    **options,
) -> Result | None:
    """Measure the geometry of `model`'s hidden states over `corpus`, layer by layer.

    Parameters
    ----------
    model : str or LoadedModel
        A local Hugging Face directory, a `.gguf` file or a Hub id (see `load_model`).
    corpus : str, Path, or list of str
        A corpus file or directory (see `embgeom.corpus.read_documents`) or documents.
    revision : Hub revision (branch, tag or commit), for Hub ids.
    step : training step recorded in the `step` column (parsed from checkpoint names by sweeps).
    name : the `model` column (default: the model directory's or file's name, or the Hub id).
    progress : show a progress bar.
    snapshot_dir : where to keep crash-safe snapshots of the accumulators (none if None).
    snapshot_every : seconds between snapshots (0: after every batch).
    resume : continue from the snapshot in `snapshot_dir` (True: it must exist;
        "auto": if it exists). A snapshot made with other options, another model or
        corpus, or another number of processes is refused.
    **options : the fields of `AnalysisConfig`, each listed under Options below
        with its default and help (written once, in `embgeom.options`, which the
        command line's `embgeom run` reads too). `protocol` ("embgeom", "paper-a" or
        "paper-b", see `embgeom.protocols`) sets id_first, twonn_discard,
        twonn_duplicates, token_types and types_filtered; those given explicitly
        beside it override it.

    Under torchrun (WORLD_SIZE > 1) the batches are shared among the processes and
    their accumulators merged exactly; rank 0 returns the Result, the others None.
    """
    cfg = AnalysisConfig.from_options(**options)
    check_interval(snapshot_every)
    if resume and snapshot_dir is None:
        raise EmbgeomError("resume needs snapshot_dir (the command line keeps snapshots in OUT/snapshots)")
    from ..models import _quiet_transformers

    _quiet_transformers()  # long documents are windowed here, not truncated: no length warnings
    docs = _documents(corpus, cfg)
    t0 = time.perf_counter()
    shard = Shard.from_environment(cfg.device)
    if resume is True:  # nothing to resume from: refused before any loading (every rank agrees)
        shard.check_all(Snapshots.missing(snapshot_dir, shard.rank, shard.world))
    show_loading = progress and shard.is_main
    source = open_source(model, corpus, cfg, shard, revision=revision, cache_dir=cache_dir, progress=show_loading)
    tok = source.tokenizer
    t_load = time.perf_counter() - t0
    plan = window_plan(cfg, source)
    type_of, type_text = token_type_table(tok, cfg.token_types) if cfg.token_types != "none" else (None, None)
    t1 = time.perf_counter()
    counts = count_windows(docs, tok, plan, cfg, type_of, KEEP_WINDOW_TOKENS)
    corpus_record = _corpus_record(corpus)
    t_count = time.perf_counter() - t1

    sharers = processes_on_this_machine() if shard.world > 1 else 1
    loaded, t_weights = load_weights(source, cfg, shard, counts.n_types, sharers, show_loading)
    t_load += t_weights
    facts = loaded.facts
    validate_plan(plan, facts.max_length)
    device = loaded.device
    type_layers = resolve_type_layers(cfg.type_layers, facts.n_layers)
    planned_bytes = _check_memory(facts.n_layers, facts.widths, facts.width, counts.n_types, type_layers, cfg,
                                  device, sharers)
    head = counts.head or counts.windows
    name = name or loaded.name
    snaps = open_snapshots(snapshot_dir, snapshot_every, shard, cfg, facts, revision=revision, step=step, name=name,
                           corpus_record=corpus_record)
    stats, progress_state, resumed_from = resume_state(snaps, resume, shard, facts.n_layers, device,
                                                       (counts.n_types or 0) + 1)
    if stats is None:
        stats = new_statistics(cfg, facts, device, type_layers, counts.n_types)
    type_lut = torch.as_tensor(type_of, device=device) if type_of is not None else None
    t2 = time.perf_counter()
    kept = counts.kept
    open_windows = (lambda: iter(kept)) if kept is not None else (lambda: iter_windows(docs(), tok, plan))
    stream_batches(stats, loaded, plan, open_windows, cfg, shard, head=head, n_counted=counts.tokens,
                   type_lut=type_lut, pad=pad_token_id(tok), progress_state=progress_state, snaps=snaps,
                   progress=progress)
    stats, n_seen, n_padded, threads = merge_ranks(shard, stats, progress_state, device)
    if stats is None:
        return None
    t_stream = time.perf_counter() - t2

    t3 = time.perf_counter()
    rev = revision or ""
    frames = layer_frames(stats, facts.n_layers, cfg, name=name, rev=rev, step=step, progress=progress,
                          description=f"{loaded.name} metrics")
    layers, spectrum, tokens, id_scale = result_tables(frames, cfg, type_text, name=name, rev=rev, step=step)
    outliers = outlier_table(stats.outlier_records(), tok, name, rev)
    if threads is not None:
        torch.set_num_threads(threads)
    t_metrics = time.perf_counter() - t3
    run = run_record(model, cfg, facts, stats, revision=revision, step=step, corpus_record=corpus_record,
                     counts=counts, head=head, n_seen=n_seen, n_padded=n_padded, planned_bytes=planned_bytes,
                     processes=shard.world, resumed_from=resumed_from, snaps=snaps,
                     timings={"load": t_load, "count": t_count, "stream": t_stream, "metrics": t_metrics}, t0=t0,
                     device=device, warnings_=frames.warnings)
    return Result(layers=layers, spectrum=spectrum, tokens=tokens, outliers=outliers, run=run, id_scale=id_scale)


if analyze.__doc__:  # None under python -OO
    analyze.__doc__ += option_docs()
