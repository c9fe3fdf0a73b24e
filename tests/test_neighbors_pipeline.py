"""The compiled path's pipeline (the next tile's product computed while a worker
thread scans the previous one) gives exactly what the tiles scanned one after the
other give, and leaves torch's thread count as it was."""
import numpy as np
import pytest
import torch

from embgeom.metrics import neighbors as _nb
from embgeom.metrics.intrinsic_dim import twonn
from embgeom.metrics.neighbors import knn
from embgeom.stats import _kernels

from test_neighbors import _check, _tricky

pytestmark = pytest.mark.skipif(not _kernels.use_kernels(torch.device("cpu")), reason="numba unavailable")


@pytest.fixture
def two_threads():
    prev = torch.get_num_threads()
    torch.set_num_threads(2)  # the pipeline needs two (it gives each runtime one)
    yield
    torch.set_num_threads(prev)


@pytest.mark.parametrize("k", [1, 2, 20])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_pipeline_matches_serial_scans(monkeypatch, two_threads, k, precision):
    rng = np.random.default_rng(7)
    monkeypatch.setattr(_nb, "_PIPE_BLOCKS", 10**9)  # pipeline every multi-tile call
    for name, X in _tricky(rng).items():
        monkeypatch.setattr(_nb, "_PIPELINE", True)
        d1, i1 = _check(X, k, precision=precision, block_size=64)
        assert torch.get_num_threads() == 2, name
        monkeypatch.setattr(_nb, "_PIPELINE", False)
        d0, i0 = knn(X, k, precision=precision, block_size=64)
        assert torch.equal(d0, d1), name
        assert torch.equal(i0, i1), name


def test_pipeline_choice(monkeypatch, two_threads):
    """Each setting of the size rule gives the same TwoNN (whichever way it goes)."""
    X = np.random.default_rng(3).standard_normal((700, 12))
    got = set()
    for blocks, kmin in ((10**9, 10**9), (0, 10**9), (0, 0)):
        monkeypatch.setattr(_nb, "_PIPE_BLOCKS", blocks)
        monkeypatch.setattr(_nb, "_PIPE_K", kmin)
        got.add(twonn(torch.from_numpy(X)))
        assert torch.get_num_threads() == 2
    assert len(got) == 1


def test_pipeline_error_restores_threads(monkeypatch, two_threads):
    """An error inside a scan reaches the caller; torch's thread count is restored."""
    monkeypatch.setattr(_nb, "_PIPE_BLOCKS", 10**9)

    def boom(*a):
        raise RuntimeError("scan failed")

    monkeypatch.setattr(_nb._nk, "tile_off", boom)
    X = np.random.default_rng(5).standard_normal((300, 8))
    with pytest.raises(RuntimeError, match="scan failed"):
        knn(X, 2, block_size=64)
    assert torch.get_num_threads() == 2
