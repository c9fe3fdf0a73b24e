"""Exact k-NN and the intrinsic-dimension estimators (SPEC §3).

Reference values come from a float64 brute force and from scikit-dimension
(``skdim``), whose conventions the estimators reproduce to 1e-6 relative.
"""
import math
import warnings

import numpy as np
import pytest
import torch

from embgeom.errors import EmbgeomError
from embgeom.metrics.intrinsic_dim import (
    _gamma_quantile,
    distinct_points,
    intrinsic_dimensions,
    mle_id,
    mle_id_from_distances,
    twonn,
    twonn_from_distances,
    twonn_ml,
    twonn_ml_from_distances,
)
from embgeom.metrics.neighbors import knn, knn_distances

skdim = pytest.importorskip("skdim")


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------
def _embed(Z, rng, ambient=24, offset=0.0):
    """Embed (n, d) in R^ambient by a random rotation (orthonormal rows)."""
    Q = np.linalg.qr(rng.standard_normal((ambient, ambient)))[0][: Z.shape[1]]
    return Z @ Q + offset * rng.standard_normal(ambient)


def _cube(n, d, rng):
    return _embed(rng.uniform(size=(n, d)), rng)


def _gauss(n, d, rng):
    return _embed(rng.standard_normal((n, d)), rng, offset=3.0)


def _sphere(n, d, rng):  # the d-sphere S^d in R^(d+1)
    Z = rng.standard_normal((n, d + 1))
    return _embed(Z / np.linalg.norm(Z, axis=1, keepdims=True), rng)


def _brute(X, k):
    X = torch.as_tensor(np.asarray(X), dtype=torch.float64)
    D = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    D.fill_diagonal_(math.inf)
    return D.sort(dim=1).values[:, :k].sqrt()


