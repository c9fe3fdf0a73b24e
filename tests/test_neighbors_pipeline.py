"""The compiled path's lanes (this thread and a helper each compute a tile's product and
scan it; scans of tiles that share no points may overlap) give exactly what the tiles
scanned one after the other give, and leave torch's thread count as it was."""
import threading
import time

import numpy as np
import pytest
import torch

from embgeom.metrics import neighbors as _nb
from embgeom.metrics.intrinsic_dim import twonn
from embgeom.metrics.neighbors import knn
from embgeom.stats import _kernels

from test_neighbors import _check, _tricky

pytestmark = pytest.mark.skipif(not _kernels.AVAILABLE, reason="numba unavailable")


@pytest.fixture(autouse=True)
def compiled_loops(monkeypatch):
    """These tests are about the compiled path: used whatever the input size (the
    default "auto" rule would keep small inputs on the torch path)."""
    monkeypatch.setattr(_kernels, "ENABLED", True)


@pytest.fixture
def two_threads():
    prev = torch.get_num_threads()
    torch.set_num_threads(2)  # the lanes need two (one each)
    yield
    torch.set_num_threads(prev)


def _both(monkeypatch, X, k, **kw):
    monkeypatch.setattr(_nb, "_LANES", True)
    d1, i1 = _check(X, k, **kw)
    assert _nb._LAST["lanes"]
    assert torch.get_num_threads() == 2
    monkeypatch.setattr(_nb, "_LANES", False)
    d0, i0 = knn(X, k, **kw)
    assert not _nb._LAST["lanes"]
    return (d0, i0), (d1, i1)


@pytest.mark.parametrize("k", [1, 2, 20])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_lanes_match_serial_scans(monkeypatch, two_threads, k, precision):
    rng = np.random.default_rng(7)
    for name, X in _tricky(rng).items():
        (d0, i0), (d1, i1) = _both(monkeypatch, X, k, precision=precision, block_size=64)
        assert torch.equal(d0, d1), name
        assert torch.equal(i0, i1), name


def test_lanes_with_a_slow_helper(monkeypatch, two_threads):
    """Scans wait for the earlier tiles that share their points, whichever lane is
    behind: a helper that stalls before each scan changes nothing."""
    real_diag, real_off = _nb._compiled_loops().tile_diag1, _nb._compiled_loops().tile_off1

    def slow(fn):
        def run(*a):
            if threading.current_thread() is not threading.main_thread():
                time.sleep(0.002)
            return fn(*a)
        return run

    X = np.random.default_rng(11).standard_normal((600, 10))
    (d0, i0), _ = _both(monkeypatch, X, 3, block_size=64)
    monkeypatch.setattr(_nb._compiled_loops(), "tile_diag1", slow(real_diag))
    monkeypatch.setattr(_nb._compiled_loops(), "tile_off1", slow(real_off))
    monkeypatch.setattr(_nb, "_LANES", True)
    d1, i1 = knn(X, 3, block_size=64)
    assert _nb._LAST["lanes"]
    assert torch.equal(d0, d1) and torch.equal(i0, i1)


def test_lanes_error_restores_threads(monkeypatch, two_threads):
    """An error inside a scan (in either lane) reaches the caller; torch's thread count
    is restored and the next call works."""
    real = _nb._compiled_loops().tile_off1

    def boom(*a):
        raise RuntimeError("scan failed")

    X = np.random.default_rng(5).standard_normal((300, 8))
    monkeypatch.setattr(_nb, "_LANES", True)
    monkeypatch.setattr(_nb._compiled_loops(), "tile_off1", boom)
    with pytest.raises(RuntimeError, match="scan failed"):
        knn(X, 2, block_size=64)
    assert torch.get_num_threads() == 2
    monkeypatch.setattr(_nb._compiled_loops(), "tile_off1", real)
    _check(X, 2, block_size=64)
    assert _nb._LAST["lanes"]


def test_lanes_choice():
    """Lanes only with two threads and more than one tile; the estimate is the same."""
    X = np.random.default_rng(3).standard_normal((700, 12))
    prev = torch.get_num_threads()
    got = set()
    try:
        for threads in (2, 1, 3):
            torch.set_num_threads(threads)
            got.add(twonn(torch.from_numpy(X)))
            assert _nb._LAST["lanes"] is (threads == 2)
            assert torch.get_num_threads() == threads
        torch.set_num_threads(2)
        knn(X[:100], 2)  # a single tile
        assert _nb._LAST["lanes"] is False
    finally:
        torch.set_num_threads(prev)
    assert len(got) == 1


@pytest.mark.parametrize("m", range(1, 9))
def test_round_robin(m):
    pairs = _nb._round_robin(m)
    assert sorted(pairs) == [(a, b) for a in range(m) for b in range(a + 1, m)]
    # rounds of m // 2 pairs: no block twice within a round
    r = m // 2
    for s in range(0, len(pairs), max(r, 1)):
        blocks = [x for p in pairs[s : s + r] for x in p]
        assert len(blocks) == len(set(blocks))


def test_scan_deps():
    """Every earlier tile that shares points with a tile is ordered before it (through
    the dependencies, transitively); tiles that share none are not."""
    plan = [(0, 32, 0, 32), (32, 64, 32, 64), (64, 80, 64, 80), (0, 32, 32, 64)]
    plan += [(0, 64, 64, 80)]
    plan += [(80, 96, 80, 96), (0, 64, 80, 96), (64, 80, 80, 96)]
    deps = _nb._scan_deps(plan)

    def pts(tl):
        return set(range(tl[0], tl[1])) | set(range(tl[2], tl[3]))

    for e in range(len(plan)):
        before, todo = set(), list(deps[e])
        while todo:
            f = todo.pop()
            if f not in before:
                before.add(f)
                todo.extend(deps[f])
        assert all(pts(plan[f]) & pts(plan[e]) for f in deps[e]), e
        assert {f for f in range(e) if pts(plan[f]) & pts(plan[e])} <= before, e


def test_shared_runs_each_piece_once():
    seen = []
    _nb._shared(seen.append, 37)
    assert sorted(seen) == list(range(37))
    _nb._shared(seen.append, 0)
    assert len(seen) == 37


def test_shared_error_reaches_caller():
    def fn(c):
        if c == 5:
            raise ValueError("piece 5")

    with pytest.raises(ValueError, match="piece 5"):
        _nb._shared(fn, 12)
    seen = []
    _nb._shared(seen.append, 3)  # the helper still serves
    assert sorted(seen) == [0, 1, 2]


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_lanes_work_in_a_forked_child(two_threads):
    """A child forked after the lanes' helper thread started gets its own helper (it
    does not inherit the thread, and waiting on the parent's would hang) and finds
    the same neighbours. The child is killed if it does not answer within 60 s."""
    import os
    import select
    import signal

    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 16))
    want = knn(x, 2)[1].numpy()
    assert _nb._LAST.get("lanes")  # the helper thread is running in the parent
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report, then leave at once (no pytest teardown here)
        ok = False
        try:
            got = knn(x, 2)[1].numpy()
            ok = bool(np.array_equal(got, want)) and _nb._HELPER[0].pid == os.getpid()
        finally:
            os.write(w, b"1" if ok else b"0")
            os._exit(0)
    os.close(w)
    ready, _, _ = select.select([r], [], [], 60)
    answer = os.read(r, 1) if ready else b""
    if not ready:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(r)
    assert answer == b"1"
