"""Documents -> token windows -> padded batches, with the mask of counted tokens.

Documents are tokenized without special tokens and split into consecutive windows of
at most `seq_len` tokens including the model's own special tokens; nothing is
truncated. `max_tokens` stops the stream at exactly that many counted tokens: the
last window is run whole (same context as without the limit) but only its first
counted positions up to the limit are counted.
Windows are pooled and sorted by length before batching so little is padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from .errors import EmbgeomError, option

# A sampled token's key: (window index << POSITION_BITS) | position in window. Windows
# are numbered in corpus order, so keys do not depend on batching or sharding.
POSITION_BITS = 20
# The window length when none is given (the model's own limit when that is less).
DEFAULT_SEQ_LEN = 512


@dataclass(frozen=True)
class WindowPlan:
    """How windows are cut and which of their positions are counted."""

    seq_len: int
    prefix: tuple  # special-token ids the tokenizer puts before a sequence
    suffix: tuple  # ... and after it
    special_ids: frozenset = frozenset()
    exclude_special: bool = False
    exclude_positions: tuple = ()
    max_tokens: int | None = None

    @property
    def content_len(self) -> int:
        return self.seq_len - len(self.prefix) - len(self.suffix)

    def counted_mask(self, ids: Sequence[int]) -> np.ndarray:
        """Which positions of one window (ids with specials, no padding) are counted."""
        ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64)).reshape(1, -1)
        return self.counted_in_batch(ids_t, torch.tensor([len(ids)]))[0].numpy()

    def counted_in_batch(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: the counted positions of padded rows `ids` whose first
        `lengths` positions are real (special tokens and excluded positions off;
        negative positions count from each row's end)."""
        B, T = ids.shape
        lengths = lengths.to(ids.device)
        pos = torch.arange(T, device=ids.device).expand(B, T)
        keep = pos < lengths[:, None]
        if self.exclude_special and self.special_ids:
            keep &= ~torch.isin(ids, torch.tensor(sorted(self.special_ids), dtype=ids.dtype, device=ids.device))
        for p in self.exclude_positions:
            q = torch.full_like(lengths, p) if p >= 0 else lengths + p
            keep &= pos != q[:, None]
        return keep


@dataclass
class Window:
    index: int  # position of the window in the stream
    doc: int  # document index in corpus order
    start: int  # offset of the first content token in the document's tokens
    ids: list
    counted: np.ndarray  # bool per position


def validate_plan(plan: WindowPlan, max_length: int | None) -> None:
    if plan.seq_len < 1:
        raise EmbgeomError(f"{option('seq_len')} must be a positive integer, got {plan.seq_len}")
    if plan.content_len < 1:
        raise EmbgeomError(
            f"{option('seq_len', plan.seq_len)} leaves no room for text after the model's "
            f"{len(plan.prefix) + len(plan.suffix)} special tokens; use a larger {option('seq_len')}"
        )
    if max_length is not None and plan.seq_len > max_length:
        raise EmbgeomError(
            f"{option('seq_len', plan.seq_len)} is longer than this model accepts ({max_length} positions); "
            f"use {option('seq_len', max_length)} or less"
        )
    if plan.max_tokens is not None and plan.max_tokens < 1:
        raise EmbgeomError(f"{option('max_tokens')} must be a positive integer, got {plan.max_tokens}")
    if plan.seq_len >= 1 << POSITION_BITS:
        raise EmbgeomError(f"{option('seq_len', plan.seq_len)} is too large (at most {(1 << POSITION_BITS) - 1})")


def default_seq_len(seq_len: int | None, max_length: int | None) -> int:
    """The window length: `seq_len` when given, else min(DEFAULT_SEQ_LEN, the
    model's positions), so a model with fewer positions needs no option."""
    if seq_len is not None:
        return seq_len
    return DEFAULT_SEQ_LEN if max_length is None else min(DEFAULT_SEQ_LEN, max_length)


