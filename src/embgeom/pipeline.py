"""analyze(): corpus x model -> streaming accumulators -> metrics -> Result."""
from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path


import numpy as np
import pandas as pd
import torch

from . import __version__
from .errors import EmbgeomError, option
from .extract import decoder_inputs, forward_hidden
from .distributed import Shard
from .memory import check_accumulators_fit, processes_on_this_machine
from .models import LoadedModel, open_model, resolve_device
from .snapshot import Snapshots, check_interval, model_files
from .progress import layer_progress, token_progress
from .protocols import preset, record as protocol_record, resolve as resolve_protocol
from ._heap import HeapTrimmer
from .results import SPECTRUM_TABLE_COLUMNS, Result, empty_tokens_frame, id_scale_frame, layers_frame
from .stats.layers import VIEWS, LayerStatistics, NonFiniteHidden
from .stats.moments import PRECISIONS
from .windows import (POSITION_BITS, Window, WindowPlan, default_seq_len, iter_batches, iter_windows, pad_token_id,
                      validate_plan)


# Windows of at most this many tokens in all (~5 bytes each, ~40 MiB) are kept from
# the counting pre-pass for the stream instead of being tokenized again.
KEEP_WINDOW_TOKENS = 1 << 23
# GRIDE's largest neighbour rank: scales n1 = 1, 2, ..., 32 (n2 = 2 n1 <= 64).
GRIDE_MAX_RANK = 64


