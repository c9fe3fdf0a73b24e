"""The exact k-NN as the pipeline runs it: the same answer whatever torch's thread
count, which the search leaves as it was (no helper threads, no global setting
changed)."""
import numpy as np
import pytest
import torch

from embgeom.metrics.intrinsic_dim import twonn

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
