"""The exact k-NN's two CPU paths: the compiled loops (numba) and the torch operations
(used off the CPU and without numba). Both must give the float64 brute-force answer on
data built to be hard for the bf16/fp32 candidate search, and agree with each other.
The ``path`` fixture (tests/conftest.py) runs a test once per path."""
import math

import numpy as np
import pytest
import torch

from embgeom.errors import EmbgeomError
from embgeom.metrics import _neighbor_kernels as _nk
from embgeom.metrics import neighbors as _nb
from embgeom.metrics.intrinsic_dim import twonn
from embgeom.metrics.neighbors import knn
from embgeom.stats import _kernels

BF16 = _nb._bf16_usable(torch.device("cpu"), 8)


def _brute(X, k):
    X = torch.as_tensor(np.asarray(X), dtype=torch.float64)
    D = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    D.fill_diagonal_(math.inf)
    return D.sort(dim=1).values[:, :k].sqrt()


def _check(X, k, **kw):
    """knn(X, k) is the brute force: distances to 1e-12, indices that give them, no
    point its own neighbour, no neighbour twice."""
    dist, idx = knn(X, k, **kw)
    n = len(X)
    assert dist.shape == (n, k) and idx.shape == (n, k)
    assert dist.dtype == torch.float64 and idx.dtype == torch.int64
    np.testing.assert_allclose(dist.numpy(), _brute(X, k).numpy(), rtol=1e-12, atol=0)
    assert not (idx == torch.arange(n)[:, None]).any()
    assert all(len(set(r)) == k for r in idx.tolist())
    Xt = torch.as_tensor(np.asarray(X), dtype=torch.float64)
    back = ((Xt[idx] - Xt[:, None, :]) ** 2).sum(-1).sqrt()
    np.testing.assert_allclose(back.numpy(), dist.numpy(), rtol=1e-12, atol=0)
    return dist, idx


def _tricky(rng):
    """Data sets that stress the candidate search and its certificate."""
    out = {}
    X = rng.standard_normal((600, 40)) * 0.5 + 1e4 * rng.standard_normal(40)  # far from the origin
    out["far"] = X
    X = rng.standard_normal((500, 16)) * 3.0 + 50.0
    X[:60] = X[100:160]  # exact duplicates
    X[200:240] = X[5]  # a point repeated 41 times (more than k + margin)
    X[300] = X[301] * (1 + 1e-15)  # a near-duplicate
    ang = np.linspace(0, 2 * np.pi, 25, endpoint=False)  # near ties around point 350
    X[360:385] = X[350]
    X[360:385, 0] += np.cos(ang)
    X[360:385, 1] += np.sin(ang) * (1 + 1e-12 * np.arange(25))
    out["duplicates_ties"] = X
    out["lattice"] = rng.integers(0, 4, (400, 5)).astype(float) + 1e3  # exact ties everywhere
    c = rng.standard_normal((2, 24)) * 1e3  # tight clusters far out: the float64 fallback
    out["tight"] = np.vstack([c[0] + 1e-3 * rng.standard_normal((150, 24)),
                              c[1] + 1e-3 * rng.standard_normal((150, 24))])
    hs = rng.standard_normal((450, 64))  # massive activations, as in real hidden states
    hs[:, :3] *= 40.0
    hs[::97, 5] += 3e3
    out["massive"] = hs
    X = rng.standard_normal((400, 30))  # the first 16 columns say nothing: every row's
    X[:, :16] = 1.0  # cheap hash collides, the full hash and comparison must decide
    X[10:20] = X[0]
    out["hash_collisions"] = X
    return out


@pytest.mark.parametrize("k", [1, 2, 20])
def test_tricky_data_exact(path, k):
    rng = np.random.default_rng(100 + k)
    for name, X in _tricky(rng).items():
        for block in (64, 2048):  # many tiles (and remainder groups), or one
            _check(X, k, block_size=block)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_precisions_and_margins_exact(path, precision):
    rng = np.random.default_rng(7)
    X = rng.standard_normal((700, 12)) * 4.0 + 9.0
    X[::50] = X[1::50]
    for k, margin in ((2, None), (5, 0), (20, 3), (3, 40)):
        _check(X, k, precision=precision, margin=margin, block_size=128)
    _check(X.astype(np.float32), 4, precision=precision, block_size=96)  # float32 input, read as it is


