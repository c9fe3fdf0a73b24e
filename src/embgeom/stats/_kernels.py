"""Compiled CPU loops (numba) for the per-batch passes of the accumulators.

Torch expresses a per-type residual sum or a batch's norms, unit sums and centring
only as several whole-batch operations, each a pass over memory with a float64
temporary; these loops read the batch once, keep the float64 work in registers and
cache, and write only what is needed. The arithmetic is the same as the torch
paths (float64 throughout, exact float32→float64 conversion); only the order of
the terms in a sum differs (numba may vectorise a sum: `fastmath` is limited to
re-association and fused multiply-add, so NaN and inf propagate as usual and the
accumulators still detect them).

The loops live in :mod:`embgeom.stats._compiled` (and the kNN's in
:mod:`embgeom.metrics._neighbor_kernels`); this module decides when they run and
hands them out as its own attributes (``_kernels.group_ids`` …), importing them on
first use. Compiled code is cached on disk (numba ``cache=True``), so only the first
run on a machine compiles (about 30 s), but every process still pays about a second
to import numba and load that code. Hence three modes, in ``ENABLED``:

* ``True``: compiled loops whenever numba is installed and the tensors are on the CPU;
* ``False``: the torch paths always (tests and benchmarks compare the two);
* ``"auto"`` (the default): a ski-rental rule. The torch paths cost about 3 ns more
  per float of a row than the compiled ones (measured: 1.1 µs per token and layer
  at width 384, 1.8 µs at 576), so the accumulators report the floats they sent
  through torch (:func:`count_torch_work`) and the loops are loaded once that extra
  time has reached the loading cost (``AUTO_WORK`` floats, ~0.8M rows at width 384);
  from then on they serve everything. A short run never pays the second, a long one
  pays at most twice the optimum. Callers that know their work is large (the kNN of
  thousands of points) ask for the loops at once with :func:`want_kernels`; smaller
  kNN searches report their estimated extra time in the same unit.

Both paths agree to rounding (tests compare each against float64 references), so a
switch in the middle of a run changes no result beyond the last bits.
"""
from __future__ import annotations

import contextlib
import importlib.util
import threading

import numpy as np
import torch

# numba importable? Checked without importing it (that is the expensive part).
AVAILABLE = importlib.util.find_spec("numba") is not None

# True / False / "auto": see the module docstring.
ENABLED = "auto"

# Floats (rows × width) sent through the torch paths before "auto" loads the
# compiled loops: about a second of extra torch time, the cost of loading them.
AUTO_WORK = 300_000_000

_torch_work = 0
_compiled = None  # the module, once imported


def _load():
    global _compiled
    if _compiled is None:
        from . import _compiled as module

        _compiled = module
    return _compiled


def use_kernels(device) -> bool:
    """Whether the compiled loops serve tensors on `device` now (see ENABLED)."""
    if not AVAILABLE or ENABLED is False or device.type != "cpu":
        return False
    return ENABLED is True or _compiled is not None


def want_kernels(device) -> bool:
    """use_kernels, for a caller whose work alone repays loading the loops: in
    "auto" mode they are loaded now."""
    if AVAILABLE and ENABLED == "auto" and device.type == "cpu":
        _load()
    return use_kernels(device)


def count_torch_work(rows: int, width: int) -> None:
    """Record rows × width floats that a torch path handled on the CPU where a
    compiled loop could have; in "auto" mode, load the loops once there have been
    AUTO_WORK of them."""
    global _torch_work
    if AVAILABLE and ENABLED == "auto" and _compiled is None:
        _torch_work += int(rows) * int(width)
        if _torch_work >= AUTO_WORK:
            _load()


# What this module hands out from _compiled (anything else is an ordinary
# AttributeError, so that probing this module never imports numba).
_COMPILED_NAMES = frozenset(
    {"numba", "group_ids", "lookup_rows", "insert_sorted", "type_residual_sums", "merge_type_sums"})


def __getattr__(name: str):
    """The compiled loops (and numba itself) as attributes of this module."""
    if name not in _COMPILED_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(_load(), name)


# The workqueue layer must not be entered from two threads at once.
LOCK = threading.Lock()


def set_threads(n: int) -> None:
    """Run the parallel loops on `n` threads (bounded by numba's pool). Call it, and
    the loops, while holding LOCK."""
    numba = _load().numba
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
