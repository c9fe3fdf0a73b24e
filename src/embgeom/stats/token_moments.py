"""`TokenMoments`: exact streaming moments per token type (paper B, SPEC §2 and §7).

For every token type t that occurs, with X_t its vectors and n_t = |X_t|, it keeps in
float64 the count n_t, the mean μ_t and the scalar sum of squared deviations
S_t = Σ_{x∈X_t} ‖x − μ_t‖² (only the trace of the covariance is needed). From these:

    Q_t = (1/n_t) Σ ‖x‖² = M_t + V_t,   M_t = ‖μ_t‖²,   V_t = S_t / n_t,

and, over all N = Σ n_t vectors with overall mean μ = Σ (n_t/N) μ_t,

    V_within  = Σ_t (n_t/N) V_t,
    V_between = Σ_t (n_t/N) ‖μ_t − μ‖²,      V = V_within + V_between.

Yamagiwa & Shimodaira (COLING 2025, arXiv:2409.11253) accumulate a running float32
mean per type, one Python update per token, and take V = Q − M, which cancels
catastrophically when M ≫ V (vectors far from the origin). Here V is never a
difference of raw sums. Per batch, fully vectorised (no Python loop over tokens or
types):

* the ids are grouped once (one stable sort; rows sorted by type, see TokenGroups);
* every vector x of type t is shifted by a reference point r_t of its type: the
  type's stored mean, or, for a type new to the accumulator, its first vector in the
  batch. The residual y = x − r_t is formed in float64 (exact conversion, a single
  rounding of a small number; no float32 arithmetic anywhere) and summed per type,
  Σ y and Σ ‖y‖², in float64;
* on CPU a compiled loop (numba, see `_kernels`) reads the batch once, type by
  type, keeping each type's float64 sums in cache; a second one updates the
  touched rows. Without numba, and off the CPU, the same arithmetic runs as
  whole-batch torch operations;
* the batch's per-type mean and centred sum of squares follow without cancellation:
  μ_b = r + ȳ, S_b = Σ ‖y‖² − n_b ‖ȳ‖² with ȳ = Σ y / n_b small;
* it is merged into the running state per type, vectorised over types, with the
  parallel update of Chan, Golub & LeVeque (1979): δ = μ_b − μ_a, n = n_a + n_b,
  μ = μ_a + δ n_b/n, S = S_a + S_b + ‖δ‖² n_a n_b/n (with r = μ_a, μ = r + Σy/n).

The state is touched only after the whole batch was summed and found finite, so a
batch with a NaN or inf raises EmbgeomError and adds nothing. It runs on the device
of the state (CUDA included): compiled loops on CPU, torch operations elsewhere.

Accumulators merge exactly the same way (``merge``), so shards and ranks combine.

Reusing one grouping for many layers
------------------------------------
The pipeline updates one accumulator per layer with the *same* token ids. Group the
ids once per batch and hand the result to every layer::

    groups = TokenMoments.group(token_ids)          # a TokenGroups
    for layer, acc in enumerate(per_layer):
        acc.update(hidden[layer], groups)           # no re-grouping

Nothing in a `TokenGroups` depends on an accumulator, so it serves any number of
them; it is moved to an accumulator's device once and cached.
"""
from __future__ import annotations

import math
import mmap

import numpy as np
import pandas as pd
import torch

from .._validate import as_float_matrix
from ..errors import EmbgeomError
from . import _kernels
from ..metrics.tradeoff import norm_variance_tradeoff

__all__ = ["TokenMoments", "TokenGroups"]

_I64 = torch.int64
_F64 = torch.float64
_INT64_MAX = np.iinfo(np.int64).max

_HUGE = 1 << 21


