"""The exact k-NN as the pipeline runs it: the same answer whatever torch's thread
count (which the search leaves as it was), and in a forked child (as data loaders
and multiprocessing fork after a first search)."""
import os

import numpy as np
import pytest
import torch

from embgeom.metrics.intrinsic_dim import twonn
from embgeom.metrics.neighbors import knn

from test_neighbors import _check, _tricky


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_thread_counts_give_the_same_neighbours(precision):
    rng = np.random.default_rng(7)
    data = _tricky(rng)
    prev = torch.get_num_threads()
    got = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for name in ("far", "duplicates_ties"):
                got[threads, name] = _check(data[name], 3, precision=precision, block_size=64)
            got[threads, "twonn"] = twonn(data["far"])
            assert torch.get_num_threads() == threads  # the search changes no global setting
    finally:
        torch.set_num_threads(prev)
    for name in ("far", "duplicates_ties"):
        assert torch.equal(got[1, name][0], got[2, name][0]) and torch.equal(got[1, name][0], got[3, name][0])
    assert got[1, "twonn"] == got[2, "twonn"] == got[3, "twonn"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_search_works_in_a_forked_child():
    """A child forked after a search (numba's thread pool started in the parent)
    finds the same neighbours. The child is killed if it does not answer in 60 s."""
    import select
    import signal

    x = np.random.default_rng(3).standard_normal((3000, 16))
    want = knn(x, 2)[1].numpy()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report, then leave at once (no pytest teardown here)
        ok = False
        try:
            ok = bool(np.array_equal(knn(x, 2)[1].numpy(), want))
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