def _skdim_twonn(X, discard_fraction=0.1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return skdim.id.TwoNN(discard_fraction=discard_fraction).fit(np.asarray(X, dtype=np.float64)).dimension_


def _skdim_mle(X, k=20):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if k == 20:
            return skdim.id.MLE(K=20).fit(np.asarray(X, dtype=np.float64)).dimension_
        return skdim.id.MLE().fit(np.asarray(X, dtype=np.float64), n_neighbors=k).dimension_


# ---------------------------------------------------------------------------
# exact k-NN
# ---------------------------------------------------------------------------
def _check_knn(X, k, **kw):
    dist, idx = knn(X, k, **kw)
    ref = _brute(X, k)
    assert dist.dtype == torch.float64 and idx.dtype == torch.int64
    assert dist.shape == (len(X), k) and idx.shape == (len(X), k)
    np.testing.assert_allclose(dist.numpy(), ref.numpy(), rtol=1e-12, atol=0)
    n = len(X)
    assert not (idx == torch.arange(n)[:, None]).any(), "a point is its own neighbour"
    assert all(len(set(r)) == k for r in idx.tolist()), "a neighbour is repeated"
    Xt = torch.as_tensor(np.asarray(X), dtype=torch.float64)
    back = ((Xt[idx] - Xt[:, None, :]) ** 2).sum(-1).sqrt()
    np.testing.assert_allclose(back.numpy(), dist.numpy(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("k", [1, 2, 20])
def test_knn_matches_brute_force_random(path, k):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((700, 40)) * 5 + 100.0  # far from the origin
    _check_knn(X, k, block_size=128)


def test_knn_duplicates_and_near_ties(path):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((400, 12))
    X[:60] = X[100:160]  # exact duplicates: real neighbours at distance 0
    X[200:230] = X[5]  # a point repeated 31 times (more than k)
    X[300] = X[301] + 1e-13  # a near-duplicate
    # near ties: points on a circle of equal radius around point 350
    ang = np.linspace(0, 2 * np.pi, 25, endpoint=False)
    X[360:385] = X[350]
    X[360:385, 0] += np.cos(ang)
    X[360:385, 1] += np.sin(ang) * (1 + 1e-12 * np.arange(25))
    for k in (1, 2, 20):
        _check_knn(X, k, block_size=64)


def test_knn_exact_ties_lattice_and_tight_clusters(path):
    rng = np.random.default_rng(2)
    lattice = rng.integers(0, 5, (300, 3)).astype(float)  # many exact ties and duplicates
    _check_knn(lattice, 20, block_size=64)
    c = rng.standard_normal((2, 16)) * 1e4
    tight = np.vstack([c[0] + 1e-5 * rng.standard_normal((150, 16)), c[1] + 1e-5 * rng.standard_normal((150, 16))])
    _check_knn(tight, 5, block_size=64)  # beyond float32 resolution: the float64 fallback
    _check_knn(np.ones((10, 3)), 4)  # all identical


def test_knn_inputs(path):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((300, 8)).astype(np.float32)
    d1 = knn_distances(X, 3)
    d2 = knn_distances(torch.from_numpy(X), 3, block_size=16, margin=0)
    np.testing.assert_array_equal(d1.numpy(), d2.numpy())
    np.testing.assert_allclose(d1.numpy(), _brute(X.astype(np.float64), 3).numpy(), rtol=1e-12)
    with pytest.raises(EmbgeomError, match="at least 4 points"):
        knn(X[:3], 3)
    with pytest.raises(EmbgeomError, match="k must be"):
        knn(X, 0)
    bad = X.copy()
    bad[5, 2] = np.nan
    with pytest.raises(EmbgeomError, match="NaN"):
        knn(bad, 2)
    with pytest.raises(EmbgeomError, match="shape"):
        knn(X[0], 2)


# ---------------------------------------------------------------------------
# agreement with scikit-dimension, and recovery of the dimension
# ---------------------------------------------------------------------------
# Tolerances for recovering the true dimension d (n = 1500): TwoNN's sampling error is
# about d / sqrt(0.9 n) ≈ 2.6 % of d, and the known small-sample/boundary biases at
# d ≤ 6 are a few percent (the cube's faces make it read low, the Gaussian's density
# gradient slightly high), so TwoNN must be within 12 %. The MLE with k = 20 is biased
# downwards as d grows (Levina & Bickel 2004, their Fig. 1; cube faces again), so it
# gets 15 %.
MANIFOLDS = [("cube", _cube, 2), ("cube", _cube, 5), ("gauss", _gauss, 3), ("gauss", _gauss, 6), ("sphere", _sphere, 2), ("sphere", _sphere, 4)]


@pytest.mark.parametrize("name,make,d", MANIFOLDS, ids=[f"{m[0]}{m[2]}" for m in MANIFOLDS])
def test_estimators_match_skdim_and_recover_dimension(name, make, d):
    rng = np.random.default_rng(10 + d)
    X = make(1500, d, rng)
    dist = knn_distances(X, 20)
    a = twonn(X)
    assert a == pytest.approx(_skdim_twonn(X), rel=1e-6)
    assert twonn_from_distances(dist) == a
    m = mle_id(X, k=20)
    assert m == pytest.approx(_skdim_mle(X, 20), rel=1e-6)
    assert mle_id_from_distances(dist, 20) == m
    assert a == pytest.approx(d, rel=0.12)
    assert m == pytest.approx(d, rel=0.15)


def test_options_match_skdim():
    rng = np.random.default_rng(4)
    X = _gauss(1000, 4, rng)
    for f in (0.25, 0.5, 0.01):
        assert twonn(X, discard_fraction=f) == pytest.approx(_skdim_twonn(X, f), rel=1e-6)
    for k in (5, 10):
        assert mle_id(X, k=k) == pytest.approx(_skdim_mle(X, k), rel=1e-6)
    # discard_fraction=0: scikit-dimension fails (F = 1 gives an infinite y); here the
    # last ratio is left out and the estimate stays finite and sensible
    assert math.isfinite(twonn(X, discard_fraction=0.0))
    assert twonn(X, discard_fraction=0.0) == pytest.approx(4, rel=0.15)


def test_from_distances_drops_zero_distances_as_skdim():
    rng = np.random.default_rng(5)
    X = _gauss(800, 3, rng)
    X = np.vstack([X, X[:50], X[:5]])  # duplicates: every point with r1 = 0 is dropped
    dist = knn_distances(X, 20)
    assert int((dist[:, 0] == 0).sum()) == 2 * 50 + 5
    # scikit-dimension's own k-NN (ǁaǁ² + ǁbǁ² − 2a·b in float64) reports some identical
    # points at ~1e-7 instead of 0 and keeps them; given exact distances it applies the
    # same convention as twonn_from_distances, to the last bits.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = skdim.id.TwoNN(dist=True).fit(dist[:, :2].numpy()).dimension_
    assert twonn_from_distances(dist) == pytest.approx(ref, rel=1e-12)
    res = intrinsic_dimensions(distances=dist)
    assert res["id_n"] == len(X) - 2 * 50 - 5  # every copy of a duplicated point is dropped
    assert res["id_mle"] == pytest.approx(3, rel=0.15)


@pytest.mark.parametrize("fraction", [0.3, 0.6])
def test_duplicates_do_not_bias_the_estimate(fraction):
    """Repeated rows would be each other's nearest neighbours at distance 0 and shrink
    the neighbourhoods of the rest (TwoNN read 4.2 and 6.7 here before): every
    estimator works on the distinct points, so the numbers are exactly those of the
    distinct points, shuffled copies or not."""
    rng = np.random.default_rng(11)
    distinct = rng.standard_normal((700, 3)) @ np.linalg.qr(rng.standard_normal((12, 12)))[0][:3]
    n_dup = int(round(fraction * len(distinct) / (1 - fraction)))  # duplicates are `fraction` of the rows
    X = np.vstack([distinct, distinct[rng.integers(0, len(distinct), n_dup)]])
    assert len(X) - len(distinct) == n_dup and n_dup / len(X) == pytest.approx(fraction, abs=0.01)
    assert twonn(X) == twonn(distinct)
    assert twonn_ml(X) == twonn_ml(distinct)
    assert mle_id(X) == mle_id(distinct)
    assert intrinsic_dimensions(X) == intrinsic_dimensions(distinct)
    assert intrinsic_dimensions(X)["id_n"] == len(distinct)
    assert twonn(X) == pytest.approx(3, abs=0.3)
    # the copies may come first and in any order: the same distinct points, the same numbers
    perm = rng.permutation(len(X))
    assert twonn(X[perm]) == pytest.approx(twonn(distinct), rel=1e-12)
    assert twonn(torch.from_numpy(X)) == twonn(distinct)


def test_distinct_points():
    X = np.array([[1.0, 2.0], [0.0, -0.0], [1.0, 2.0], [0.0, 0.0], [3.0, 1.0], [1.0, 2.0]])
    got = distinct_points(X)
    assert got.numpy().tolist() == [[1.0, 2.0], [0.0, 0.0], [3.0, 1.0]]  # first occurrences, in order
    assert distinct_points(X[[0, 4, 1]]).shape == (3, 2)
    with pytest.raises(EmbgeomError, match="NaN"):
        distinct_points(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(EmbgeomError, match="at least 3 distinct points, got 1"):
        twonn(np.ones((50, 4)))


def test_float32_and_torch_inputs_give_same_estimate(path):
    rng = np.random.default_rng(6)
    X = _sphere(600, 3, rng)
    a = twonn(X)
    assert twonn(torch.from_numpy(X)) == a
    assert twonn(X.astype(np.float32)) == pytest.approx(_skdim_twonn(X.astype(np.float32)), rel=1e-6)


# ---------------------------------------------------------------------------
# maximum-likelihood TwoNN
# ---------------------------------------------------------------------------
def test_gamma_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for a in (3, 17, 250, 9000):
        for q in (1e-6, 0.025, 0.5, 0.975):
            assert _gamma_quantile(a, q) == pytest.approx(stats.gamma.ppf(q, a), rel=1e-9)


def test_twonn_ml_interval_and_agreement():
    rng = np.random.default_rng(0)
    d = 3
    X = rng.standard_normal((1500, d)) @ np.linalg.qr(rng.standard_normal((16, 16)))[0][:d]
    est, low, high = twonn_ml(X)
    assert low < est < high
    assert low <= d <= high
    assert est == pytest.approx(twonn(X), rel=0.05)
    dist = knn_distances(X, 2)
    logs = np.log(dist[:, 1].numpy() / dist[:, 0].numpy())
    assert est == pytest.approx((len(X) - 1) / logs.sum(), rel=1e-12)
    assert twonn_ml_from_distances(dist) == (est, low, high)
    # a wider confidence level gives a wider interval around the same estimate
    e2, l2, h2 = twonn_ml_from_distances(dist, confidence=0.99)
    assert e2 == est and l2 < low and h2 > high
    # Coverage over replicates. The ratios of neighbouring points are not quite
    # independent, so the true coverage is below the nominal 95 % (≈ 80-90 % in
    # simulation); require a clear majority.
    hits = 0
    for _ in range(12):
        Y = rng.standard_normal((1000, 3))
        _, lo, hi = twonn_ml(Y)
        hits += lo <= 3 <= hi
    assert hits >= 8


# ---------------------------------------------------------------------------
# the pipeline's bundle
# ---------------------------------------------------------------------------
def test_intrinsic_dimensions_bundle():
    rng = np.random.default_rng(8)
    X = _cube(900, 3, rng)
    dist = knn_distances(X, 20)
    res = intrinsic_dimensions(distances=dist)
    assert set(res) == {"id_twonn", "id_twonn_ml", "id_twonn_ml_low", "id_twonn_ml_high", "id_mle", "id_n"}
    assert res["id_twonn"] == twonn(X)
    assert res["id_mle"] == mle_id(X)
    assert (res["id_twonn_ml"], res["id_twonn_ml_low"], res["id_twonn_ml_high"]) == twonn_ml(X)
    assert res["id_n"] == 900
    assert intrinsic_dimensions(X) == res
    # degenerate data gives NaN, not an error
    same = intrinsic_dimensions(np.ones((50, 4)))
    assert same["id_n"] == 0 and math.isnan(same["id_twonn"]) and math.isnan(same["id_mle"])
    small = intrinsic_dimensions(X[:10])  # fewer than k + 1 points: no MLE, TwoNN fine
    assert math.isnan(small["id_mle"]) and math.isfinite(small["id_twonn"])


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------
def test_errors():
    rng = np.random.default_rng(9)
    X = rng.standard_normal((50, 5))
    with pytest.raises(EmbgeomError, match="at least 3 distinct points, got 2"):
        twonn(X[:2])
    with pytest.raises(EmbgeomError, match="at least 21 distinct points, got 20"):
        mle_id(X[:20], k=20)
    with pytest.raises(EmbgeomError, match="at least 3 distinct points, got 1"):
        twonn_ml(X[:1])
    with pytest.raises(EmbgeomError, match="discard_fraction"):
        twonn(X, discard_fraction=1.0)
    with pytest.raises(EmbgeomError, match="discard_fraction"):
        twonn(X, discard_fraction=-0.1)
    with pytest.raises(EmbgeomError, match="k must be"):
        mle_id(X, k=1)
    with pytest.raises(EmbgeomError, match="k must be"):
        mle_id(X, k=2.5)
    with pytest.raises(EmbgeomError, match="confidence"):
        twonn_ml(X, confidence=1.5)
    bad = X.copy()
    bad[3, 3] = np.inf
    with pytest.raises(EmbgeomError, match="NaN or infinite"):
        twonn(bad)
    bad[3, 3] = np.nan
    with pytest.raises(EmbgeomError, match="NaN or infinite"):
        twonn(bad)
    from embgeom.metrics.id_inputs import distinct_points

    huge = np.full((4, 20), 1e308)  # finite, but their sums overflow: accepted, copies found
    huge[1:3, 0] = [-1e308, 5e307]
    huge = np.vstack([huge, huge[1:2], -huge])
    huge[-1, 19] = np.nextafter(-1e308, 0)  # not a copy of the row before
    assert distinct_points(huge).shape == (len(np.unique(huge, axis=0)), 20) == (7, 20)
    with pytest.raises(EmbgeomError, match="at least 3 distinct points, got 2"):
        twonn(np.vstack([X[:2], X[:2]]))  # 4 points, 2 distinct
    dist = knn_distances(X, 5).numpy()
    with pytest.raises(EmbgeomError, match="sorted"):
        twonn_from_distances(dist[:, ::-1])
    with pytest.raises(EmbgeomError, match="10 are needed"):
        mle_id_from_distances(dist, k=10)
    with pytest.raises(EmbgeomError, match="2-d"):
        twonn_from_distances(dist[:, 0])
    with pytest.raises(EmbgeomError, match="exactly one"):
        intrinsic_dimensions(X, distances=dist)


# ---------------------------------------------------------------------------
# the bfloat16 candidate search (issue 4): exact, with a proven bound and a fallback
# ---------------------------------------------------------------------------
from embgeom import _numba  # noqa: E402
from embgeom.metrics import _knn_precision  # noqa: E402

with _numba.parallel():
    BF16 = _knn_precision.bf16_keeps_bound(8)


def _check_precision(X, k, precision, **kw):
    _check_knn(X, k, precision=precision, **kw)
    info = knn(X, k, precision=precision, return_info=True, **kw)[2]
    if precision == "bf16" and BF16:
        assert info["precision"] == "bf16"
    return info


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("k", [1, 2, 20])
def test_knn_precisions_match_brute_force(path, precision, k):
    rng = np.random.default_rng(20 + k)
    _check_precision(rng.standard_normal((900, 48)), k, precision, block_size=256)  # random, centred
    far = rng.standard_normal((700, 40)) * 0.5 + 1e4 * rng.standard_normal(40)  # far from the origin
    _check_precision(far, k, precision, block_size=128)
    # a few coordinates with massive activations, as in real hidden states
    hs = rng.standard_normal((800, 64))
    hs[:, :3] *= 40.0
    hs[::97, 5] += 3e3
    _check_precision(hs, k, precision, block_size=128)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_knn_precisions_duplicates_and_near_ties(path, precision):
    rng = np.random.default_rng(21)
    X = rng.standard_normal((500, 16)) * 3.0 + 50.0
    X[:60] = X[100:160]  # exact duplicates
    X[200:230] = X[5]  # a point repeated 31 times
    X[300] = X[301] * (1 + 1e-15)  # a near-duplicate
    # near ties: 25 points at equal distance (to 1e-12) from point 350
    ang = np.linspace(0, 2 * np.pi, 25, endpoint=False)
    X[360:385] = X[350]
    X[360:385, 0] += np.cos(ang)
    X[360:385, 1] += np.sin(ang) * (1 + 1e-12 * np.arange(25))
    for k in (1, 2, 20):
        _check_precision(X, k, precision, block_size=64)
    # exact ties everywhere (integer lattice)
    _check_precision(rng.integers(0, 4, (400, 5)).astype(float) + 1e3, 20, precision, block_size=64)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_knn_duplicates_float32_input_compacted_in_place(path, precision):
    """float32 input with duplicates: the search reads the
    float32 rows as they are; same answer, the caller's array untouched."""
    rng = np.random.default_rng(25)
    X = (rng.standard_normal((700, 12)) * 2.0 + 7.0).astype(np.float32)
    X[::7] = X[1::7][: len(X[::7])]  # every 7th row repeats its successor
    X[600:640] = X[3]
    keep = X.copy()
    Xt = torch.from_numpy(X)
    for k in (1, 20):
        for inp in (X, Xt):
            dist, idx = knn(inp, k, precision=precision, block_size=64)
            ref = _brute(X.astype(np.float64), k)
            np.testing.assert_allclose(dist.numpy(), ref.numpy(), rtol=1e-12, atol=0)
            assert not (idx == torch.arange(len(X))[:, None]).any()
            ref64 = knn(X.astype(np.float64), k, precision=precision, block_size=64)
            assert torch.equal(dist, ref64[0]) and torch.equal(idx, ref64[1])
    np.testing.assert_array_equal(X, keep)


@pytest.mark.skipif(not BF16, reason="no bf16 matrix products that keep the bound here")
def test_bf16_fallback_rows_are_exact(path):
    rng = np.random.default_rng(22)
    # tight clusters far from the centre: the bf16 bound (relative to the norms) cannot
    # separate their points, so every row of them takes the float64 fallback
    c = rng.standard_normal((2, 24)) * 1e3
    tight = np.vstack([c[0] + 1e-3 * rng.standard_normal((200, 24)), c[1] + 1e-3 * rng.standard_normal((200, 24))])
    info = _check_precision(tight, 5, "bf16", block_size=64)
    assert info["fallback_rows"] == len(tight)
    # mixed: a spread cloud certified by bf16, plus a tight clump that falls back
    X = np.vstack([rng.standard_normal((600, 24)) * 10.0, 40.0 + 1e-4 * rng.standard_normal((30, 24))])
    info = _check_precision(X, 3, "bf16", block_size=128)
    assert 30 <= info["fallback_rows"] < len(X) // 2
    # a small margin: rows that need more than k candidates evaluated exactly, and rows
    # whose kept candidates do not suffice (fallback)
    info = _check_precision(rng.standard_normal((700, 6)), 20, "bf16", margin=4, block_size=128)
    assert info["evaluated_beyond_k"] > 0 and 0 < info["fallback_rows"] < 100
    info = _check_precision(rng.standard_normal((700, 6)), 20, "bf16", margin=0, block_size=128)
    assert info["fallback_rows"] == 700  # p = k: nothing certifies, everything falls back


def test_knn_precision_argument():
    X = np.random.default_rng(24).standard_normal((50, 4))
    with pytest.raises(EmbgeomError, match="precision"):
        knn(X, 2, precision="fp16")
    a = knn_distances(X, 3, precision="fp32")
    b = knn_distances(X, 3, precision="bf16")
    np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_knn_cuda_matches_cpu():
    rng = np.random.default_rng(25)
    X = rng.standard_normal((3000, 64)) + 5.0
    ref = knn_distances(X, 20)
    for precision in ("auto", "bf16", "fp32"):
        got = knn_distances(torch.from_numpy(X).cuda(), 20, precision=precision)
        assert got.is_cuda
        np.testing.assert_allclose(got.cpu().numpy(), ref.numpy(), rtol=1e-12, atol=0)
