"""The exact k-NN: every candidate precision must give the float64 brute-force answer
on data built to be hard for the bf16/fp32 candidate search (near-duplicates far from
the origin, exact ties, duplicates, tight clusters), and the same neighbour sets; the
"auto" precision is chosen by measured speed among native paths only."""
import math

import numpy as np
import pytest
import torch

from embgeom import _hardware, _numba
from embgeom.errors import EmbgeomError
from embgeom.metrics import _knn_bounds as _kb
from embgeom.metrics import _knn_points as _kp
from embgeom.metrics import _knn_precision as _kprec
from embgeom.metrics import neighbors as _nb
from embgeom.metrics.neighbors import knn

with _numba.parallel():
    BF16 = _kprec.bf16_keeps_bound(8)


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


def _sets(idx):
    return [frozenset(r) for r in idx.tolist()]


@pytest.mark.parametrize("k", [1, 2, 20, 64])  # 64: GRIDE's rank, long lists merged per row and tile
def test_tricky_data_exact_and_same_sets_on_every_path(k):
    """Every precision (and "auto") gives the brute-force distances, and the same
    neighbour sets wherever no exact tie straddles the k-th place."""
    rng = np.random.default_rng(100 + k)
    for name, X in _tricky(rng).items():
        got = {}
        # many tiles (and remainder groups) with each precision, or one
        for precision, block in (("bf16", 64), ("fp32", 64), ("fp32", 2048), ("auto", 2048)):
            got[precision, block] = _check(X, k, block_size=block, precision=precision)
        dist0, idx0 = got["fp32", 2048]
        ref = _brute(X, k + 1) if k + 1 < len(X) else None
        untied = (ref[:, k - 1] < ref[:, k]).numpy() if ref is not None else np.ones(len(X), bool)
        for key, (dist, idx) in got.items():
            assert torch.equal(dist, dist0), (name, key)
            a = [s for s, u in zip(_sets(idx), untied) if u]
            b = [s for s, u in zip(_sets(idx0), untied) if u]
            assert a == b, (name, key)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_column_flooded_with_candidates(precision):
    """64 points equidistant from one point, all in one tile where that point is a
    column: more candidates than its buffer holds (2p = 18 at k = 1), so the buffer
    is merged while the tile is read, and still every distance is the brute force's."""
    rng = np.random.default_rng(21)
    d = 64
    far = rng.standard_normal((64, d)) * 50.0 + 400.0  # rows 64..127 (the centre's own block)
    centre = np.full(d, 3.0)
    ring = centre + 2.0 * np.eye(d)  # rows 0..63, each at distance 2 from the centre
    X = np.vstack([ring, far])
    X[64] = centre
    for k in (1, 2):
        _check(X, k, precision=precision, block_size=64)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_precisions_and_margins_exact(precision):
    rng = np.random.default_rng(7)
    X = rng.standard_normal((700, 12)) * 4.0 + 9.0
    X[::50] = X[1::50]
    for k, margin in ((2, None), (5, 0), (20, 3), (3, 40)):
        _check(X, k, precision=precision, margin=margin, block_size=128)
    _check(X.astype(np.float32), 4, precision=precision, block_size=96)  # float32 input, read as it is


@pytest.mark.parametrize("flags, isa, native", [
    ("sse avx2 avx512f avx512_bf16", None, True),
    ("sse avx2 avx512f avx512_bf16", "AVX2", False),  # oneDNN held below bf16: emulated
    ("sse avx2 avx512f avx512_bf16", "avx512_core", False),
    ("sse avx2 avx512f avx512_bf16", "AVX512_CORE_BF16", True),
    ("sse avx2 amx_bf16", "AVX512_CORE_AMX", True),
    ("sse avx2", None, False),
])
def test_bf16_native_reads_the_flags_and_the_isa_limit(monkeypatch, flags, isa, native):
    from embgeom import _hardware

    monkeypatch.setattr(_hardware, "_cpu_field", lambda names: flags if "flags" in names else "cpu")
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if isa is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    assert _hardware.bf16_native() is native


def test_pick_fastest_with_injected_timings():
    """The chooser takes the faster path, never an emulated one, whatever its time."""
    assert _hardware.pick_fastest({"fp32": 2.0, "bf16": 1.0}) == "bf16"
    assert _hardware.pick_fastest({"fp32": 1.0, "bf16": 2.0}) == "fp32"
    assert _hardware.pick_fastest({"fp32": 2.0, "bf16": 1.0}, emulated=("bf16",)) == "fp32"
    assert _hardware.pick_fastest({"fp32": 2.0, "bf16": None}) == "fp32"
    assert _hardware.pick_fastest({"fp32": 1.0, "bf16": 1.0}) == "fp32"  # ties: the first listed
    with pytest.raises(ValueError):
        _hardware.pick_fastest({"bf16": 1.0}, emulated=("bf16",))


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("faster", ["bf16", "fp32"])
def test_auto_precision_follows_injected_timings(monkeypatch, native, faster):
    """knn(precision="auto") uses the path the (injected) tile timings say is faster,
    and fp32 where bf16 is emulated (its timing is then not even taken); the choice
    and both timings come back with the diagnostics; the result is the same."""
    times = {"bf16": 1e-3 if faster == "bf16" else 5e-3, "fp32": 1e-3 if faster == "fp32" else 5e-3}
    timed = []

    def fake(precision, d):
        timed.append(precision)
        return times[precision]

    monkeypatch.setattr(_kprec, "tile_seconds", fake)
    monkeypatch.setattr(_kprec, "_CHOICES", {})
    monkeypatch.setattr(_hardware, "bf16_native", lambda device=None: native)
    X = np.random.default_rng(4).standard_normal((400, 10)) + 30.0
    dist, idx, info = knn(X, 3, return_info=True, block_size=64)
    want = "bf16" if native and BF16 and faster == "bf16" else "fp32"
    assert info["precision"] == want and info["chosen_by"] == "measured"
    assert info["bf16_native"] is native
    assert info["tile_seconds"]["fp32"] == times["fp32"]
    if native and BF16:
        assert info["tile_seconds"]["bf16"] == times["bf16"]
    else:
        assert info["tile_seconds"]["bf16"] is None and "bf16" not in timed
    knn(X, 2, return_info=True)  # once per process and width: not timed again
    assert len(timed) == (2 if native and BF16 else 1)
    ref = knn(X, 3, precision="fp32", block_size=64)
    assert torch.equal(dist, ref[0])


