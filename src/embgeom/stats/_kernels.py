"""Compiled CPU loops (numba) for the per-batch passes of the accumulators.

Torch expresses a per-type residual sum or a batch's norms, unit sums and centring
only as several whole-batch operations, each a pass over memory with a float64
temporary; these loops read the batch once, keep the float64 work in registers and
cache, and write only what is needed. The arithmetic is the same as the torch
paths (float64 throughout, exact float32→float64 conversion); only the order of
the terms in a sum differs (numba may vectorise a sum: `fastmath` is limited to
re-association and fused multiply-add, so NaN and inf propagate as usual and the
accumulators still detect them).

Every kernel is optional: ``AVAILABLE`` is False when numba cannot be imported,
and the accumulators then use their torch paths (also used off the CPU). Compiled
code is cached on disk (numba ``cache=True``), so only the first run on a machine
pays the compilation (a few seconds).
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch

try:  # pragma: no cover - exercised by whichever branch the environment has
    import os

    import numba
    from numba import prange

    # numba's own thread pool: its OpenMP layer would share (and reset) the thread
    # count of torch's OpenMP runtime. The parallel loops are only ever launched
    # from one thread at a time (the workqueue layer does not nest).
    if not os.environ.get("NUMBA_THREADING_LAYER"):
        numba.config.THREADING_LAYER = "workqueue"
    AVAILABLE = True
except ImportError:  # pragma: no cover
    numba = None
    AVAILABLE = False

# Set to False (tests, benchmarks) to force the torch paths on CPU.
ENABLED = True

_FASTMATH = {"reassoc", "contract"}


def use_kernels(device) -> bool:
    """Whether the compiled loops serve tensors on `device`."""
    return AVAILABLE and ENABLED and device.type == "cpu"


# The workqueue layer must not be entered from two threads at once.
LOCK = threading.Lock()


def set_threads(n: int) -> None:
    """Run the parallel loops on `n` threads (bounded by numba's pool). Call it, and
    the loops, while holding LOCK."""
    if AVAILABLE:
        numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


@contextlib.contextmanager
def parallel():
    """Hold LOCK with the parallel loops set to torch's thread count; yields it."""
    with LOCK:
        threads = torch.get_num_threads()
        set_threads(threads)
        yield threads


def as_array(x) -> np.ndarray:
    """A CPU torch tensor as a C-contiguous float32 or float64 numpy array (no copy
    when it already is one; half precision converts to float32 exactly)."""
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)
    return np.ascontiguousarray(x.numpy())


_SCRATCH = threading.local()


def scratch(name: str, rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) float64 work array, reused between calls (per thread and
    name): a fresh multi-megabyte array per batch and layer costs a page fault per
    4 KiB on its first write, ~10% of an update. The caller must be done with it
    before asking for the same name again."""
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


if AVAILABLE:

    @numba.njit(cache=True, nogil=True, parallel=True, fastmath=_FASTMATH)
    def type_residual_sums(x, order, starts, rows, ref, new, s1, s2, chunks):  # pragma: no cover - compiled
        """For each group g (rows order[starts[g]:starts[g+1]] of x, one token
        type), with y = float64(x[row]) − ref[rows[g]]:
        s1[g] = Σ y (written, not added), s2[g] = Σ ‖y‖². Where new[g], the
        reference row is first set to the group's first vector. `chunks` splits the
        groups into balanced runs (see row_chunks), one per parallel task."""
        n = x.shape[0]
        m = starts.shape[0]
        d = x.shape[1]
        for c in prange(chunks.shape[0] - 1):
            for g in range(chunks[c], chunks[c + 1]):
                end = starts[g + 1] if g + 1 < m else n
                r = rows[g]
                if new[g]:
                    first = order[starts[g]]
                    for j in range(d):
                        ref[r, j] = np.float64(x[first, j])
                for j in range(d):
                    s1[g, j] = 0.0
                acc = 0.0
                for i in range(starts[g], end):
                    src = order[i]
                    for j in range(d):
                        y = np.float64(x[src, j]) - ref[r, j]
                        s1[g, j] += y
                        acc += y * y
                s2[g] = acc

    @numba.njit(cache=True, nogil=True, parallel=True, fastmath=_FASTMATH)
    def merge_type_sums(rows, counts_b, s1, s2, mean, m2, counts):  # pragma: no cover - compiled
        """Chan et al. update of state rows `rows` (distinct) from batch sums about
        the rows' current means (see type_residual_sums): with n_b, Σy, Σ‖y‖²,
        n = n_a + n_b: μ += Σy/n, S += Σ‖y‖² − ‖Σy‖²/n_b (clamped at 0) + (‖Σy‖²/n_b)·n_a/n."""
        d = s1.shape[1]
        for g in prange(rows.shape[0]):
            r = rows[g]
            na = counts[r]
            nb = counts_b[g]
            nt = na + nb
            q = 0.0
            for j in range(d):
                q += s1[g, j] * s1[g, j]
            qc = q / nb
            within = s2[g] - qc
            if within < 0.0:
                within = 0.0
            m2[r] = m2[r] + within + qc * (na / nt)
            inv = 1.0 / nt
            for j in range(d):
                mean[r, j] += s1[g, j] * inv
            counts[r] = nt
