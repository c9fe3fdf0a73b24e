"""The compute paths of :class:`embgeom.stats.token_moments.TokenMoments`: the rows of
a batch's types in the accumulator's sorted index, and the per-type residual sums
and Chan et al. update of one batch.

One rule picks the path (:func:`embgeom._numba.serves`): on the CPU, compiled
loops (numba, :mod:`._compiled`) read the batch once, type by type, keeping each
type's float64 sums in cache, and a second loop updates the touched rows; on an
accelerator the same arithmetic runs as whole-batch torch operations. Both are
float64 throughout (exact float32→float64 conversion) and differ only in the order
of the terms of a sum.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import _numba
from ..errors import EmbgeomError
from ._token_groups import TokenGroups

_I64 = torch.int64
_F64 = torch.float64


def _compiled():
    from . import _compiled as module  # imports numba: only when a compiled loop runs

    return module


def update(acc, x: torch.Tensor, g: TokenGroups) -> None:
    """Add the batch ``x`` (on the accumulator's device) grouped by ``g``.

    Reference point per type: its stored mean, or for a type new to the accumulator
    its first vector here, written (exactly, in float64) into the free row it will
    get. Nothing is committed until the batch is summed and found finite: free rows
    keep count 0 and S 0, and are not in the index. Then Σ y and Σ ‖y‖² per type,
    y = x − ref in float64 (one rounding of the small residual), and the Chan et al.
    update per type."""
    ids = g.ids
    if _numba.serves(acc.device):
        rows, new_pos = _provisional_rows_compiled(acc, ids)
        _sums_compiled(acc, x, g, rows, new_pos)
    else:
        rows, new_pos = provisional_rows(acc, ids, lookup(acc, ids))
        _sums_torch(acc, x, g, rows, new_pos)
    commit_rows(acc, ids.index_select(0, new_pos))


def lookup(acc, ids: torch.Tensor) -> torch.Tensor:
    """Rows of `ids` (any order), -1 where the type is not stored. Read-only."""
    k = acc._k
    if k == 0:
        return torch.full_like(ids, -1)
    pos = torch.searchsorted(acc._sorted_ids, ids).clamp_(max=k - 1)
    found = acc._sorted_ids[pos] == ids
    return torch.where(found, acc._sorted_rows[pos], torch.full_like(ids, -1))

def provisional_rows(acc, ids: torch.Tensor, rows: torch.Tensor):
    """Rows for the ids with row -1 (not stored), taken from the free rows k, k+1, …
    in ascending id order, without storing anything: until ``_commit_rows`` they
    stay free (count 0, S 0; their means may be written as scratch). Returns
    (rows with the new ones filled in, positions of the new ids in `ids`)."""
    missing = rows < 0
    new_pos = missing.nonzero().squeeze(1)
    p = int(new_pos.shape[0])
    if p == 0:
        return rows, new_pos
    k = acc._k
    acc._reserve(k + p)
    rows = rows.clone()
    rows.index_copy_(0, new_pos, torch.arange(k, k + p, dtype=_I64, device=acc._device))
    return rows, new_pos

def _provisional_rows_compiled(acc, ids: torch.Tensor):
    """`_provisional_rows(ids, _lookup(ids))` on CPU in one compiled merge walk
    of the sorted index (ids are ascending)."""
    k = acc._k
    rows, is_new = _compiled().lookup_rows(acc._sorted_ids.numpy(), acc._sorted_rows.numpy(), ids.numpy(), k)
    new_pos = torch.from_numpy(np.flatnonzero(is_new))
    acc._reserve(k + int(new_pos.shape[0]))
    return torch.from_numpy(rows), new_pos

def commit_rows(acc, new_ids: torch.Tensor) -> None:
    """Make rows k..k+p-1 (from ``_provisional_rows``) the rows of `new_ids`
    (ascending, distinct, not stored yet): merge them into the sorted index in
    O(k + p), without a full sort."""
    p = int(new_ids.shape[0])
    if p == 0:
        return
    k, dev = acc._k, acc._device
    if _numba.serves(dev):
        out_ids, out_rows = _compiled().insert_sorted(acc._sorted_ids.numpy(), acc._sorted_rows.numpy(),
                                                   new_ids.numpy(), k)
        acc._sorted_ids, acc._sorted_rows = torch.from_numpy(out_ids), torch.from_numpy(out_rows)
        acc._k = k + p
        return
    new_rows = torch.arange(k, k + p, dtype=_I64, device=dev)
    if k == 0:
        acc._sorted_ids, acc._sorted_rows = new_ids.clone(), new_rows
    else:
        old_ids, old_rows = acc._sorted_ids, acc._sorted_rows
        dest_new = torch.searchsorted(old_ids, new_ids) + torch.arange(p, dtype=_I64, device=dev)
        dest_old = torch.searchsorted(new_ids, old_ids) + torch.arange(k, dtype=_I64, device=dev)
        merged_ids = torch.empty(k + p, dtype=_I64, device=dev)
        merged_rows = torch.empty(k + p, dtype=_I64, device=dev)
        merged_ids[dest_old] = old_ids
        merged_ids[dest_new] = new_ids
        merged_rows[dest_old] = old_rows
        merged_rows[dest_new] = new_rows
        acc._sorted_ids, acc._sorted_rows = merged_ids, merged_rows
    acc._k = k + p

def insert_missing(acc, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Give new rows (count 0, S 0; mean unset) to the ids with row -1. `ids` must
    be ascending and distinct. Returns the full row vector."""
    rows, new_pos = provisional_rows(acc, ids, rows)
    commit_rows(acc, ids.index_select(0, new_pos))
    return rows


def non_finite(x) -> EmbgeomError:
    return EmbgeomError(f"batch of shape {tuple(x.shape)} holds NaN or infinite values; nothing was added")

def _sums_compiled(acc, x, g: TokenGroups, rows, new_pos) -> None:
    """CPU: one compiled pass over the batch for the sums (it also writes the
    first vector of each new type into that type's free row, its reference),
    one over the touched rows for the update (see `_compiled`)."""
    c = _compiled()
    xn = _numba.as_array(x)
    starts = g.starts.numpy()
    m = starts.shape[0]
    rows_n = rows.numpy()
    s1 = _numba.scratch("token_sums", m, acc.dim)  # this thread's, reused by the next batch
    s2 = np.empty(m)
    new = np.zeros(m, dtype=np.bool_)
    new[new_pos.numpy()] = True
    with _numba.parallel() as threads:
        chunks = _numba.row_chunks(starts, g.n, 4 * threads)
        c.type_residual_sums(xn, g.perm.numpy(), starts, rows_n, acc._mean.numpy(), new, s1, s2,
                                    chunks)
        # A NaN or inf anywhere makes its type's Σ‖y‖², hence the total,
        # non-finite; the state is untouched so far.
        if not math.isfinite(float(s2.sum())):
            raise non_finite(x)
        c.merge_type_sums(rows_n, g.counts.numpy(), s1, s2, acc._mean.numpy(), acc._m2.numpy(),
                                 acc._counts.numpy())

def _sums_torch(acc, x, g: TokenGroups, rows, new_pos) -> None:
    """Any device: the batch in one pass of whole-batch operations."""
    dev = x.device
    p = int(new_pos.shape[0])
    if p:  # the new rows are k, k+1, … in id order; their reference: the first vector
        k = acc._k
        acc._mean[k : k + p].copy_(x.index_select(0, g.first.index_select(0, new_pos)))
    m = int(g.ids.shape[0])
    counts = g.counts
    xs = x if g.presorted else x.index_select(0, g.perm)
    y = xs.to(_F64)
    if y.data_ptr() == x.data_ptr():
        y = y.clone()
    y -= acc._mean.index_select(0, rows.index_select(0, g.sorted_inverse))
    s1 = torch.zeros(m, acc.dim, dtype=_F64, device=dev).index_add_(0, g.sorted_inverse, y)
    s2 = torch.zeros(m, dtype=_F64, device=dev).index_add_(
        0, g.sorted_inverse, torch.linalg.vector_norm(y, dim=1).square_())
    # A NaN or inf anywhere makes its row's ‖y‖², hence s2, non-finite.
    if not bool(torch.isfinite(s2.sum())):
        raise non_finite(x)
    # Chan et al. update per type, vectorised. With n_b = count here, ȳ = Σy/n_b:
    #   μ_b = ref + ȳ,  S_b = Σ‖y‖² − ‖Σy‖²/n_b,  n = n_a + n_b,
    #   μ = μ_a + (μ_b − μ_a) n_b/n = ref + Σy/n   (ref = μ_a, or n_a = 0),
    #   S = S_a + S_b + ‖μ_b − μ_a‖² n_a n_b/n = S_a + S_b + (‖Σy‖²/n_b) n_a/n.
    n_a = acc._counts.index_select(0, rows)
    n_tot = n_a + counts
    inv_n = n_tot.to(_F64).reciprocal_()
    qc = torch.linalg.vector_norm(s1, dim=1).square_().div_(counts.to(_F64))
    m2 = s2.sub_(qc).clamp_(min=0.0)
    m2 += qc.mul_(n_a.to(_F64)).mul_(inv_n)
    m2 += acc._m2.index_select(0, rows)
    acc._mean.index_add_(0, rows, s1.mul_(inv_n[:, None]))
    acc._m2.index_copy_(0, rows, m2)
    acc._counts.index_copy_(0, rows, n_tot)


def gather_means(acc, rows, found) -> torch.Tensor:
    """Stored means of `rows`, zero where the type is not stored (row -1)."""
    if acc._k == 0:
        return torch.zeros(rows.shape[0], acc.dim, dtype=_F64, device=acc._device)
    mean = acc._mean.index_select(0, rows.clamp(min=0))
    return torch.where(found[:, None], mean, 0.0)

def combine(acc, rows, n_b, mean_a, delta, m2_b) -> None:
    """Chan et al. parallel update of rows `rows` (distinct) with batch parts:
    counts n_b (int64), δ = μ_b − μ_a, centred sums of squares m2_b. `mean_a`
    (the rows' current means, a private copy) is updated in place."""
    n_a = acc._counts.index_select(0, rows)
    n_tot = n_a + n_b
    w = n_b.to(_F64) / n_tot.to(_F64)
    m2 = torch.linalg.vector_norm(delta, dim=1).square_().mul_(n_a.to(_F64) * w)
    m2 += acc._m2.index_select(0, rows)
    m2 += m2_b
    acc._mean.index_copy_(0, rows, mean_a.addcmul_(delta, w[:, None]))
    acc._m2.index_copy_(0, rows, m2)
    acc._counts.index_copy_(0, rows, n_tot)
