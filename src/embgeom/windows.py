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


# A document longer than this many characters is tokenized in pieces of about
# PIECE_CHARS, so the text tokenized (and the tokenizer's memory) does not grow with
# the document beyond what the windows use.
LONG_DOC_CHARS = 1 << 17
PIECE_CHARS = 1 << 16
# Characters of text kept on each side of the tokens a piece gives: a token's
# neighbourhood that can change its tokenization is far shorter.
CONTEXT_CHARS = 1024


def _encode(tokenizer, texts, offsets: bool = False):
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False,
                     return_offsets_mapping=offsets)


def _whitespace_before(doc: str, i: int, floor: int) -> int:
    """The largest j in (floor, i] with doc[j] a whitespace character, or -1."""
    for j in range(i, floor, -1):
        if doc[j].isspace():
            return j
    return -1


def _pieces(doc: str, tokenizer, piece: int, context: int) -> Iterator[list]:
    """The token ids of `doc`, in runs, each tokenized from a piece of at most
    piece + 4 × context characters; the runs joined equal the ids of the whole document.

    Each piece is cut at whitespace and reaches `context` characters or more past
    both ends of the run it gives: a run starts at the token where the previous one
    ended (that boundary must be reproduced, or the piece is not used), and ends at
    the first token starting within `context` characters of the piece's end, which
    the next piece tokenizes again with the text that follows (the carried tail).
    Where that cannot be done (no whitespace to cut at, a boundary not reproduced),
    the rest of the document is tokenized whole, as without pieces."""
    n, cut = len(doc), 0
    while cut < n:
        lo = 0 if cut == 0 else _whitespace_before(doc, max(0, cut - context), max(-1, cut - 4 * context))
        hi = n if cut + piece >= n else _whitespace_before(doc, cut + piece, cut + 2 * context)
        if lo < 0 or hi < 0:
            break
        enc = _encode(tokenizer, doc[lo:hi], offsets=True)
        ids, starts = enc["input_ids"], [lo + a for a, _ in enc["offset_mapping"]]
        first = next((i for i, a in enumerate(starts) if a >= cut), len(starts))
        if cut > 0 and (first == len(starts) or starts[first] != cut):
            break  # the boundary is not reproduced: no safe cut here
        if hi == n:
            yield ids[first:]
            return
        last = next((i for i in range(first, len(starts)) if starts[i] >= hi - context), len(starts))
        if last <= first or last == len(starts):
            break
        yield ids[first:last]
        cut = starts[last]
    # The rest of the document from one call on all of it (right whatever the tokenizer does).
    enc = _encode(tokenizer, doc, offsets=True)
    yield enc["input_ids"][sum(1 for a, _ in enc["offset_mapping"] if a < cut):]


def _tokenize_chunks(documents: Iterable[str], tokenizer, chunk: int = 64, chunk_chars: int = 1 << 18) -> Iterator:
    """For each document, an iterator of its token ids in runs (joined: the ids of the
    whole document). Short documents are tokenized in groups of up to `chunk`
    documents or `chunk_chars` characters; a document longer than LONG_DOC_CHARS in
    pieces (see `_pieces`), lazily, so a consumer that stops early (max_tokens)
    tokenizes only about what it used."""
    buf: list = []
    chars = 0
    # Offsets (fast tokenizers) are needed to check where a piece's tokens start.
    piecewise = bool(getattr(tokenizer, "is_fast", False))

    def encode(docs):
        for ids in _encode(tokenizer, docs)["input_ids"]:
            yield iter((ids,))

    for doc in documents:
        if piecewise and len(doc) > LONG_DOC_CHARS:
            if buf:
                yield from encode(buf)
                buf, chars = [], 0
            yield _pieces(doc, tokenizer, PIECE_CHARS, CONTEXT_CHARS)
            continue
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
    for doc_index, runs in enumerate(_tokenize_chunks(documents, tokenizer)):
        pending: list = []  # ids not yet in a window
        start = 0
        more = True
        while more:
            run = next(runs, None)
            more = run is not None
            if more:
                pending.extend(run)
            while len(pending) >= step or (not more and pending):
                content, pending = pending[:step], pending[step:]
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
                start += step


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