@dataclass
class AnalysisConfig:
    """Every option of one analysis (recorded in run.json)."""

    max_tokens: int | None = None
    seq_len: int | None = None  # None: min(DEFAULT_SEQ_LEN, the model's positions)
    batch_size: int = 16
    device: str = "auto"
    device_map: str | None = None
    dtype: str = "float32"
    id_sample: int = 10000
    token_types: str = "id"
    type_layers: tuple | None = None
    seed: int = 0
    exclude_special: bool = False
    exclude_positions: tuple = ()
    outlier_factor: float = 10.0
    text_field: str | None = None
    encoding_errors: str = "strict"
    min_count: int = 10
    max_count: int = 100000
    calibration_tokens: int = 2048
    # A preset of the options below (see `embgeom.protocols`); explicit options win.
    protocol: str = "embgeom"
    id_first: int = 0  # > 0: ID on the first N counted tokens of each layer, not a random sample
    twonn_discard: float = 0.1
    twonn_duplicates: str = "drop"  # or "keep-rank" (paper A's μ ≤ 1 + ε rule)
    types_filtered: bool = False  # Q, M, V, V_within, V_between over the types within the count bounds
    precision: str = "auto"
    cross_layer: bool = True

    @classmethod
    def from_options(cls, **options) -> "AnalysisConfig":
        """A checked configuration from keyword options (unknown names are an error).
        `protocol` fills in the options it sets that are not given explicitly."""
        unknown = set(options) - set(cls.__dataclass_fields__)
        if unknown:
            raise EmbgeomError(f"unknown option(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        cfg = cls(**resolve_protocol(options))
        cfg.exclude_positions = tuple(int(p) for p in (cfg.exclude_positions or ()))
        if cfg.type_layers is not None:
            layers = (cfg.type_layers,) if isinstance(cfg.type_layers, (int, np.integer)) else tuple(cfg.type_layers)
            bad = [v for v in layers if isinstance(v, bool) or not isinstance(v, (int, np.integer))]
            if bad or not layers:
                raise EmbgeomError(f"{option('type_layers')} takes layer numbers (negative: from the last), "
                                   f"got {cfg.type_layers!r}")
            cfg.type_layers = tuple(int(v) for v in layers)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def positive_int(name, v, allow_none=False):
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise EmbgeomError(f"{option(name)} must be a positive integer, got {v!r}")

        positive_int("max_tokens", self.max_tokens, allow_none=True)
        positive_int("seq_len", self.seq_len, allow_none=True)
        positive_int("batch_size", self.batch_size)
        if isinstance(self.id_sample, bool) or not isinstance(self.id_sample, (int, np.integer)) or self.id_sample < 0:
            raise EmbgeomError(f"{option('id_sample')} must be a non-negative integer, got {self.id_sample!r}")
        if self.token_types not in ("id", "string", "none"):
            raise EmbgeomError(f"{option('token_types')} must be 'id', 'string' or 'none', got {self.token_types!r}")
        if self.type_layers is not None and self.token_types == "none":
            raise EmbgeomError(f"{option('type_layers')} chooses where per-type statistics are kept, but "
                               f"{option('token_types', 'none')} keeps none; drop one of the two")
        if not (isinstance(self.outlier_factor, (int, float)) and math.isfinite(self.outlier_factor) and self.outlier_factor > 1):
            raise EmbgeomError(f"{option('outlier_factor')} must be a number greater than 1, got {self.outlier_factor!r}")
        if self.encoding_errors not in ("strict", "replace", "ignore"):
            raise EmbgeomError(f"{option('encoding_errors')} must be strict, replace or ignore, got {self.encoding_errors!r}")
        if self.device_map not in (None, "auto", "balanced", "balanced_low_0", "sequential"):
            raise EmbgeomError(f"{option('device_map')} must be auto, balanced, balanced_low_0 or sequential, "
                               f"got {self.device_map!r}")
        if self.precision not in PRECISIONS:
            raise EmbgeomError(f"{option('precision')} must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.cross_layer, bool):
            raise EmbgeomError(f"{option('cross_layer')} must be True or False, got {self.cross_layer!r}")
        if self.min_count < 1 or self.max_count < self.min_count:
            raise EmbgeomError(f"{option('min_count')}/{option('max_count')} must satisfy 1 <= min <= max, "
                               f"got {self.min_count}, {self.max_count}")
        self._validate_protocol()

    def _validate_protocol(self) -> None:
        preset(self.protocol)  # a known name
        if isinstance(self.id_first, bool) or not isinstance(self.id_first, (int, np.integer)) or self.id_first < 0:
            raise EmbgeomError(f"{option('id_first')} must be a non-negative integer (0: a random sample), got {self.id_first!r}")
        d = self.twonn_discard
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
            raise EmbgeomError(f"{option('twonn_discard')} must be a fraction in [0, 1), got {d!r}")
        if self.twonn_duplicates not in ("drop", "keep-rank"):
            raise EmbgeomError(f"{option('twonn_duplicates')} must be 'drop' or 'keep-rank', got {self.twonn_duplicates!r}")
        if not isinstance(self.types_filtered, (bool, np.bool_)):
            raise EmbgeomError(f"{option('types_filtered')} must be True or False, got {self.types_filtered!r}")
        if self.types_filtered and self.token_types == "none":
            raise EmbgeomError(f"{option('types_filtered')} takes Q, M, V over the token types within the count bounds, "
                               f"but {option('token_types', 'none')} keeps no types; drop one of the two")

    @property
    def id_points(self) -> int:
        """Positions kept for intrinsic dimension: --id-first if set, else --id-sample."""
        return int(self.id_first or self.id_sample)


def resolve_type_layers(type_layers: tuple | None, n_layers: dict) -> dict | None:
    """{stack: layers keeping per-type statistics} from --type-layers (negative
    numbers count from the last hidden state, -1 being the last); None: all."""
    if type_layers is None:
        return None
    out = {}
    for stack, L in n_layers.items():
        chosen = set()
        for v in type_layers:
            if not -(L + 1) <= v <= L:
                raise EmbgeomError(f"{option('type_layers', v)} is not a layer of this model's {stack} (0 to {L}, "
                                   f"or -1 to -{L + 1} counting from the last)")
            chosen.add(v % (L + 1))
        out[stack] = tuple(sorted(chosen))
    return out


def _check_memory(n_layers: dict, widths, width: int, n_types: int | None, type_layers: dict | None,
                  cfg: AnalysisConfig, device, sharers: int) -> int:
    """Refuse a run whose statistics cannot fit (see `embgeom.memory`); returns the
    planned bytes. `type_layers`: --type-layers resolved for these stacks."""
    planned = LayerStatistics.planned_parts(n_layers, widths, n_types, cfg.id_points, type_layers, cfg.cross_layer)
    typed = sum(map(len, LayerStatistics.typed_layers(n_layers, n_types is not None, type_layers).values()))
    hidden = sum(n + 1 for n in n_layers.values())
    what = {"covariances": f"2 x width² float64 for each of {hidden} hidden states",
            "per-type means": f"{n_types or 0:,} token types x {typed} hidden states x width {width} in float64",
            "ID sample": f"{cfg.id_points:,} positions x {hidden} hidden states x width in float32",
            "cross-layer moments": "2 x width² float64 (and 2 x width² for outliers) for each pair of consecutive "
                                   "layers (--no-cross-layer: none)"}
    placed = {k: (b, what[k]) for k, b in planned.items()}
    # The ID sample is kept in host memory whatever the device; the rest lives on it.
    if torch.device(device).type != "cpu" and "ID sample" in placed:
        check_accumulators_fit({"ID sample": placed.pop("ID sample")}, "cpu", sharers=sharers)
    check_accumulators_fit(placed, device, sharers=sharers)
    return sum(planned.values())


def _check_config_memory(opened, cfg: AnalysisConfig, n_types: int | None, device, sharers: int) -> None:
    """The memory check from the config alone (a --type-layers past the config's depth
    is left to the exact check once the model is loaded)."""
    shape = opened.shape
    if shape is None:
        return
    stacks, width = shape
    try:
        config_type_layers = resolve_type_layers(cfg.type_layers, stacks)
    except EmbgeomError:
        return
    _check_memory(stacks, width, width, n_types, config_type_layers, cfg, device, sharers)


def preflight(model: str, *, revision: str | None = None, cache_dir=None, **options) -> None:
    """What `analyze` checks about `model` before it reads the corpus, on its own:
    the model is found, its tokenizer and config load, and the statistics its config
    fixes (covariances, ID sample) fit in memory. The per-type part of the plan
    depends on the corpus and is checked when the analysis starts. A sweep checks
    every checkpoint this way before it analyses the first."""
    cfg = AnalysisConfig.from_options(**options)
    shard = Shard.from_environment(cfg.device)
    target = resolve_device(shard.device(cfg.device))
    opened = open_model(model, revision=revision, cache_dir=cache_dir)
    _check_config_memory(opened, cfg, None, target, processes_on_this_machine() if shard.world > 1 else 1)


def _documents(corpus, cfg: AnalysisConfig):
    if isinstance(corpus, (list, tuple)):
        if not all(isinstance(d, str) for d in corpus):
            raise EmbgeomError("a corpus given as a list must hold strings (documents)")
        docs = [d for d in corpus if d.strip()]
        if not docs:
            raise EmbgeomError("the corpus list holds no non-blank document")
        return lambda: iter(docs)
    from .corpus import read_documents

    return lambda: read_documents(corpus, text_field=cfg.text_field, encoding_errors=cfg.encoding_errors)


def _versions() -> dict:
    import numpy
    import pandas
    import transformers

    return {
        "embgeom": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "pandas": pandas.__version__,
    }


def _counted_decoder(plan: WindowPlan, model, batch) -> torch.Tensor:
    """The decoder stack's counted mask: the plan applied to its own input ids (the
    document shifted right); with --exclude-special its start token is not counted."""
    ids = decoder_inputs(model, batch.input_ids)
    mask = plan.counted_in_batch(ids, batch.attention_mask.sum(1))
    if plan.exclude_special:
        mask[:, 0] = False
    return mask


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
    **options : the fields of `AnalysisConfig` (max_tokens, seq_len, batch_size,
        device, device_map, dtype, id_sample, token_types, type_layers, seed, exclude_special,
        exclude_positions, outlier_factor, text_field, encoding_errors, min_count,
        max_count, protocol, id_first, twonn_discard, twonn_duplicates, types_filtered,
        precision, cross_layer). `protocol` ("embgeom", "paper-a" or "paper-b", see
        `embgeom.protocols`) sets id_first, twonn_discard, twonn_duplicates,
        token_types and types_filtered; those given explicitly beside it override it.
        `precision`: "auto" forms each batch's covariance products in float32 on
        centred data and accumulates in float64, "float64" keeps every product in
        float64 (see `embgeom.stats.moments`). `cross_layer`: False leaves out the
        cross-layer moments, so linear_cka and linearity are NaN.

    Under torchrun (WORLD_SIZE > 1) the batches are shared among the processes and
    their accumulators merged exactly; rank 0 returns the Result, the others None.
    """
    cfg = AnalysisConfig.from_options(**options)
    check_interval(snapshot_every)
    if resume and snapshot_dir is None:
        raise EmbgeomError("resume needs snapshot_dir (the command line keeps snapshots in OUT/snapshots)")
    from .models import _quiet_transformers

    _quiet_transformers()  # long documents are windowed here, not truncated: no length warnings
    docs = _documents(corpus, cfg)
    t0 = time.perf_counter()
    shard = Shard.from_environment(cfg.device)
    if resume is True:  # nothing to resume from: refused before any loading (every rank agrees)
        shard.check_all(Snapshots.missing(snapshot_dir, shard.rank, shard.world))
    show_loading = progress and shard.is_main
    if isinstance(model, LoadedModel):
        loaded, opened = model, None
        tok, prefix, suffix, max_length = (model.tokenizer, model.facts.special_prefix, model.facts.special_suffix,
                                           model.facts.max_length)
    else:
        if not isinstance(corpus, (list, tuple)) and not Path(corpus).exists():
            raise EmbgeomError(f"corpus {corpus} does not exist; pass a .txt, .jsonl, .csv, .parquet file or a datasets directory")
        target = resolve_device(shard.device(cfg.device))  # --device cuda without a GPU: before any loading
        # The tokenizer first: the corpus is read and counted before the weights load,
        # so bad input is reported before a large model spends minutes loading.
        loaded, opened = None, open_model(model, revision=revision, cache_dir=cache_dir, progress=show_loading)
        tok, max_length = opened.tokenizer, opened.max_length
        prefix, suffix = opened.special_prefix_suffix
    t_load = time.perf_counter() - t0
    cfg.seq_len = default_seq_len(cfg.seq_len, max_length)  # run.json records the length used
    plan = WindowPlan(
        seq_len=cfg.seq_len,
        prefix=tuple(prefix),
        suffix=tuple(suffix),
        special_ids=frozenset(int(i) for i in getattr(tok, "all_special_ids", []) or []),
        exclude_special=cfg.exclude_special,
        exclude_positions=cfg.exclude_positions,
        max_tokens=cfg.max_tokens,
    )
    validate_plan(plan, max_length)

    with_types = cfg.token_types != "none"
    type_of, type_text = token_type_table(tok, cfg.token_types) if with_types else (None, None)

    # Pre-pass with the tokenizer alone: validates the corpus before any model work,
    # gives the progress bar its total and sizes the per-type accumulators.
    t1 = time.perf_counter()
    n_windows = n_counted = 0
    docs_used = set()
    seen_types: set = set()
    head = 0  # windows the outlier threshold is calibrated on
    # The windows are kept (ids as int32) while they are few, so the stream does not
    # tokenize the corpus a second time; a larger corpus is tokenized again.
    kept: list | None = []
    kept_tokens = 0
    for w in iter_windows(docs(), tok, plan):
        n_windows += 1
        n_counted += int(w.counted.sum())
        if head == 0 and n_counted >= cfg.calibration_tokens:
            head = n_windows
        docs_used.add(w.doc)
        ids = np.asarray(w.ids, dtype=np.int64)
        if with_types:
            seen_types.update(np.unique(ids[w.counted]).tolist())
        if kept is not None:
            kept_tokens += len(ids) + 64  # a window object costs about as much as 64 tokens
            if kept_tokens > KEEP_WINDOW_TOKENS or ids.size and int(ids.max()) > np.iinfo(np.int32).max:
                kept = None
            else:
                kept.append(Window(w.index, w.doc, w.start, ids.astype(np.int32), w.counted))
    if n_counted == 0:
        raise EmbgeomError("no token is counted: the corpus is empty after tokenization or every position is excluded")
    n_types_expected = len({int(type_of[i]) for i in seen_types}) if type_of is not None else len(seen_types)
    if not with_types:
        n_types_expected = None
    corpus_record = _corpus_record(corpus)
    t_count = time.perf_counter() - t1

    sharers = processes_on_this_machine() if shard.world > 1 else 1
    if loaded is None:
        # From the config: a run that cannot fit is refused before the weights load (a
        # --type-layers past the config's depth is left to the exact check below).
        _check_config_memory(opened, cfg, n_types_expected, target, sharers)
        t = time.perf_counter()
        loaded = opened.load(dtype=cfg.dtype, device=shard.device(cfg.device), device_map=cfg.device_map,
                             progress=show_loading)
        t_load += time.perf_counter() - t
    facts = loaded.facts
    validate_plan(plan, facts.max_length)
    device = loaded.device
    type_layers = resolve_type_layers(cfg.type_layers, facts.n_layers)
    planned_bytes = _check_memory(facts.n_layers, facts.widths, facts.width, n_types_expected, type_layers, cfg,
                                  device, sharers)
    is_ed = facts.kind == "encoder-decoder"
    head = head or n_windows
    name = name or loaded.name
    snaps = None
    if snapshot_dir is not None:
        fingerprint = {"embgeom": __version__, "batching": 2, "config": asdict(cfg), "model": _model_identity(facts),
                       "revision": revision, "step": step, "name": name, "corpus": corpus_contents(corpus_record),
                       "processes": shard.world}
        snaps = Snapshots(snapshot_dir, snapshot_every, shard.rank, shard.world, fingerprint)
    progress_state = {"next_batch": 0, "n_seen": {stack: 0 for stack in facts.n_layers}, "n_padded": 0,
                      "tokens_done": 0}
    stats = None
    resumed_from = None
    if resume:
        have = shard.all_gather(snaps.exists())
        problem = None
        state = None
        if resume is True or any(have):
            try:
                state = snaps.load()
                stats, progress_state = _resumed(snaps, state, progress_state, device, (n_types_expected or 0) + 1)
            except EmbgeomError as exc:
                problem = str(exc)
        shard.check_all(problem)
        if state is not None:
            resumed_from = sum(shard.all_gather(int(state["tokens_done"])))
    if stats is None:
        stats = LayerStatistics(facts.n_layers, facts.widths, device, outlier_factor=cfg.outlier_factor,
                                with_types=with_types, type_layers=type_layers,
                                type_capacity=(n_types_expected or 0) + 1,
                                id_sample=cfg.id_points, seed=cfg.seed,
                                id_order="first" if cfg.id_first else "random", precision=cfg.precision,
                                cross_layer=cfg.cross_layer)
    type_lut = torch.as_tensor(type_of, device=device) if type_of is not None else None
    pad = pad_token_id(tok)
    gather = shard.gather_tensors if shard.world > 1 else None
    n_seen, start = progress_state["n_seen"], progress_state["next_batch"]
    t2 = time.perf_counter()
    nonfinite = _explain_nonfinite(loaded.model)
    with token_progress(n_counted, enabled=progress and shard.is_main, description=loaded.name) as advance, \
            torch.no_grad(), nonfinite:
        windows = iter(kept) if kept is not None else iter_windows(docs(), tok, plan)
        trim_heap = HeapTrimmer()
        # The calibration windows are batched apart (their batches come first), in a
        # pool rounded up to whole batches: no short batch of leftovers, so the
        # forward passes are those of a plain loop. Only the first `head` windows
        # give the median.
        pool = -(-head // cfg.batch_size) * cfg.batch_size
        skipped, index = 0, -1  # counted tokens of this rank's batches before the resumed one
        for index, batch in enumerate(iter_batches(windows, cfg.batch_size, pad, head=pool)):
            if index < start:  # done before the snapshot this run resumes from
                skipped += batch.n_counted if shard.owns(index) else 0
                advance(batch.n_counted)
                continue
            if index == start and start:
                _check_skipped(snaps, skipped, progress_state)
            if not batch.head:
                stats.calibrate(gather)
            if not shard.owns(index):
                advance(batch.n_counted)
                continue
            b = batch.to(device)
            hidden = forward_hidden(loaded.model, b.input_ids, b.attention_mask, is_ed, single_stack=facts.kind)
            progress_state["n_padded"] += int(b.input_ids.numel())
            B, T = b.input_ids.shape
            positions = torch.arange(T, device=device).expand(B, T)
            windows = b.window_index.to(device)[:, None].expand(B, T)
            docs_ix = b.doc_index.to(device)[:, None].expand(B, T)
            for stack, hs in hidden.items():
                if stack == "decoder" and is_ed:
                    ids = decoder_inputs(loaded.model, b.input_ids)
                    counted = _counted_decoder(plan, loaded.model, b)
                else:
                    ids, counted = b.input_ids, b.counted
                types = type_lut[ids] if type_lut is not None else ids
                meta = {"token_id": ids, "document": docs_ix, "window": windows, "position": positions}
                keys = (windows << POSITION_BITS) | positions
                calib = None
                if batch.head and pool > head:
                    calib = (b.window_index < head).to(device)[:, None].expand(B, T)
                stats.update(stack, hs, counted, types, meta, keys=keys, calibration=calib)
                n_seen[stack] += int(counted.sum())
            progress_state["tokens_done"] += batch.n_counted
            progress_state["next_batch"] = index + 1
            advance(batch.n_counted)
            trim_heap()
            if snaps is not None and stats.calibrated and snaps.due():
                snaps.save({"statistics": stats.state_dict(), **progress_state})
    if start and index < start:  # resumed after the last batch, or a next_batch past the stream
        _check_skipped(snaps, skipped, progress_state, index + 1 == start)
    with nonfinite:
        stats.finish(gather)
    trim_heap(force=True)
    n_padded = progress_state["n_padded"]
    threads = None
    if shard.world > 1:
        stats, n_seen, n_padded = _merge_ranks(shard, stats, n_seen, n_padded, device)
        if stats is None:
            return None
        # The other ranks on this machine are done: the end-of-run metrics may use
        # their CPU threads too (torchrun gives each worker one by default).
        threads = torch.get_num_threads()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        torch.set_num_threads(max(threads, min(os.cpu_count() or 1, threads * local)))
    t_stream = time.perf_counter() - t2

    t3 = time.perf_counter()
    rev = revision or ""
    rows, spectrum_rows, token_frames, scale_frames = [], [], [], []
    warnings_: list = []  # what could not be computed, in run.json and report.md
    n_layer_rows = sum(L + 1 for L in facts.n_layers.values())
    with layer_progress(n_layer_rows, enabled=progress, description=f"{loaded.name} metrics") as advance_layer:
        for stack, L in facts.n_layers.items():
            cross = _guarded(f"{stack}: cross-layer CKA and linearity", warnings_, stats.cross_layer_metrics,
                             stack) or {}  # before the views are merged in place
            for layer in range(L + 1):
                # Inliers first: then 'all' merges the few outliers into the inliers'
                # own accumulators (no copy of the per-type table), and a layer
                # without outliers computes everything once for both views.
                per_view, done = {}, None
                for view in ("inliers", "all"):
                    acc = stats.view(view, stack, layer, in_place=True)
                    n = acc.moments.n
                    if n == 0:
                        per_view[view] = (n, None, None, None)
                    elif done is not None and n == done[0]:
                        per_view[view] = (n, done[1], done[2], None if done[3] is None else done[3].copy())
                    else:
                        where = f"{stack} layer {layer} ({view})"
                        done = per_view[view] = (n, *_layer_values(acc, cfg, where, warnings_))
                        if cfg.types_filtered:  # paper B: over the tokens of the fitted types only
                            done[1].update(_filtered_moments(acc.types, cfg))
                for view in VIEWS:
                    n, values, lam, table = per_view[view]
                    ident = dict(model=name, revision=rev, step=step, stack=stack, layer=layer)
                    row = dict(ident, n_layers=L, depth=layer / L, view=view, n_tokens=n)
                    if n == 0:
                        rows.append(row)
                        continue
                    row.update(values)
                    row.update(cross.get(layer, {}).get(view, {}))
                    row.update(stats.window_means(stack, layer, view))
                    if cfg.id_points > 0:
                        row.update(_guarded(f"{stack} layer {layer} ({view}): intrinsic dimension", warnings_,
                                            lambda: stats.intrinsic_dimension(
                                                stack, layer, view, discard_fraction=cfg.twonn_discard,
                                                duplicates=cfg.twonn_duplicates)) or {})
                        scales = _guarded(f"{stack} layer {layer} ({view}): ID across scales", warnings_,
                                          stats.id_scales, stack, layer, view, GRIDE_MAX_RANK)
                        if scales is not None:
                            scale_frames.append(scales.assign(**ident, view=view))
                    rows.append(row)
                    if lam is not None:
                        spectrum_rows.append(pd.DataFrame(dict(ident, view=view, rank=np.arange(1, len(lam) + 1),
                                                               eigenvalue=lam)))
                    if table is not None:
                        table.insert(0, "view", view)
                        table.insert(0, "layer", layer)
                        table.insert(0, "stack", stack)
                        token_frames.append(table)
                advance_layer(1)
    layers = layers_frame(rows)
    warnings_ += undefined_metric_warnings(layers, cfg.id_points)
    spectrum = (pd.concat(spectrum_rows, ignore_index=True) if spectrum_rows
                else pd.DataFrame(columns=SPECTRUM_TABLE_COLUMNS))
    tokens = pd.concat(token_frames, ignore_index=True) if token_frames else empty_tokens_frame()
    if type_text is not None:
        tokens.insert(2, "token", type_text(tokens["token_id"].to_numpy()))
    else:
        tokens.insert(2, "token", pd.Series([], dtype=object))
    for col, value in (("step", step), ("revision", rev), ("model", name)):
        tokens.insert(0, col, value)
    outliers = outlier_table(stats.outlier_records(), tok, name, rev)
    id_scale = id_scale_frame(scale_frames)
    if threads is not None:
        torch.set_num_threads(threads)
    t_metrics = time.perf_counter() - t3
    run = {
        "versions": _versions(),
        "config": {**asdict(cfg), "model": str(model) if not isinstance(model, LoadedModel) else facts.path,
                   "revision": revision, "step": step},
        "protocol": protocol_record(asdict(cfg)),
        "corpus": corpus_record,
        "counts": {
            "windows": n_windows,
            "documents": len(docs_used),
            "tokens_counted": n_counted,
            "tokens_per_stack": n_seen,
            "token_types": n_types_expected,
            "padding_fraction": 1.0 - sum(n_seen.values()) / max(1, n_padded * len(n_seen)) if n_padded else 0.0,
        },
        "model": facts.to_dict(),
        "outliers": {
            "factor": cfg.outlier_factor,
            "calibration_windows": head,
            "calibration_tokens": stats.calibrated_on,
            "median_norm": stats.median_norm,
            "count": {s: [int(stats.outliers[s][l].moments.n) for l in range(L + 1)] for s, L in facts.n_layers.items()},
        },
        "knn": stats.knn_summary(),
        "accumulator_bytes": int(stats.nbytes),
        "planned_accumulator_bytes": int(planned_bytes),
        "processes": shard.world,
        "resumed_from_tokens": resumed_from,
        "snapshots": {"written": snaps.saved, "seconds": snaps.seconds, "every_s": snaps.every}
        if snaps is not None else None,
        "timings_s": {"load": t_load, "count": t_count, "stream": t_stream, "metrics": t_metrics,
                      "total": time.perf_counter() - t0},
        "device": str(device),
        "warnings": warnings_,
        # What the covariance products were formed in (the state is float64 always).
        "precision": {"option": cfg.precision, "products": stats.products, "accumulation": "float64",
                      "tf32": False},
    }
    return Result(layers=layers, spectrum=spectrum, tokens=tokens, outliers=outliers, run=run, id_scale=id_scale)


class _explain_nonfinite:
    """Turns NonFiniteHidden into the fix that fits the model's dtype: a half-precision
    model may overflow (float32 is the fix); in float32 or float64 the weights or the
    computation themselves give NaN or inf."""

    def __init__(self, model):
        params = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        self.dtype = params.dtype if params is not None else None

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is None or not issubclass(kind, NonFiniteHidden):
            return False
        if self.dtype in (torch.float16, torch.bfloat16):
            advice = (f"the model overflows in {str(self.dtype).removeprefix('torch.')}: try "
                      f"{option('dtype', 'float32')}")
        else:
            name = str(self.dtype).removeprefix("torch.") if self.dtype is not None else "this dtype"
            advice = (f"the model runs in {name}, so this is not an overflow of half precision: its weights "
                      "or its computation give NaN or inf (check the checkpoint for NaN or inf weights)")
        raise EmbgeomError(f"{exc}; {advice}") from None


def _guarded(what: str, warnings_: list, fn, *args):
    """fn(*args), or None with a warning when it fails: one metric that cannot be
    computed (a numerical library's error on degenerate data) costs its columns (NaN),
    never the run's tables."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - any failure of one metric, reported
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        warnings_.append(f"{what} failed ({type(exc).__name__}{': ' + text if text else ''}); "
                         "its columns are NaN")
        return None


def _layer_values(acc, cfg: AnalysisConfig, where: str, warnings_: list):
    """(metric values, covariance eigenvalues or None, per-type table or None) of one
    layer's view; a part that fails leaves its columns NaN, with a warning."""
    lam_out: list = []
    values = _guarded(f"{where}: spectrum metrics", warnings_, acc.moments.metrics, lam_out)
    if values is None:  # the moments themselves are plain sums: keep them
        values = {"Q": acc.moments.Q, "M": acc.moments.M, "V": acc.moments.V}
    table = None
    if acc.types is not None:  # --token-types none: those columns stay NaN
        dec = _guarded(f"{where}: per-type decomposition", warnings_, acc.types.decomposition)
        if dec is not None:
            values.update(V_within=dec["V_within"], V_between=dec["V_between"])
        table = _guarded(f"{where}: per-type table", warnings_, acc.types.table)
        if table is not None:
            values.update(_guarded(f"{where}: norm-variance trade-off", warnings_,
                                   lambda: acc.types.tradeoff(min_count=cfg.min_count, max_count=cfg.max_count,
                                                              table=table)) or {})
    return values, (lam_out[0] if lam_out else None), table


def undefined_metric_warnings(layers: pd.DataFrame, id_sample: int) -> list[str]:
    """Warnings for metrics that are NaN because the data leave them undefined: too
    few tokens for a spread, no variance at all (every vector equal, e.g. a zeroed
    final norm), too few distinct vectors for intrinsic dimension."""
    out = []

    def where(mask) -> str:
        sel = layers[mask]
        parts = [f"{stack} {', '.join(str(v) for v in sorted(set(g['layer'].tolist())))}"
                 for stack, g in sel.groupby("stack", sort=False)]
        return "; ".join(parts)

    counted = layers["n_tokens"] > 0
    few = counted & (layers["n_tokens"] < 2)
    if few.any():
        out.append(f"only 1 token counted at layers {where(few)}: anisotropy, isoscore, effective rank, "
                   "participation ratio and mean cosine need at least 2 and are NaN; count more tokens")
    flat = counted & ~few & (layers["V"] == 0)
    if flat.any():
        out.append(f"every counted vector is the same (variance V = 0) at layers {where(flat)}: anisotropy, "
                   "isoscore, effective rank and participation ratio are undefined there (NaN)")
    if id_sample > 0:
        no_id = counted & (layers["id_n"].fillna(0) < 3)
        if no_id.any():
            out.append(f"fewer than 3 distinct sampled vectors at layers {where(no_id)}: intrinsic dimension "
                       "is undefined there (NaN)")
    return out


def _resumed(snaps: Snapshots, state: dict, progress_state: dict, device, type_capacity: int):
    """(statistics, progress) rebuilt from a snapshot's state, each checked: a state
    that does not fit together is refused as damaged, never resumed from."""
    try:
        progress = {k: state[k] for k in progress_state}
        for key in ("next_batch", "n_padded", "tokens_done"):  # a snapshot follows at least one batch
            low = 1 if key == "next_batch" else 0
            if isinstance(progress[key], bool) or not isinstance(progress[key], int) or progress[key] < low:
                raise snaps.damaged(f"{key} is {progress[key]!r}, not a count of at least {low}")
        if not isinstance(progress["n_seen"], dict) or set(progress["n_seen"]) != set(progress_state["n_seen"]):
            raise snaps.damaged("n_seen does not name this model's stacks")
        stats = LayerStatistics.from_state_dict(state["statistics"], device=device, type_capacity=type_capacity)
    except KeyError as exc:
        raise snaps.damaged(f"it lacks {exc}") from None
    except EmbgeomError as exc:
        if str(exc).startswith("--resume"):
            raise
        raise snaps.damaged(str(exc)) from None
    for stack, seen in progress["n_seen"].items():
        if stack not in stats.n_layers:
            raise snaps.damaged(f"its statistics lack the {stack} stack")
        counted = [a.moments.n + b.moments.n for a, b in zip(stats.inliers[stack], stats.outliers[stack])]
        sampled = [stats.samples[stack].n_seen] if stats.samples else []
        if any(c != seen for c in counted + sampled):
            raise snaps.damaged(f"{stack}: {seen} tokens counted, but its layers hold {sorted(set(counted))}")
    return stats, progress


def _check_skipped(snaps: Snapshots, skipped: int, progress: dict, in_stream: bool = True) -> None:
    """The batches a resumed run skips must hold the tokens its snapshot says were
    done (a snapshot whose stream position was changed is refused)."""
    if not in_stream or skipped != progress["tokens_done"]:
        raise snaps.damaged(f"next_batch {progress['next_batch']} does not match the {progress['tokens_done']} "
                            "tokens it says were done")


def _filtered_moments(types, cfg: AnalysisConfig) -> dict:
    """Q, M, V, V_within, V_between over the tokens of the types with min_count ≤ n_t ≤
    max_count (--types-filtered); NaN at a layer that keeps no per-type statistics
    (--type-layers), where they cannot be restricted."""
    nan = float("nan")
    if types is None:
        return dict(Q=nan, M=nan, V=nan, V_within=nan, V_between=nan)
    out = types.pooled(min_count=cfg.min_count, max_count=cfg.max_count)
    return {k: out[k] for k in ("Q", "M", "V", "V_within", "V_between")}


def _merge_ranks(shard: Shard, stats: LayerStatistics, n_seen: dict, n_padded: int, device):
    """Every rank's statistics and counts merged into rank 0's, one rank at a time
    (so rank 0 never holds more than one other rank's state); None elsewhere."""
    if not shard.is_main:
        shard.fold_to_main({"statistics": stats.state_dict(), "n_seen": n_seen, "n_padded": n_padded}, None)
        return None, None, None

    def fold(acc, part):
        acc["statistics"].merge(LayerStatistics.from_state_dict(part["statistics"], device=device))
        acc["n_seen"] = {s: acc["n_seen"][s] + part["n_seen"][s] for s in acc["n_seen"]}
        acc["n_padded"] += part["n_padded"]
        return acc

    merged = shard.fold_to_main({"statistics": stats, "n_seen": dict(n_seen), "n_padded": n_padded}, fold)
    return merged["statistics"], merged["n_seen"], merged["n_padded"]


def _model_identity(facts) -> dict:
    """What a resumed run must share with the snapshot's run about the model: its
    facts, and for a directory the names, sizes and times of its files."""
    ident = {k: v for k, v in facts.to_dict().items() if k != "path"}
    ident["path"] = str(Path(facts.path).resolve()) if Path(facts.path).exists() else facts.path
    files = model_files(facts.path)
    if files:
        ident["files"] = files
    return ident


MARKERS = ("##", "Ġ", "▁")


def _strip_markers(token: str) -> str:
    for m in MARKERS:
        if token.startswith(m):
            return token[len(m):]
    return token


def token_type_table(tokenizer, token_types: str):
    """(vocabulary id -> type id table or None, function: type ids -> texts).

    `id` types are vocabulary ids. `string` types are surface forms with the subword
    markers `##`, `Ġ` and `▁` stripped, so `Ġthe` and `the` are one type; their ids
    index the sorted list of distinct strings.
    """
    vocab_size = len(tokenizer)

    def texts(ids):
        return np.asarray(["" if p is None else str(p) for p in tokenizer.convert_ids_to_tokens(ids)], dtype=object)

    if token_types == "id":
        # Only the ids that occur are converted (the whole vocabulary costs ~0.05 s).
        def id_text(ids):
            ids = np.asarray(ids, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise IndexError(f"token id out of the vocabulary (size {vocab_size})")
            uniq, inverse = np.unique(ids, return_inverse=True)
            return texts(uniq.tolist())[inverse.reshape(ids.shape)]

        return None, id_text
    pieces = texts(list(range(vocab_size))).tolist()
    stripped = [_strip_markers(p) for p in pieces]
    strings = sorted(set(stripped))
    index = {t: i for i, t in enumerate(strings)}
    table = np.fromiter((index[t] for t in stripped), dtype=np.int64, count=vocab_size)
    arr = np.asarray(strings, dtype=object)
    return table, lambda ids: arr[np.asarray(ids, dtype=np.int64)]


OUTLIER_COLUMNS = ["model", "revision", "stack", "layer", "token_id", "token", "document", "window", "position",
                   "norm", "norm_over_median"]


def outlier_table(records: list, tokenizer, model: str, revision: str) -> pd.DataFrame:
    """outliers.csv: one row per (outlier token, layer)."""
    if not records:
        return pd.DataFrame(columns=OUTLIER_COLUMNS)
    frames = []
    for r in records:
        n = len(r["norm"])
        frames.append(pd.DataFrame({
            "stack": [r["stack"]] * n, "layer": r["layer"], "token_id": r["token_id"].numpy(),
            "document": r["document"].numpy(), "window": r["window"].numpy(), "position": r["position"].numpy(),
            "norm": r["norm"].numpy(), "norm_over_median": r["norm"].numpy() / r["median"],
        }))
    df = pd.concat(frames, ignore_index=True)
    df.insert(0, "revision", revision)
    df.insert(0, "model", model)
    ids = df["token_id"].to_numpy()
    uniq = np.unique(ids)
    texts = dict(zip(uniq.tolist(), tokenizer.convert_ids_to_tokens(uniq.tolist())))
    df.insert(df.columns.get_loc("token_id") + 1, "token", [texts[i] for i in ids.tolist()])
    return df.sort_values(["stack", "layer", "window", "position"], ignore_index=True)[OUTLIER_COLUMNS]


def corpus_contents(record: dict) -> dict:
    """The part of a corpus record that names its contents (format and SHA-256), not
    where it lies or when it was touched: what a resumed run or a reused sweep
    checkpoint must share with the earlier run."""
    return {"format": record["format"], "sha256": record["sha256"]}


def _corpus_record(corpus) -> dict:
    if isinstance(corpus, (list, tuple)):
        import hashlib

        h = hashlib.sha256()
        for d in corpus:
            h.update(d.encode("utf-8", "replace"))
            h.update(b"\0")
        return {"format": "list", "documents": len(corpus), "sha256": h.hexdigest()}
    from .corpus import corpus_fingerprint

    return corpus_fingerprint(corpus)