def _tokenize_chunks(documents: Iterable[str], tokenizer, chunk: int = 64, chunk_chars: int = 1 << 18) -> Iterator[list]:
    """Token ids of each document, tokenized in groups of up to `chunk` documents or
    `chunk_chars` characters (long documents, e.g. whole articles, would otherwise
    make a group's tokenizer output the largest allocation of the run)."""
    buf: list = []
    chars = 0

    def encode(docs):
        return tokenizer(docs, add_special_tokens=False, return_attention_mask=False,
                         return_token_type_ids=False)["input_ids"]

    for doc in documents:
        buf.append(doc)
        chars += len(doc)
        if len(buf) == chunk or chars >= chunk_chars:
            yield from encode(buf)
            buf, chars = [], 0
    if buf:
        yield from encode(buf)


def iter_windows(documents: Iterable[str], tokenizer, plan: WindowPlan) -> Iterator[Window]:
    """Consecutive windows of every document, in corpus order, until max_tokens."""
    pre, suf = list(plan.prefix), list(plan.suffix)
    step = plan.content_len
    remaining = plan.max_tokens
    index = 0
    for doc_index, ids in enumerate(_tokenize_chunks(documents, tokenizer)):
        for start in range(0, len(ids), step):
            content = ids[start : start + step]
            full = pre + content + suf
            counted = plan.counted_mask(full)
            k = int(counted.sum())
            if remaining is not None and k >= remaining:
                # The last window keeps its full context; only its first `remaining`
                # counted positions are counted, so exactly max_tokens are.
                if k > remaining:
                    counted = counted & (np.cumsum(counted) <= remaining)
                yield Window(index, doc_index, start, full, counted)
                return
            if k > 0:
                yield Window(index, doc_index, start, full, counted)
                index += 1
                if remaining is not None:
                    remaining -= k


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long
    counted: torch.Tensor  # (B, T) bool: attended and not excluded
    window_index: torch.Tensor  # (B,) long
    n_counted: int
    doc_index: torch.Tensor | None = None  # (B,) long
    head: bool = False  # one of the first windows, batched apart (see iter_batches)

    def to(self, device) -> "Batch":
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.counted.to(device),
            self.window_index,
            self.n_counted,
            self.doc_index,
            self.head,
        )


def collate(windows: list, pad_id: int) -> Batch:
    T = max(len(w.ids) for w in windows)
    B = len(windows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    cnt = torch.zeros((B, T), dtype=torch.bool)
    for i, w in enumerate(windows):
        n = len(w.ids)
        ids[i, :n] = torch.as_tensor(w.ids, dtype=torch.long)
        att[i, :n] = 1
        cnt[i, :n] = torch.from_numpy(w.counted)
    idx = torch.tensor([w.index for w in windows], dtype=torch.long)
    docs = torch.tensor([w.doc for w in windows], dtype=torch.long)
    return Batch(ids, att, cnt, idx, int(cnt.sum()), docs)


def iter_batches(windows: Iterable[Window], batch_size: int, pad_id: int, pool_batches: int = 32,
                 head: int = 0) -> Iterator[Batch]:
    """Pool windows, sort each pool by length (longest first), cut into batches.

    The first `head` windows of the stream are pooled and batched on their own and
    their batches come first, marked `head=True` (the outlier threshold is
    calibrated on them, whatever the batch size).
    """
    if batch_size < 1:
        raise EmbgeomError(f"--batch-size must be a positive integer, got {batch_size}")
    pool: list = []

    def flush(is_head=False):
        pool.sort(key=lambda w: (-len(w.ids), w.index))
        for i in range(0, len(pool), batch_size):
            b = collate(pool[i : i + batch_size], pad_id)
            b.head = is_head
            yield b
        pool.clear()

    in_head = head > 0
    for w in windows:
        if in_head and w.index >= head:
            yield from flush(is_head=True)
            in_head = False
        pool.append(w)
        if not in_head and len(pool) >= batch_size * pool_batches:
            yield from flush()
    if pool:
        yield from flush(is_head=in_head)


def pad_token_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0
