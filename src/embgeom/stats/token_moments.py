"""`TokenMoments`: exact streaming moments per token type (paper B; tokens.parquet
and the V_within, V_between, mv_* columns).

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
* on CPU a compiled loop (numba) reads the batch once, type by type, keeping each
  type's float64 sums in cache; a second one updates the touched rows. Off the
  CPU the same arithmetic runs as whole-batch torch operations (:mod:`._token_update`);
* the batch's per-type mean and centred sum of squares follow without cancellation:
  μ_b = r + ȳ, S_b = Σ ‖y‖² − n_b ‖ȳ‖² with ȳ = Σ y / n_b small;
* it is merged into the running state per type, vectorised over types, with the
  parallel update of Chan, Golub & LeVeque (1979): δ = μ_b − μ_a, n = n_a + n_b,
  μ = μ_a + δ n_b/n, S = S_a + S_b + ‖δ‖² n_a n_b/n (with r = μ_a, μ = r + Σy/n).

The state is touched only after the whole batch was summed and found finite, so a
batch with a NaN or inf raises EmbgeomError and adds nothing. It runs on the device
of the state (CUDA included): compiled loops on CPU, torch operations elsewhere.

Accumulators merge exactly the same way (``merge``), so shards and ranks combine.

Group a batch's ids once for many layers with ``TokenMoments.group`` (see
:class:`TokenGroups`).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from .._validate import as_float_matrix
from ..errors import EmbgeomError
from . import _state
from ..metrics.tradeoff import norm_variance_tradeoff
from . import _token_pool, _token_update
from ._row_store import _RowStore
from ._token_groups import TokenGroups

__all__ = ["TokenMoments", "TokenGroups"]

_I64 = torch.int64
_F64 = torch.float64


class TokenMoments:
    """Streaming, mergeable per-token-type moments (paper B): for each token type t,
    n_t, the mean μ_t and V_t = (1/n_t) Σ ‖x − μ_t‖² in float64, so that
    Q_t = M_t + V_t with M_t = ‖μ_t‖², and over all vectors V = V_within + V_between,
    V_within = Σ (n_t/N) V_t, V_between = Σ (n_t/N) ‖μ_t − μ‖² (see the module
    docstring for the update, which never subtracts raw sums).

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

    Reference: H. Yamagiwa, H. Shimodaira (2025), "Norm of Mean Contextualized Embeddings
    Determines their Variance", COLING.

    >>> import numpy as np
    >>> from embgeom import TokenMoments
    >>> rng = np.random.default_rng(0)
    >>> ids = rng.integers(0, 3, size=1000)            # three token types
    >>> x = rng.normal(size=(1000, 4)) + 3.0 * ids[:, None]
    >>> t = TokenMoments(4).update(x, ids)
    >>> t.table()[["token_id", "n", "M", "V"]].round(2).to_numpy().tolist()
    [[0.0, 315.0, 0.01, 4.14], [1.0, 330.0, 35.31, 3.94], [2.0, 355.0, 145.81, 3.81]]
    >>> {k: round(v, 2) for k, v in t.decomposition().items()}
    {'V': 28.6, 'V_within': 3.96, 'V_between': 24.65}
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

        _token_update.update(self, x, g)
        self.n += nb
        return self

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

        rows = _token_update.lookup(self, ids)
        mean_a = _token_update.gather_means(self, rows, rows >= 0)
        rows = _token_update.insert_missing(self, ids, rows)
        _token_update.combine(self, rows, n_b, mean_a, mean_b - mean_a, m2_b)
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
        """The pooled moments of the stored `rows` (see ``_token_pool.pool``)."""
        return _token_pool.pool(self, rows)

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
    def from_state_dict(cls, sd: dict, device=None, *, capacity: int = 0) -> "TokenMoments":
        """Rebuild an accumulator from ``state_dict()`` exactly (on `device`, default
        CPU), with room for `capacity` types; a state no accumulator could have
        written is refused (EmbgeomError)."""
        k_ = "TokenMoments"
        _state.check_kind(sd, k_)
        dim = _state.count(_state.entry(sd, k_, "dim"), k_, "dim", low=1)
        total = _state.count(_state.entry(sd, k_, "n"), k_, "n")
        ids = _state.tensor(_state.entry(sd, k_, "token_ids"), k_, "token_ids", (None,), floating=False).to(_I64)
        k = int(ids.shape[0])
        counts = _state.tensor(_state.entry(sd, k_, "counts"), k_, "counts", (k,), floating=False).to(_I64)
        mean = _state.tensor(_state.entry(sd, k_, "mean"), k_, "mean", (k, dim)).to(_F64)
        m2 = _state.non_negative(_state.tensor(_state.entry(sd, k_, "m2"), k_, "m2", (k,)).to(_F64), k_, "m2")
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
