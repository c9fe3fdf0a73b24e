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
from .prepare import (MARKERS, _check_memory, _corpus_record, _documents, corpus_contents,  # noqa: F401 (sweeps)
                      load_weights, preflight, prepare_run, token_type_table)
from .record import run_record
from .resume import open_snapshots, resume_state
from .stream import merge_ranks, new_statistics, stream_batches
from .tables import OUTLIER_COLUMNS, outlier_table, run_tables, undefined_metric_warnings

__all__ = ["AnalysisConfig", "analyze", "preflight", "resolve_type_layers", "token_type_table", "outlier_table",
           "undefined_metric_warnings", "corpus_contents", "OUTLIER_COLUMNS", "MARKERS",
           "KEEP_WINDOW_TOKENS"]

# Windows of at most this many tokens in all (~5 bytes each, ~40 MiB) are kept from
# the counting pre-pass for the stream instead of being tokenized again.
KEEP_WINDOW_TOKENS = 1 << 23


def analyze(model, corpus, *, revision: str | None = None, step: int | None = None, name: str | None = None,
            progress: bool = False, cache_dir=None, snapshot_dir=None, snapshot_every: float = 300.0,
            resume: bool | str = False, **options) -> Result | None:
    """Measure the geometry of `model`'s hidden states over `corpus`, layer by layer:
    one row per (stack, layer, view) in `Result.layers` (the README's "Columns").

    model: a Hugging Face directory, a `.gguf` file, a Hub id (see `load_model`) or a
        LoadedModel.
    corpus: a corpus file or directory (see `embgeom.corpus.read_documents`) or a list
        of documents.
    revision, cache_dir: the Hub revision (for Hub ids) and where Hub downloads go.
    step, name: the `step` and `model` columns (name's default: the model's directory
        or file name, or the Hub id).
    progress: show progress bars.
    snapshot_dir, snapshot_every: crash-safe snapshots of the accumulators there, every
        that many seconds (0: after every batch).
    resume: continue from the snapshot in `snapshot_dir` (True: it must exist; "auto":
        if it exists); one made with other options, model, corpus or processes is refused.
    **options: the fields of `AnalysisConfig` (declared in `embgeom.options`), below.
    Under torchrun (WORLD_SIZE > 1) the processes share the batches and merge exactly;
    rank 0 returns the Result, the others None.

    >>> from embgeom import analyze
    >>> from embgeom.packaged import minilm_path
    >>> docs = ["The cat sat on the mat.", "Hidden states change from layer to layer."]
    >>> res = analyze(minilm_path(), docs, token_types="none", cross_layer=False)
    >>> rows = res.layers.query("view == 'all'")[["layer", "n_tokens", "anisotropy"]]
    >>> rows.round(2).iloc[[0, -1]].to_numpy().tolist()  # embeddings, last layer
    [[0.0, 19.0, 0.17], [6.0, 19.0, 0.33]]
    """
    cfg = AnalysisConfig.from_options(**options)
    check_interval(snapshot_every)
    if resume and snapshot_dir is None:
        raise EmbgeomError("resume needs snapshot_dir (the command line keeps snapshots in OUT/snapshots)")
    docs = _documents(corpus, cfg)
    t0 = time.perf_counter()
    shard = Shard.from_environment(cfg.device)
    if resume is True:  # nothing to resume from: refused before any loading (every rank agrees)
        shard.check_all(Snapshots.missing(snapshot_dir, shard.rank, shard.world))
    show_loading = progress and shard.is_main
    pre = prepare_run(model, corpus, docs, cfg, shard, revision=revision, cache_dir=cache_dir,
                      progress=show_loading, t0=t0, keep_tokens=KEEP_WINDOW_TOKENS)
    counts, tok = pre.counts, pre.source.tokenizer
    sharers = processes_on_this_machine() if shard.world > 1 else 1
    loaded, t_weights = load_weights(pre.source, cfg, shard, counts.n_types, sharers, show_loading)
    facts, device = loaded.facts, loaded.device
    validate_plan(pre.plan, facts.max_length)
    type_layers = resolve_type_layers(cfg.type_layers, facts.n_layers)
    planned_bytes = _check_memory(facts.n_layers, facts.widths, facts.width, counts.n_types, type_layers, cfg,
                                  device, sharers)
    head = counts.head or counts.windows
    name = name or loaded.name
    snaps = open_snapshots(snapshot_dir, snapshot_every, shard, cfg, facts, revision=revision, step=step, name=name,
                           corpus_record=pre.corpus_record)
    stats, progress_state, resumed_from = resume_state(snaps, resume, shard, facts.n_layers, device,
                                                       (counts.n_types or 0) + 1)
    if stats is None:
        stats = new_statistics(cfg, facts, device, type_layers, counts.n_types)
    type_lut = torch.as_tensor(pre.type_of, device=device) if pre.type_of is not None else None
    t2 = time.perf_counter()
    kept = counts.kept
    open_windows = (lambda: iter(kept)) if kept is not None else (lambda: iter_windows(docs(), tok, pre.plan))
    stream_batches(stats, loaded, pre.plan, open_windows, cfg, shard, head=head, n_counted=counts.tokens,
                   type_lut=type_lut, pad=pad_token_id(tok), progress_state=progress_state, snaps=snaps,
                   progress=progress)
    stats, n_seen, n_padded, threads = merge_ranks(shard, stats, progress_state, device)
    if stats is None:
        return None
    t_stream, t3 = time.perf_counter() - t2, time.perf_counter()
    tables, warnings_ = run_tables(stats, facts.n_layers, cfg, pre.type_text, tok, name=name, rev=revision or "",
                                   step=step, progress=progress, description=f"{loaded.name} metrics")
    if threads is not None:
        torch.set_num_threads(threads)
    timings = {"load": pre.t_load + t_weights, "count": pre.t_count, "stream": t_stream,
               "metrics": time.perf_counter() - t3}
    run = run_record(model, cfg, facts, stats, revision=revision, step=step, corpus_record=pre.corpus_record,
                     counts=counts, head=head, n_seen=n_seen, n_padded=n_padded, planned_bytes=planned_bytes,
                     processes=shard.world, resumed_from=resumed_from, snaps=snaps, timings=timings, t0=t0,
                     device=device, warnings_=warnings_)
    return Result(**tables, run=run)


if analyze.__doc__:  # None under python -OO
    analyze.__doc__ += option_docs()