def test_tile_timing_is_real_and_short():
    """tile_seconds measures an actual tile product (positive, finite)."""
    with _numba.parallel():
        t = _kprec.tile_seconds("fp32", 16)
    assert 0 < t < 10


def test_scaling_and_extreme_magnitudes():
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


def test_errors_and_degenerate_inputs():
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


def test_duplicates_expand():
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


def test_groups_are_exact():
    """_groups: exactly equal rows grouped (by comparison, not by hash), as numpy's
    unique over rows groups them."""
    rng = np.random.default_rng(14)
    X = rng.standard_normal((300, 20))
    X[:, :16] = 0.0  # every cheap hash collides
    X[50:60] = X[3]
    X[100:103] = X[200]
    X[250] = X[251]
    X[250, 19] = np.nextafter(X[251, 19], np.inf)  # equal but for the last bit: not a copy
    reps, group = _nb._groups(X)
    assert group[250] != group[251] and group[50] == group[3] == group[59]
    _, first, inv = np.unique(X, axis=0, return_index=True, return_inverse=True)
    np.testing.assert_array_equal(np.sort(first), reps)
    np.testing.assert_array_equal(reps[group], first[inv.ravel()])
    assert _nb._groups(rng.standard_normal((50, 4))) is None


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_groups_find_copies_in_any_row(dtype):
    """A copy is found wherever it lies: the first hash is the same sum for every row
    (a matrix product summed the tail rows of its blocks in another order, and copies
    in the last rows of 1,750 were missed)."""
    rng = np.random.default_rng(11)
    for n in (1750, 1003, 97):
        X = rng.standard_normal((n, 12)).astype(dtype)
        X[-3:] = X[rng.integers(0, n - 3, 3)]  # copies in the tail rows
        X[n // 2] = X[1]
        _, first = np.unique(X, axis=0, return_index=True)
        reps, group = _nb._groups(X)
        np.testing.assert_array_equal(reps, np.sort(first))


@pytest.mark.skipif(not BF16, reason="no bf16 products that keep the bound")
def test_bf16_operands_keep_the_bound():
    """The compiled pass and per-point terms (prepare, operands) give keys that
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
        n_pad = -(-n // 16) * 16
        with _numba.parallel():
            centre, _ = _kp.sample_centre(X, rows, 7)
            nhat, _, state = _kb.prepare(X, rows, centre, 1.0, "bf16", n_pad)
            A, B = state[0], state[1]
            _, _, b = _kb.operands(state, nhat, n_pad, d)
        r = (A @ B.T).double()[:n, :n]
        r = (A @ B.T).double()[:n, :n]
        xc = torch.from_numpy(X) - torch.from_numpy(centre)
        D = 0.5 * ((xc[:, None, :] - xc[None, :, :]) ** 2).sum(-1)
        idx = torch.arange(n)
        assert bool((b.lower(r) <= D).all())
        assert bool((D <= b.upper(r, idx, idx)).all())
        # the padding rows give keys of about 2^100 against every point
        pad = (A[n:] @ B[:n].T).float()
        assert bool((pad > 2.0 ** 99).all())


def test_fallback_rows_reported():
    """Rows the bf16 bound cannot certify take the float64 fallback; the diagnostics
    returned say how many."""
    if not BF16:
        pytest.skip("no bf16 matrix products that keep the bound here")
    rng = np.random.default_rng(16)
    X = np.vstack([rng.standard_normal((600, 24)) * 10.0, 40.0 + 1e-4 * rng.standard_normal((30, 24))])
    _check(X, 3, precision="bf16", block_size=128)
    info = knn(X, 3, precision="bf16", block_size=128, return_info=True)[2]
    assert info["precision"] == "bf16" and 30 <= info["fallback_rows"] < len(X) // 2
    Y = rng.standard_normal((300, 6))
    _check(Y, 20, precision="bf16", margin=0, block_size=128)
    info = knn(Y, 20, precision="bf16", margin=0, block_size=128, return_info=True)[2]
    assert info["fallback_rows"] == 300  # p = k: nothing certifies, everything falls back


@pytest.mark.parametrize("k", [1, 2, 20])
def test_extending_a_subsets_search_equals_searching_everything(k):
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