def test_paths_agree(monkeypatch):
    """The compiled and torch paths give the same distances (up to the summation order
    of the exact float64 sums) and the same TwoNN estimate."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((1500, 48)) @ rng.standard_normal((48, 48)) + 20.0
    X[:30] = X[500:530]
    got = {}
    for enabled in (True, False):
        monkeypatch.setattr(_kernels, "ENABLED", enabled)
        got[enabled] = (knn(X, 20, block_size=256)[0], twonn(X))
    np.testing.assert_allclose(got[True][0].numpy(), got[False][0].numpy(), rtol=1e-13, atol=0)
    assert got[True][1] == pytest.approx(got[False][1], rel=1e-12)


def test_scaling_and_extreme_magnitudes(path):
    rng = np.random.default_rng(11)
    for scale in (1e200, 1e-200, 2.0 ** 30, 2.0 ** -30):
        X = rng.standard_normal((300, 10)) * scale
        dist, _ = knn(X, 3, block_size=64)
        ref = _brute(X / scale, 3) * scale
        np.testing.assert_allclose(dist.numpy(), ref.numpy(), rtol=1e-12, atol=0)
    # a few large rows that a sample of the rows misses: the compiled path guesses the
    # scaling from a sample and must redo its pass with the right one
    X = rng.standard_normal((1500, 8))
    X[1::200] *= 2.0 ** 24
    _check(X, 2)


def test_errors_and_degenerate_inputs(path):
    rng = np.random.default_rng(12)
    X = rng.standard_normal((80, 6))
    for bad in (np.nan, np.inf, -np.inf):
        Y = X.copy()
        Y[17, 3] = bad
        with pytest.raises(EmbgeomError, match="NaN or infinite"):
            knn(Y, 2)
    with pytest.raises(EmbgeomError, match="NaN or infinite"):
        knn(np.full((5, 3), np.inf), 2)  # all rows equal (and infinite)
    dist, idx = knn(np.ones((6, 3)), 4)  # all rows equal
    assert (dist == 0).all() and not (idx == torch.arange(6)[:, None]).any()
    assert all(len(set(r)) == 4 for r in idx.tolist())
    dist, _ = knn(np.zeros((5, 2)), 2)
    assert (dist == 0).all()
    _check(rng.standard_normal((3, 1)), 2)  # tiny


def test_duplicates_expand(path):
    """Many copies of a few points: a copy's other copies come first, at distance 0,
    then the copies of its distinct neighbours."""
    rng = np.random.default_rng(13)
    base = rng.standard_normal((7, 5)) * 10
    X = base[rng.integers(0, 7, 90)]
    for k in (1, 5, 30, 89):
        dist, idx = _check(X, k)
        Xt = torch.from_numpy(X)
        same = (Xt[idx] == Xt[:, None, :]).all(-1)
        copies = torch.tensor([int((Xt == Xt[i]).all(-1).sum()) - 1 for i in range(len(X))])
        assert (same.sum(1) >= torch.clamp(copies, max=k)).all()


@pytest.mark.skipif(not _kernels.AVAILABLE, reason="numba is not installed")
def test_compiled_groups_match_torch_dedupe():
    rng = np.random.default_rng(14)
    X = rng.standard_normal((300, 20))
    X[:, :16] = 0.0  # every cheap hash collides
    X[50:60] = X[3]
    X[100:103] = X[200]
    X[250] = X[251]
    X[250, 19] = np.nextafter(X[251, 19], np.inf)  # equal but for the last bit: not a copy
    want = _nb._dedupe(torch.from_numpy(X))
    got = _nb._groups_compiled(X)
    assert got[1][250] != got[1][251] and got[1][50] == got[1][3] == got[1][59]
    assert torch.equal(want[0], torch.from_numpy(got[0])) and torch.equal(want[1], torch.from_numpy(got[1]))
    assert _nb._groups_compiled(rng.standard_normal((50, 4))) is None


@pytest.mark.skipif(not (_kernels.AVAILABLE and BF16), reason="no numba or no bf16 products that keep the bound")
def test_compiled_bf16_operands_keep_the_bound():
    """The compiled pass and per-point terms (prep_bf16, finish_bf16) give keys that
    satisfy lower(r) ≤ ‖x_i − x_j‖²/2 ≤ upper(r) on every pair, on data built to stress
    the bound; centred on a sample mean, not the mean."""
    rng = np.random.default_rng(15)
    for X in (
        rng.standard_normal((300, 96)) * 1e-3 + rng.standard_normal(96) * 1e3,
        np.vstack([rng.standard_normal((150, 96))] * 2) + 1e-6 * rng.standard_normal((300, 96)),
        rng.standard_normal((300, 96)) * np.r_[np.full(4, 300.0), np.ones(92)],
    ):
        n, d = X.shape
        rows = np.arange(n, dtype=np.int64)
        centre, _ = _nk.sample_centre(X, rows, 7)
        n_pad = -(-n // 16) * 16
        A = torch.empty((n_pad, d + 4), dtype=torch.bfloat16)
        B = torch.empty((n_pad, d + 4), dtype=torch.bfloat16)
        Au = A.view(torch.int16).numpy().view(np.uint16)
        Bu = B.view(torch.int16).numpy().view(np.uint16)
        nhat, ne, G = np.empty(n), np.empty(n), np.empty(n_pad)
        _nk.prep_bf16(X, rows, centre, 1.0, Au, Bu, nhat, ne, np.array([0, n]))
        _nk.finish_bf16(nhat, ne, _nb._EPS_N(d), d, Au, Bu, G, n, _nb._U32, _nb._U16,
                        _nb._bf16_of(_nb._PAD_KEY), _nb._bf16_of(1.0))
        r = (A @ B.T).double()[:n, :n]
        b = _nb._Bounds(_nb._U16 / (1 - _nb._U16), (5 * (d + 4) + 16) * 2.0 ** -126, torch.from_numpy(G))
        xc = torch.from_numpy(X) - torch.from_numpy(centre)
        D = 0.5 * ((xc[:, None, :] - xc[None, :, :]) ** 2).sum(-1)
        idx = torch.arange(n)
        assert bool((b.lower(r) <= D).all())
        assert bool((D <= b.upper(r, idx, idx)).all())
        # the padding rows give keys of about 2^100 against every point
        pad = (A[n:] @ B[:n].T).float()
        assert bool((pad > 2.0 ** 99).all())


def test_fallback_rows_both_paths(path):
    """Rows the bf16 bound cannot certify take the float64 fallback, in both paths."""
    if not BF16:
        pytest.skip("no bf16 matrix products that keep the bound here")
    rng = np.random.default_rng(16)
    X = np.vstack([rng.standard_normal((600, 24)) * 10.0, 40.0 + 1e-4 * rng.standard_normal((30, 24))])
    _check(X, 3, precision="bf16", block_size=128)
    assert 30 <= _nb._LAST["fallback_rows"] < len(X) // 2
    _check(rng.standard_normal((300, 6)), 20, precision="bf16", margin=0, block_size=128)
    assert _nb._LAST["fallback_rows"] == 300  # p = k: nothing certifies, everything falls back


@pytest.mark.parametrize("k", [1, 2, 20])
def test_extending_a_subsets_search_equals_searching_everything(path, k):
    """extend_knn_distances: the subset's k-NN merged with exact distances to the
    points outside equals a search of all points, when the points outside are mixed
    in among the others (so they are neighbours of inside points), with exact copies
    inside, outside and across, and when the subset has fewer than k other points."""
    from embgeom.metrics.neighbors import extend_knn_distances, knn_distances

    rng = np.random.default_rng(k)
    X = rng.standard_normal((700, 12)) + 50.0
    X[10:15] = X[3]          # copies inside
    X[600:604] = X[601]      # copies among the points outside ...
    X[650] = X[20]           # ... and across
    inside = np.ones(700, dtype=bool)
    inside[rng.choice(700, 40, replace=False)] = False
    inside[600:604] = False
    inside[650] = False
    for mask in (inside, np.arange(700) < 5):  # the second: a subset of 5 < k + 1 points
        sub = knn_distances(X[mask], min(k, int(mask.sum()) - 1))
        got = extend_knn_distances(X, torch.from_numpy(mask), sub, k)
        want = knn_distances(X, k)
        assert got.shape == want.shape
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-13, atol=0)
    with pytest.raises(EmbgeomError, match="inside_distances"):
        extend_knn_distances(X, torch.from_numpy(inside), sub, k)  # distances of another subset