class _RowStore:
    """The (rows, d) float64 means, uninitialised, on a device.

    On CPU a large table lives in an anonymous private memory mapping, for two
    reasons. It grows in place: ``mremap`` moves page tables instead of copying
    (growing a 34 MiB table by doubling would otherwise copy ~70 MiB over a run).
    And it is marked for transparent huge pages (a hint): rows are first touched
    one by one as types appear, and with 4 KiB pages those first touches (a page
    fault every ~1.3 rows at width 384) cost as much as the arithmetic of an update.
    Elsewhere, or where mapping is refused, a plain tensor grown by copying.
    """

    __slots__ = ("map", "tensor")

    def __init__(self, rows: int, dim: int, device):
        self.map = None
        nbytes = rows * dim * 8
        if torch.device(device).type == "cpu" and nbytes >= 2 * _HUGE and hasattr(mmap, "MAP_PRIVATE"):
            try:
                self.map = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
            except (OSError, ValueError):
                self.map = None
        if self.map is None:
            self.tensor = torch.empty(rows, dim, dtype=_F64, device=device)
        else:
            self._view(rows, dim)

    @classmethod
    def wrap(cls, tensor: torch.Tensor) -> "_RowStore":
        store = object.__new__(cls)
        store.map, store.tensor = None, tensor
        return store

    def _view(self, rows: int, dim: int) -> None:
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self.map.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # a hint: kernels without THP refuse it
                pass
        self.tensor = torch.from_numpy(np.frombuffer(self.map, dtype=np.float64, count=rows * dim).reshape(rows, dim))

    def grown(self, rows: int, keep: int) -> "_RowStore":
        """A store of `rows` rows whose first `keep` rows are this one's; this store
        must not be used afterwards."""
        dim = self.tensor.shape[1]
        if self.map is not None:
            self.tensor = None  # release the buffer export so the mapping may move
            try:
                self.map.resize(rows * dim * 8)
            except (BufferError, OSError, ValueError, SystemError):
                # a view still alive somewhere, or no mremap here: copy instead
                self.tensor = torch.from_numpy(np.frombuffer(self.map, dtype=np.float64)).view(-1, dim)
            else:
                self._view(rows, dim)
                return self
        new = _RowStore(rows, dim, self.tensor.device)
        new.tensor[:keep] = self.tensor[:keep]
        return new


def _as_id_vector(token_ids, name: str = "token_ids") -> torch.Tensor:
    """Token ids as a 1-d int64 torch tensor; EmbgeomError for anything else."""
    if isinstance(token_ids, torch.Tensor):
        t = token_ids.detach()
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise EmbgeomError(f"{name} must be integers, got dtype {t.dtype}; pass the token ids, not the vectors")
        if t.ndim != 1:
            raise EmbgeomError(f"{name} must be a 1-d array of shape (n,), got shape {tuple(t.shape)}")
        return t.to(_I64)
    a = np.asarray(token_ids)
    if a.ndim != 1:
        raise EmbgeomError(f"{name} must be a 1-d array of shape (n,), got shape {a.shape}")
    if a.size == 0:
        a = a.astype(np.int64)
    if a.dtype.kind not in "iu":
        raise EmbgeomError(f"{name} must be integers, got dtype {a.dtype}; pass the token ids, not the vectors")
    if a.dtype.kind == "u" and a.dtype.itemsize >= 8 and a.size and int(a.max()) > _INT64_MAX:
        raise EmbgeomError(f"{name} holds {int(a.max())}, beyond the int64 range")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))


class TokenGroups:
    """The grouping of one batch's token ids, computed once and reusable.

    Attributes (torch tensors on one device)
    ----------
    ids : (m,) int64, the distinct token ids of the batch, ascending.
    inverse : (n,) int64, ``ids[inverse] == token_ids``.
    counts : (m,) int64, occurrences of each id in the batch.
    perm : (n,) int64, a stable order of the rows that sorts them by id, so that the
        rows of each type are contiguous: ``inverse[perm]`` is non-decreasing.
    starts : (m,) int64, where each type's rows begin in that order.
    first : (m,) int64, the first position of each id in the batch (``perm[starts]``).
    presorted : bool, whether the ids came in non-decreasing order. Then the rows of
        each type are already contiguous and ``update`` reads the batch in place
        instead of gathering it: a caller that gathers its vectors in id order anyway
        (``x = h[order]`` with ``order = torch.sort(ids, stable=True).indices``)
        saves a pass over the batch.
    n : int, the batch length.

    Build it with ``TokenMoments.group(token_ids)`` (or ``TokenGroups(token_ids)``)
    and pass it to ``TokenMoments.update`` in place of the ids, for as many
    accumulators (layers) as share those ids. It holds nothing specific to an
    accumulator.
    """

    __slots__ = (
        "ids", "inverse", "counts", "perm", "sorted_inverse", "starts", "first", "presorted", "n",
        "_moved",
    )

    def __init__(self, token_ids, device=None):
        t = _as_id_vector(token_ids)
        if device is not None:
            t = t.to(device)
        self.n = n = int(t.shape[0])
        self.presorted = True
        if n == 0:
            e = torch.empty(0, dtype=_I64, device=t.device)
            self.ids = self.inverse = self.counts = self.perm = self.sorted_inverse = self.starts = self.first = e
        elif _kernels.use_kernels(t.device):
            # O(n): a hash table of the distinct ids and a counting sort of the rows
            # (only the distinct ids are sorted), same results as the sort below.
            presorted, *parts = _kernels.group_ids(t.numpy())
            self.presorted = bool(presorted)
            (self.ids, self.counts, self.perm, self.starts, self.sorted_inverse, self.inverse,
             self.first) = (torch.from_numpy(a) for a in parts)
        else:
            # One stable sort gives everything: the order, the distinct ids (where
            # the sorted values change), their counts and each row's type.
            self.presorted = bool((t[1:] >= t[:-1]).all())
            if self.presorted:
                vals, perm = t, torch.arange(n, dtype=_I64, device=t.device)
            else:
                vals, perm = torch.sort(t, stable=True)
            head = torch.ones(n, dtype=torch.bool, device=t.device)
            torch.ne(vals[1:], vals[:-1], out=head[1:])
            sorted_inverse = torch.cumsum(head, 0) - 1
            starts = head.nonzero().squeeze(1)
            counts = torch.diff(starts, append=torch.tensor([n], dtype=_I64, device=t.device))
            self.ids, self.counts, self.starts = vals.index_select(0, starts), counts, starts
            self.perm, self.sorted_inverse = perm, sorted_inverse
            if self.presorted:
                self.inverse = sorted_inverse
            else:
                self.inverse = torch.empty_like(sorted_inverse).index_copy_(0, perm, sorted_inverse)
            self.first = perm.index_select(0, starts)
        self._moved = {}

    @property
    def device(self) -> torch.device:
        return self.ids.device

    def __len__(self) -> int:
        return self.n

    def to(self, device) -> "TokenGroups":
        """This grouping on `device` (cached, so many layers pay for one copy)."""
        device = torch.device(device)
        if device == self.device:
            return self
        g = self._moved.get(device)
        if g is None:
            g = object.__new__(TokenGroups)
            g.n = self.n
            g.presorted = self.presorted
            for name in ("ids", "inverse", "counts", "perm", "sorted_inverse", "starts", "first"):
                setattr(g, name, getattr(self, name).to(device))
            g._moved = {}
            self._moved[device] = g
        return g

    def __repr__(self) -> str:
        return f"TokenGroups(n={self.n}, types={int(self.ids.shape[0])}, device={self.device})"


