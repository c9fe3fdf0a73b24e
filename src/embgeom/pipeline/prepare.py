"""Before the weights load: the corpus, the tokenizer side of the model, the window
plan, the counting pre-pass and the memory plan, so that bad input or a run that
cannot fit is refused before a large model spends minutes loading."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import EmbgeomError
from ..distributed import Shard
from ..memory import check_accumulators_fit, processes_on_this_machine
from ..models import LoadedModel, open_model, resolve_device
from ..stats.layers import LayerStatistics
from ..windows import Window, WindowPlan, default_seq_len, iter_windows, validate_plan
from .config import AnalysisConfig, resolve_type_layers


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
    from ..corpus import read_documents

    return lambda: read_documents(corpus, text_field=cfg.text_field, encoding_errors=cfg.encoding_errors)


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
        # Only the ids that occur are converted, not the whole vocabulary.
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
    from ..corpus import corpus_fingerprint

    return corpus_fingerprint(corpus)


@dataclass
class Source:
    """The model as the pre-pass needs it: loaded already (`loaded`), or opened with
    its tokenizer and config and the weights not read yet (`opened`)."""

    loaded: LoadedModel | None
    opened: object | None
    tokenizer: object
    prefix: tuple
    suffix: tuple
    max_length: int | None
    target: object = None  # the device an opened model's weights will go to


def open_source(model, corpus, cfg: AnalysisConfig, shard: Shard, *, revision, cache_dir, progress: bool) -> Source:
    """The tokenizer side of `model`: a LoadedModel as it is, anything else opened
    without its weights."""
    if isinstance(model, LoadedModel):
        return Source(model, None, model.tokenizer, model.facts.special_prefix, model.facts.special_suffix,
                      model.facts.max_length)
    if not isinstance(corpus, (list, tuple)) and not Path(corpus).exists():
        raise EmbgeomError(f"corpus {corpus} does not exist; pass a .txt, .jsonl, .csv, .parquet file or a datasets directory")
    target = resolve_device(shard.device(cfg.device))  # --device cuda without a GPU: before any loading
    # The tokenizer first: the corpus is read and counted before the weights load,
    # so bad input is reported before a large model spends minutes loading.
    opened = open_model(model, revision=revision, cache_dir=cache_dir, progress=progress)
    tok, max_length = opened.tokenizer, opened.max_length
    prefix, suffix = opened.special_prefix_suffix
    return Source(None, opened, tok, prefix, suffix, max_length, target)


def window_plan(cfg: AnalysisConfig, source: Source) -> WindowPlan:
    """The windows of this run; fixes cfg.seq_len (run.json records the length used)."""
    cfg.seq_len = default_seq_len(cfg.seq_len, source.max_length)
    plan = WindowPlan(
        seq_len=cfg.seq_len,
        prefix=tuple(source.prefix),
        suffix=tuple(source.suffix),
        special_ids=frozenset(int(i) for i in getattr(source.tokenizer, "all_special_ids", []) or []),
        exclude_special=cfg.exclude_special,
        exclude_positions=cfg.exclude_positions,
        max_tokens=cfg.max_tokens,
    )
    validate_plan(plan, source.max_length)
    return plan


@dataclass
class Counts:
    """What the pre-pass found: windows, counted tokens, documents used, distinct
    token types (None without per-type statistics), the windows the outlier
    threshold is calibrated on (0: all) and the windows kept for the stream (None:
    too many, the stream tokenizes again)."""

    windows: int
    tokens: int
    documents: int
    n_types: int | None
    head: int
    kept: list | None


def count_windows(docs, tok, plan: WindowPlan, cfg: AnalysisConfig, type_of, keep_tokens: int) -> Counts:
    """Pre-pass with the tokenizer alone: validates the corpus before any model work,
    gives the progress bar its total and sizes the per-type accumulators. Windows of
    at most `keep_tokens` tokens in all are kept for the stream."""
    with_types = cfg.token_types != "none"
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
            if kept_tokens > keep_tokens or ids.size and int(ids.max()) > np.iinfo(np.int32).max:
                kept = None
            else:
                kept.append(Window(w.index, w.doc, w.start, ids.astype(np.int32), w.counted))
    if n_counted == 0:
        raise EmbgeomError("no token is counted: the corpus is empty after tokenization or every position is excluded")
    n_types_expected = len({int(type_of[i]) for i in seen_types}) if type_of is not None else len(seen_types)
    if not with_types:
        n_types_expected = None
    return Counts(n_windows, n_counted, len(docs_used), n_types_expected, head, kept)


def load_weights(source: Source, cfg: AnalysisConfig, shard: Shard, n_types: int | None, sharers: int,
                 progress: bool) -> tuple[LoadedModel, float]:
    """(the loaded model, seconds spent loading its weights); an opened model's
    statistics are checked against memory from its config first."""
    if source.loaded is not None:
        return source.loaded, 0.0
    # From the config: a run that cannot fit is refused before the weights load (a
    # --type-layers past the config's depth is left to the exact check once loaded).
    _check_config_memory(source.opened, cfg, n_types, source.target, sharers)
    t = time.perf_counter()
    loaded = source.opened.load(dtype=cfg.dtype, device=shard.device(cfg.device), device_map=cfg.device_map,
                                progress=progress)
    return loaded, time.perf_counter() - t


@dataclass
class Prepared:
    """What the run knows before the weights load: the model's tokenizer side, the
    window plan, the token-type table (vocabulary id -> type id, or None) and its
    texts (type ids -> texts, or None), the pre-pass's counts, the corpus record, and
    the seconds spent opening the model (from the run's start) and counting."""

    source: Source
    plan: WindowPlan
    type_of: object
    type_text: object
    counts: Counts
    corpus_record: dict
    t_load: float
    t_count: float


def prepare_run(model, corpus, docs, cfg: AnalysisConfig, shard: Shard, *, revision, cache_dir, progress: bool,
                t0: float, keep_tokens: int) -> Prepared:
    """Open `model` without its weights, plan the windows and count them over `docs`;
    `t0`: the run's start (perf_counter)."""
    from ..models import _quiet_transformers

    _quiet_transformers()  # long documents are windowed here, not truncated: no length warnings
    source = open_source(model, corpus, cfg, shard, revision=revision, cache_dir=cache_dir, progress=progress)
    t_load = time.perf_counter() - t0
    plan = window_plan(cfg, source)
    tok = source.tokenizer
    type_of, type_text = token_type_table(tok, cfg.token_types) if cfg.token_types != "none" else (None, None)
    t1 = time.perf_counter()
    counts = count_windows(docs, tok, plan, cfg, type_of, keep_tokens)
    corpus_record = _corpus_record(corpus)
    return Prepared(source, plan, type_of, type_text, counts, corpus_record, t_load, time.perf_counter() - t1)
