"""`TokenGroups`: the grouping of one batch's token ids, computed once and shared by
every accumulator (layer) that sees the same ids.

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

import numpy as np
import torch

from .. import _numba
from ..errors import EmbgeomError

_I64 = torch.int64
_INT64_MAX = np.iinfo(np.int64).max


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
        elif _numba.serves(t.device):
            # O(n): a hash table of the distinct ids and a counting sort of the rows
            # (only the distinct ids are sorted), same results as the sort below.
            from ._compiled import group_ids  # imports numba: only when it runs

            presorted, *parts = group_ids(t.numpy())
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