class TokenMoments:
    """Streaming, mergeable per-token-type moments (SPEC §2, §7; paper B).

    Parameters
    ----------
    dim : int
        Width d of the vectors.
    device : str or torch.device, optional
        Where the float64 state lives; batches are moved there. Defaults to the device
        of the first batch (or merged accumulator).
    capacity : int, optional
        Expected number of distinct token types; rows for that many are allocated up
        front. Without it, rows grow by amortised doubling. Only types that occur are
        stored either way.

    Memory: ``nbytes`` = (8·d + 16)·capacity + 16·types bytes, capacity ≥ types (at
    most twice, unless a larger hint was given). While it runs, an update holds the
    batch's per-type sums, (types in the batch) × d float64 (without the compiled
    CPU loops, also the float64 residuals of the whole batch).

    Usage::

        t = TokenMoments(d)
        t.update(batch, token_ids)          # (n, d) floats, (n,) integer ids
        g = TokenMoments.group(token_ids)   # or: group once, reuse for every layer
        t.update(batch, g)
        t.table(); t.decomposition(); t.tradeoff()
    """

    def __init__(self, dim: int, device=None, capacity: int = 0):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise EmbgeomError(f"TokenMoments(dim) needs a positive integer width, got {dim!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 0:
            raise EmbgeomError(f"TokenMoments(capacity=) must be a non-negative integer, got {capacity!r}")
        self.dim = int(dim)
        self.n = 0  # total vectors seen
        self._capacity_hint = int(capacity)
        self._device = torch.device(device) if device is not None else None
        self._k = 0  # distinct types stored; rows 0..k-1 in order of first appearance
        self._counts = None  # (cap,) int64
        self._mean_store = None  # the (cap, d) float64 means: see the _mean property
        self._m2 = None  # (cap,) float64: Σ ‖x − μ_t‖²
        self._sorted_ids = None  # (k,) int64 ascending
        self._sorted_rows = None  # (k,) int64: row of each sorted id

    # ------------------------------------------------------------------ grouping
    @staticmethod
    def group(token_ids, device=None) -> TokenGroups:
        """Group a batch's token ids once; pass the result to ``update`` of every
        accumulator (layer) that sees the same ids. A TokenGroups is returned as is."""
        if isinstance(token_ids, TokenGroups):
            return token_ids if device is None else token_ids.to(device)
        return TokenGroups(token_ids, device=device)

    # ------------------------------------------------------------------ state
    @property
    def device(self):
        return self._device

    @property
    def _mean(self):
        """The (cap, d) float64 means (None before the first batch). Derived from
        the store on every use and never kept elsewhere, so that the store can move
        its mapping when it grows."""
        return None if self._mean_store is None else self._mean_store.tensor

    @property
    def n_types(self) -> int:
        """Number of distinct token types seen."""
        return self._k

    @property
    def capacity(self) -> int:
        return 0 if self._counts is None else int(self._counts.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors (rows allocated, not only rows used)."""
        total = 0
        for t in (self._counts, self._mean, self._m2, self._sorted_ids, self._sorted_rows):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    @staticmethod
    def nbytes_for(dim: int, capacity: int, types: int) -> int:
        """``nbytes`` of an accumulator of width `dim` with `capacity` rows allocated and
        `types` of them in use: (8·d + 16)·capacity + 16·types."""
        return (8 * dim + 16) * capacity + 16 * types

    def _init_state(self, device) -> None:
        self._device = torch.device(device)
        cap = self._capacity_hint
        dev = self._device
        self._counts = torch.zeros(cap, dtype=_I64, device=dev)
        # Means of unused rows are never read (a new row's mean is written before
        # use), so they stay uninitialised: no page is touched before it is needed.
        self._mean_store = _RowStore(cap, self.dim, dev)
        self._m2 = torch.zeros(cap, dtype=_F64, device=dev)
        self._sorted_ids = torch.zeros(0, dtype=_I64, device=dev)
        self._sorted_rows = torch.zeros(0, dtype=_I64, device=dev)

    def _reserve(self, need: int) -> None:
        cap = self.capacity
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, 64)
        k, dev = self._k, self._device

        def grow(old, new):
            new[:k] = old[:k]
            return new

        self._counts = grow(self._counts, torch.zeros(new_cap, dtype=_I64, device=dev))
        self._mean_store = self._mean_store.grown(new_cap, k)
        self._m2 = grow(self._m2, torch.zeros(new_cap, dtype=_F64, device=dev))

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of `ids` (any order), -1 where the type is not stored. Read-only."""
        k = self._k
        if k == 0:
            return torch.full_like(ids, -1)
        pos = torch.searchsorted(self._sorted_ids, ids).clamp_(max=k - 1)
        found = self._sorted_ids[pos] == ids
        return torch.where(found, self._sorted_rows[pos], torch.full_like(ids, -1))

    def _provisional_rows(self, ids: torch.Tensor, rows: torch.Tensor):
        """Rows for the ids with row -1 (not stored), taken from the free rows k, k+1, …
        in ascending id order, without storing anything: until ``_commit_rows`` they
        stay free (count 0, S 0; their means may be written as scratch). Returns
        (rows with the new ones filled in, positions of the new ids in `ids`)."""
        missing = rows < 0
        new_pos = missing.nonzero().squeeze(1)
        p = int(new_pos.shape[0])
        if p == 0:
            return rows, new_pos
        k = self._k
        self._reserve(k + p)
        rows = rows.clone()
        rows.index_copy_(0, new_pos, torch.arange(k, k + p, dtype=_I64, device=self._device))
        return rows, new_pos

    def _provisional_rows_compiled(self, ids: torch.Tensor):
        """`_provisional_rows(ids, _lookup(ids))` on CPU in one compiled merge walk
        of the sorted index (ids are ascending)."""
        k = self._k
        rows, is_new = _kernels.lookup_rows(self._sorted_ids.numpy(), self._sorted_rows.numpy(), ids.numpy(), k)
        new_pos = torch.from_numpy(np.flatnonzero(is_new))
        self._reserve(k + int(new_pos.shape[0]))
        return torch.from_numpy(rows), new_pos

    def _commit_rows(self, new_ids: torch.Tensor) -> None:
        """Make rows k..k+p-1 (from ``_provisional_rows``) the rows of `new_ids`
        (ascending, distinct, not stored yet): merge them into the sorted index in
        O(k + p), without a full sort."""
        p = int(new_ids.shape[0])
        if p == 0:
            return
        k, dev = self._k, self._device
        if _kernels.use_kernels(dev):
            out_ids, out_rows = _kernels.insert_sorted(self._sorted_ids.numpy(), self._sorted_rows.numpy(),
                                                       new_ids.numpy(), k)
            self._sorted_ids, self._sorted_rows = torch.from_numpy(out_ids), torch.from_numpy(out_rows)
            self._k = k + p
            return
        new_rows = torch.arange(k, k + p, dtype=_I64, device=dev)
        if k == 0:
            self._sorted_ids, self._sorted_rows = new_ids.clone(), new_rows
        else:
            old_ids, old_rows = self._sorted_ids, self._sorted_rows
            dest_new = torch.searchsorted(old_ids, new_ids) + torch.arange(p, dtype=_I64, device=dev)
            dest_old = torch.searchsorted(new_ids, old_ids) + torch.arange(k, dtype=_I64, device=dev)
            merged_ids = torch.empty(k + p, dtype=_I64, device=dev)
            merged_rows = torch.empty(k + p, dtype=_I64, device=dev)
            merged_ids[dest_old] = old_ids
            merged_ids[dest_new] = new_ids
            merged_rows[dest_old] = old_rows
            merged_rows[dest_new] = new_rows
            self._sorted_ids, self._sorted_rows = merged_ids, merged_rows
        self._k = k + p

    def _insert_missing(self, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Give new rows (count 0, S 0; mean unset) to the ids with row -1. `ids` must
        be ascending and distinct. Returns the full row vector."""
        rows, new_pos = self._provisional_rows(ids, rows)
        self._commit_rows(ids.index_select(0, new_pos))
        return rows

    def _gather_means(self, rows, found) -> torch.Tensor:
        """Stored means of `rows`, zero where the type is not stored (row -1)."""
        if self._k == 0:
            return torch.zeros(rows.shape[0], self.dim, dtype=_F64, device=self._device)
        mean = self._mean.index_select(0, rows.clamp(min=0))
        return torch.where(found[:, None], mean, 0.0)

    def _combine(self, rows, n_b, mean_a, delta, m2_b) -> None:
        """Chan et al. parallel update of rows `rows` (distinct) with batch parts:
        counts n_b (int64), δ = μ_b − μ_a, centred sums of squares m2_b. `mean_a`
        (the rows' current means, a private copy) is updated in place."""
        n_a = self._counts.index_select(0, rows)
        n_tot = n_a + n_b
        w = n_b.to(_F64) / n_tot.to(_F64)
        m2 = torch.linalg.vector_norm(delta, dim=1).square_().mul_(n_a.to(_F64) * w)
        m2 += self._m2.index_select(0, rows)
        m2 += m2_b
        self._mean.index_copy_(0, rows, mean_a.addcmul_(delta, w[:, None]))
        self._m2.index_copy_(0, rows, m2)
        self._counts.index_copy_(0, rows, n_tot)

    # ------------------------------------------------------------------ updates
    def update(self, batch, token_ids) -> "TokenMoments":
        """Add a batch: `batch` (n, d) numpy array or torch tensor of any float dtype,
        `token_ids` (n,) integers (any int64 values) or a `TokenGroups` from
        ``TokenMoments.group``. Accumulates in float64; returns self. An empty batch
        is a no-op. On a NaN or infinite value nothing is added and EmbgeomError is
        raised."""
        x = as_float_matrix(batch, "batch", dim=self.dim)
        g = token_ids if isinstance(token_ids, TokenGroups) else TokenGroups(token_ids)
        nb = x.shape[0]
        if g.n != nb:
            raise EmbgeomError(
                f"token_ids has {g.n} entries but batch has {nb} rows (shape {tuple(x.shape)}); "
                "pass one token id per row"
            )
        if nb == 0:
            return self
        if self._mean is None:
            self._init_state(self._device if self._device is not None else x.device)
        dev = self._device
        x = x.detach()
        if x.device != dev:
            x = x.to(dev)
        g = g.to(dev)

        ids = g.ids
        compiled = _kernels.use_kernels(dev)

        # Reference point per type: its stored mean, or for a type new to this
        # accumulator its first vector here, written (exactly, in float64) into the
        # free row it will get. Nothing is committed until the batch is summed and
        # found finite: free rows keep count 0 and S 0, and are not in the index.
        if compiled:
            rows, new_pos = self._provisional_rows_compiled(ids)
        else:
            rows, new_pos = self._provisional_rows(ids, self._lookup(ids))

        # Σ y and Σ ‖y‖² per type, y = x − ref in float64 (the conversion is exact;
        # one rounding of the small residual), then the Chan et al. update per type.
        if compiled:
            self._update_compiled(x, g, rows, new_pos)
        else:
            self._update_torch(x, g, rows, new_pos)
        self._commit_rows(ids.index_select(0, new_pos))
        self.n += nb
        if not compiled and dev.type == "cpu":
            _kernels.count_torch_work(nb, self.dim)  # in "auto" mode, long runs switch to the compiled loops
        return self

    @staticmethod
    def _non_finite(x) -> EmbgeomError:
        return EmbgeomError(f"batch of shape {tuple(x.shape)} holds NaN or infinite values; nothing was added")

    def _update_compiled(self, x, g: TokenGroups, rows, new_pos) -> None:
        """CPU: one compiled pass over the batch for the sums (it also writes the
        first vector of each new type into that type's free row, its reference),
        one over the touched rows for the update (see `_kernels`)."""
        xn = _kernels.as_array(x)
        starts = g.starts.numpy()
        m = starts.shape[0]
        rows_n = rows.numpy()
        s1 = _kernels.scratch("token_sums", m, self.dim)  # this thread's, reused by the next batch
        s2 = np.empty(m)
        new = np.zeros(m, dtype=np.bool_)
        new[new_pos.numpy()] = True
        with _kernels.parallel() as threads:
            chunks = _kernels.row_chunks(starts, g.n, 4 * threads)
            _kernels.type_residual_sums(xn, g.perm.numpy(), starts, rows_n, self._mean.numpy(), new, s1, s2,
                                        chunks)
            # A NaN or inf anywhere makes its type's Σ‖y‖², hence the total,
            # non-finite; the state is untouched so far.
            if not math.isfinite(float(s2.sum())):
                raise self._non_finite(x)
            _kernels.merge_type_sums(rows_n, g.counts.numpy(), s1, s2, self._mean.numpy(), self._m2.numpy(),
                                     self._counts.numpy())

    def _update_torch(self, x, g: TokenGroups, rows, new_pos) -> None:
        """Any device: the batch in one pass of whole-batch operations."""
        dev = x.device
        p = int(new_pos.shape[0])
        if p:  # the new rows are k, k+1, … in id order; their reference: the first vector
            k = self._k
            self._mean[k : k + p].copy_(x.index_select(0, g.first.index_select(0, new_pos)))
        m = int(g.ids.shape[0])
        counts = g.counts
        xs = x if g.presorted else x.index_select(0, g.perm)
        y = xs.to(_F64)
        if y.data_ptr() == x.data_ptr():
            y = y.clone()
        y -= self._mean.index_select(0, rows.index_select(0, g.sorted_inverse))
        s1 = torch.zeros(m, self.dim, dtype=_F64, device=dev).index_add_(0, g.sorted_inverse, y)
        s2 = torch.zeros(m, dtype=_F64, device=dev).index_add_(
            0, g.sorted_inverse, torch.linalg.vector_norm(y, dim=1).square_())
        # A NaN or inf anywhere makes its row's ‖y‖², hence s2, non-finite.
        if not bool(torch.isfinite(s2.sum())):
            raise self._non_finite(x)
        # Chan et al. update per type, vectorised. With n_b = count here, ȳ = Σy/n_b:
        #   μ_b = ref + ȳ,  S_b = Σ‖y‖² − ‖Σy‖²/n_b,  n = n_a + n_b,
        #   μ = μ_a + (μ_b − μ_a) n_b/n = ref + Σy/n   (ref = μ_a, or n_a = 0),
        #   S = S_a + S_b + ‖μ_b − μ_a‖² n_a n_b/n = S_a + S_b + (‖Σy‖²/n_b) n_a/n.
        n_a = self._counts.index_select(0, rows)
        n_tot = n_a + counts
        inv_n = n_tot.to(_F64).reciprocal_()
        qc = torch.linalg.vector_norm(s1, dim=1).square_().div_(counts.to(_F64))
        m2 = s2.sub_(qc).clamp_(min=0.0)
        m2 += qc.mul_(n_a.to(_F64)).mul_(inv_n)
        m2 += self._m2.index_select(0, rows)
        self._mean.index_add_(0, rows, s1.mul_(inv_n[:, None]))
        self._m2.index_copy_(0, rows, m2)
        self._counts.index_copy_(0, rows, n_tot)

    def merge(self, other: "TokenMoments") -> "TokenMoments":
        """Merge another accumulator into this one, in place and exactly (Chan et al.,
        per type); types seen by only one side are copied. Returns self."""
        if not isinstance(other, TokenMoments):
            raise EmbgeomError(f"can only merge a TokenMoments, got {type(other).__name__}")
        if other.dim != self.dim:
            raise EmbgeomError(f"cannot merge TokenMoments of width {other.dim} into width {self.dim}")
        if other.n == 0:
            return self
        if other is self:
            other = TokenMoments.from_state_dict(self.state_dict(), device=self._device)
        if self._mean is None:
            self._init_state(self._device if self._device is not None else other._device)
        dev = self._device
        o_rows = other._sorted_rows
        ids = other._sorted_ids.to(dev)
        n_b = other._counts.index_select(0, o_rows).to(dev)
        mean_b = other._mean.index_select(0, o_rows).to(dev)
        m2_b = other._m2.index_select(0, o_rows).to(dev)

        rows = self._lookup(ids)
        mean_a = self._gather_means(rows, rows >= 0)
        rows = self._insert_missing(ids, rows)
        self._combine(rows, n_b, mean_a, mean_b - mean_a, m2_b)
        self.n += other.n
        return self

    # ------------------------------------------------------------------ results
    def _chunk_rows(self, k: int):
        step = max(16, (1 << 24) // (8 * self.dim))
        for a in range(0, k, step):
            yield a, min(k, a + step)

    def _columns(self):
        """(token_id, n, Q, M, V) as numpy arrays, sorted by token id."""
        k = self._k
        if k == 0:
            e = np.zeros(0)
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), e, e.copy(), e.copy()
        rows = self._sorted_rows
        counts = self._counts.index_select(0, rows)
        M = torch.empty(k, dtype=_F64, device=self._device)
        for a, b in self._chunk_rows(k):
            mu = self._mean.index_select(0, rows[a:b])
            M[a:b] = (mu * mu).sum(1)
        V = self._m2.index_select(0, rows) / counts.to(_F64)
        Q = M + V

        def np_(t):
            return t.detach().cpu().numpy()

        return np_(self._sorted_ids), np_(counts), np_(Q), np_(M), np_(V)

    def table(self) -> pd.DataFrame:
        """One row per token type that occurred, sorted by token_id: columns
        token_id (int64), n (int64), Q, M, V (float64), Q = M + V."""
        tid, n, Q, M, V = self._columns()
        return pd.DataFrame({"token_id": tid, "n": n, "Q": Q, "M": M, "V": V})

    def decomposition(self) -> dict:
        """{'V', 'V_within', 'V_between'} over all N vectors (population 1/N):
        V_within = Σ (n_t/N) V_t, V_between = Σ (n_t/N) ‖μ_t − μ‖², V = their sum.
        NaN for all three before any vector was added."""
        if self._k == 0 or self.n == 0:
            return {"V": math.nan, "V_within": math.nan, "V_between": math.nan}
        out = self._pool(self._sorted_rows)
        return {k: out[k] for k in ("V", "V_within", "V_between")}

    def pooled(self, min_count: int = 1, max_count: int | None = None) -> dict:
        """The moments of the pooled vectors of the types with min_count ≤ n_t ≤
        max_count (None: no upper bound): {'n', 'Q', 'M', 'V', 'V_within', 'V_between'}
        with n = Σ n_t over those types, μ = Σ (n_t/n) μ_t, M = ‖μ‖², V_within and
        V_between as in `decomposition` but over those types, V = V_within + V_between,
        Q = M + V. Yamagiwa & Shimodaira take their layer-level figures over the types
        of their M–V fit only (10 ≤ n_t ≤ 100000). NaN (n = 0) where no type qualifies."""
        nan = math.nan
        empty = {"n": 0, "Q": nan, "M": nan, "V": nan, "V_within": nan, "V_between": nan}
        if self._k == 0 or self.n == 0:
            return empty
        rows = self._sorted_rows
        cnt = self._counts.index_select(0, rows)
        keep = cnt >= int(min_count)
        if max_count is not None:
            keep &= cnt <= int(max_count)
        rows = rows[keep]
        return self._pool(rows) if rows.numel() else empty

    def _pool(self, rows: torch.Tensor) -> dict:
        """n, Q, M, V, V_within, V_between of the pooled vectors of `rows` (stored
        rows, in sorted-id order so the result does not depend on the order in which
        types arrived: a state_dict round trip reproduces it bit for bit)."""
        k = int(rows.shape[0])
        cnt = self._counts.index_select(0, rows).to(_F64)
        N = float(cnt.sum())
        v_within = float(self._m2.index_select(0, rows).sum()) / N
        # Overall mean, as an offset from the most frequent type's mean (pivot), so
        # far-from-origin means lose nothing; then a second, centred pass.
        pivot = self._mean[int(rows[int(torch.argmax(cnt))])].clone()
        chunks = list(self._chunk_rows(k))
        # One chunk (the usual case): gather the means once for both passes.
        whole = self._mean.index_select(0, rows).sub_(pivot) if len(chunks) == 1 else None

        def offsets(a, b):  # μ_t − pivot of rows a:b (the second pass may overwrite it)
            return whole if whole is not None else self._mean.index_select(0, rows[a:b]).sub_(pivot)

        mu_off = torch.zeros(self.dim, dtype=_F64, device=self._device)
        for a, b in chunks:
            mu_off += cnt[a:b] @ offsets(a, b)
        mu_off /= N
        between = 0.0
        for a, b in chunks:
            dd = offsets(a, b).sub_(mu_off)
            between += float(cnt[a:b] @ dd.square_().sum(1))
        v_between = between / N
        mean = pivot + mu_off
        M = float(mean @ mean)
        V = v_within + v_between
        return {"n": int(N), "Q": M + V, "M": M, "V": V, "V_within": v_within, "V_between": v_between}

    def tradeoff(self, min_count: int = 10, max_count: int = 100_000, table: pd.DataFrame | None = None) -> dict:
        """Norm–variance trade-off across the types with min_count ≤ n_t ≤ max_count:
        {'mv_slope', 'mv_intercept', 'mv_r2', 'mv_pearson', 'q_cv', 'n_types'}; see
        `embgeom.metrics.tradeoff.norm_variance_tradeoff` (NaN where fewer than two
        types qualify or M has no spread). `table`: this accumulator's ``table()``,
        if the caller has it already (its columns are used instead of gathering every
        type's mean again)."""
        if table is None:
            _, n, Q, M, V = self._columns()
        else:
            n, Q, M, V = (table[c].to_numpy() for c in ("n", "Q", "M", "V"))
        return norm_variance_tradeoff(M, V, Q, n, min_count=min_count, max_count=max_count)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Plain CPU tensors and ints (torch.save-able), rows sorted by token id:
        kind, version, dim, n, token_ids (k,) int64, counts (k,) int64,
        mean (k, d) float64, m2 (k,) float64 (Σ ‖x − μ_t‖² per type)."""
        k = self._k
        sd = {"kind": "TokenMoments", "version": 1, "dim": self.dim, "n": int(self.n)}
        if k == 0:
            sd.update(
                token_ids=torch.zeros(0, dtype=_I64),
                counts=torch.zeros(0, dtype=_I64),
                mean=torch.zeros(0, self.dim, dtype=_F64),
                m2=torch.zeros(0, dtype=_F64),
            )
            return sd
        rows = self._sorted_rows
        sd.update(
            token_ids=self._sorted_ids.detach().cpu().clone(),
            counts=self._counts.index_select(0, rows).cpu(),
            mean=self._mean.index_select(0, rows).cpu(),
            m2=self._m2.index_select(0, rows).cpu(),
        )
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict, device=None, capacity: int = 0) -> "TokenMoments":
        """Rebuild an accumulator from ``state_dict()`` exactly (on `device`, default CPU)."""
        if not isinstance(sd, dict) or sd.get("kind") != "TokenMoments":
            raise EmbgeomError("not a TokenMoments state_dict (missing kind='TokenMoments')")
        try:
            dim = int(sd["dim"])
            ids = torch.as_tensor(sd["token_ids"]).to(_I64)
            counts = torch.as_tensor(sd["counts"]).to(_I64)
            mean = torch.as_tensor(sd["mean"]).to(_F64)
            m2 = torch.as_tensor(sd["m2"]).to(_F64)
            total = int(sd["n"])
        except KeyError as exc:
            raise EmbgeomError(f"TokenMoments state_dict lacks the entry {exc}") from exc
        except (TypeError, ValueError, RuntimeError) as exc:
            raise EmbgeomError(f"TokenMoments state_dict holds an unreadable entry: {exc}") from exc
        k = int(ids.shape[0])
        if ids.ndim != 1 or counts.shape != (k,) or m2.shape != (k,) or mean.shape != (k, dim):
            raise EmbgeomError(
                f"TokenMoments state_dict shapes disagree: token_ids {tuple(ids.shape)}, counts "
                f"{tuple(counts.shape)}, mean {tuple(mean.shape)}, m2 {tuple(m2.shape)} (dim {dim})"
            )
        if int(counts.sum()) != total or (k and (bool((ids[1:] <= ids[:-1]).any()) or bool((counts < 1).any()))):
            raise EmbgeomError("TokenMoments state_dict is inconsistent (unsorted ids or counts not summing to n)")
        t = cls(dim, device=device, capacity=max(int(capacity), k))
        t._init_state(device if device is not None else "cpu")
        dev = t._device
        t._counts[:k] = counts.to(dev)
        t._mean[:k] = mean.to(dev)
        t._m2[:k] = m2.to(dev)
        t._sorted_ids = ids.to(dev).clone()
        t._sorted_rows = torch.arange(k, dtype=_I64, device=dev)
        t._k = k
        t.n = total
        return t

    def to(self, device) -> "TokenMoments":
        """Move the state to `device` in place; returns self."""
        device = torch.device(device)
        self._device = device
        if self._mean is not None:
            for name in ("_counts", "_m2", "_sorted_ids", "_sorted_rows"):
                setattr(self, name, getattr(self, name).to(device))
            moved = self._mean.to(device)
            if moved is not self._mean:
                self._mean_store = _RowStore.wrap(moved)
        return self

    def __repr__(self) -> str:
        return f"TokenMoments(dim={self.dim}, n={self.n}, types={self._k})"
