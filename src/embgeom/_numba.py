"""Shared plumbing of the compiled CPU loops (numba), below both metrics/ and stats/.

The rule for which path runs is one line, :func:`serves`: the compiled loops serve
every tensor on the CPU (numba is a dependency of embgeom); tensors on an
accelerator go through torch. Importing numba and loading the cached machine code
costs about a second per process, so nothing here imports numba until a compiled
loop is about to run (:func:`numba`); ``embgeom --help`` never pays it.

Compiled code is cached on disk (``cache=True``): only the first run on a machine
compiles. The parallel loops use numba's own "workqueue" thread pool (its OpenMP
layer would share, and reset, the thread count of torch's OpenMP runtime); that
layer does not nest, so parallel loops are launched only with :data:`LOCK` held
(:func:`parallel`).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading

import numpy as np

# numba importable? Checked without importing it (that is the expensive part).
AVAILABLE = importlib.util.find_spec("numba") is not None

_NUMBA = None


def numba():
    """The numba module, imported on first use with its threading layer selected."""
    global _NUMBA
    if _NUMBA is None:
        import numba as module

        if not os.environ.get("NUMBA_THREADING_LAYER"):
            module.config.THREADING_LAYER = "workqueue"
        _NUMBA = module
    return _NUMBA


def serves(device) -> bool:
    """Whether the compiled loops serve tensors on `device`: on the CPU, always."""
    return AVAILABLE and device.type == "cpu"


# The workqueue layer must not be entered from two threads at once.
LOCK = threading.Lock()


@contextlib.contextmanager
def parallel():
    """Hold LOCK with the parallel loops set to torch's thread count; yields it."""
    import torch

    with LOCK:
        nb = numba()
        threads = max(1, min(torch.get_num_threads(), nb.config.NUMBA_NUM_THREADS))
        nb.set_num_threads(threads)
        yield threads


def as_array(x) -> np.ndarray:
    """A CPU torch tensor as a C-contiguous float32 or float64 numpy array (no copy
    when it already is one; half precision converts to float32 exactly)."""
    import torch

    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)
    return np.ascontiguousarray(x.detach().numpy())


_SCRATCH = threading.local()


def scratch(name: str, rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) float64 work array, reused between calls (per thread and
    name): a fresh multi-megabyte array per batch and layer costs a page fault per
    4 KiB on its first write. The caller must be done with it before asking for
    the same name again."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    need = rows * cols
    buf = bufs.get(name)
    if buf is None or buf.shape[0] < need:
        buf = bufs[name] = np.empty(max(need, 1), dtype=np.float64)
    return buf[:need].reshape(rows, cols)


def row_chunks(starts: np.ndarray, n_rows: int, parts: int) -> np.ndarray:
    """Boundaries (in units of groups) splitting groups with row offsets `starts`
    ((m,) ascending, group g holds rows starts[g]:starts[g+1], the last ends at
    n_rows) into at most `parts` runs of about equal rows, so that a parallel loop
    over runs is balanced even when one group is much larger than the others."""
    m = starts.shape[0]
    if m == 0:
        return np.zeros(1, dtype=np.int64)
    targets = np.linspace(0, n_rows, parts + 1)[1:-1]
    cut = np.searchsorted(starts, targets, side="left")
    return np.unique(np.concatenate(([0], cut, [m]))).astype(np.int64)
