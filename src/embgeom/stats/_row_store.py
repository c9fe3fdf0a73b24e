"""The growable (rows, d) float64 table of per-type means of TokenMoments."""
from __future__ import annotations

import mmap

import numpy as np
import torch

_F64 = torch.float64
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
