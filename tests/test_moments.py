"""Moments against an independent float64 two-pass reference."""
import numpy as np
import pytest
import torch

from embgeom.errors import EmbgeomError
from embgeom.metrics.spectrum import anisotropy
from embgeom.stats.moments import Moments

METRICS = ["Q", "M", "V", "anisotropy", "anisotropy_uncentered", "mean_cosine",
           "isoscore", "effective_rank", "participation_ratio"]


def reference(X):
    """Two-pass float64 statistics computed directly from their definitions."""
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    mu = X.mean(axis=0)
    Xc = X - mu
    C = Xc.T @ Xc / n
    S = X.T @ X / n
    lam = np.clip(np.linalg.eigvalsh(C)[::-1], 0, None)
    lam_s = np.linalg.eigvalsh(S)[::-1]
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    cos = U @ U.T
    mean_cos = (cos.sum() - np.trace(cos)) / (n * (n - 1))
    p = lam[lam > 0] / lam.sum()
    sd = np.sqrt(d)
    lam_hat = sd * lam / np.linalg.norm(lam)
    delta = np.linalg.norm(lam_hat - 1) / np.sqrt(2 * (d - sd))
    return {
        "Q": np.mean(np.sum(X * X, axis=1)),
        "M": mu @ mu,
        "V": np.mean(np.sum(Xc * Xc, axis=1)),
        "anisotropy": lam[0] / lam.sum(),
        "anisotropy_uncentered": lam_s[0] / lam_s.sum(),
        "mean_cosine": mean_cos,
        "isoscore": ((d - delta**2 * (d - sd)) ** 2 - d) / (d * (d - 1)),
        "effective_rank": np.exp(-np.sum(p * np.log(p))),
        "participation_ratio": lam.sum() ** 2 / np.sum(lam**2),
    }, C, mu


def make_data(rng, n, d, offset_norm, spread):
    direction = rng.normal(size=d)
    offset = offset_norm * direction / np.linalg.norm(direction)
    scales = np.linspace(0.2, 2.0, d)  # anisotropic, so every metric is informative
    return offset + spread * rng.normal(size=(n, d)) * scales


CASES = [(0.0, 1.0), (3.0, 1.0), (1e4, 1e-3)]


@pytest.mark.parametrize("offset_norm,spread", CASES)
def test_matches_two_pass_reference(offset_norm, spread):
    rng = np.random.default_rng(0)
    X = make_data(rng, 1500, 24, offset_norm, spread)
    ref, C, mu = reference(X)
    m = Moments(24)
    for chunk in np.array_split(X, [7, 400, 401, 1100]):
        m.update(chunk)
    got = m.metrics()
    assert m.n == 1500
    for key in METRICS:
        assert got[key] == pytest.approx(ref[key], rel=1e-7, abs=1e-15), key
    np.testing.assert_allclose(m.covariance, C, rtol=1e-7, atol=1e-7 * np.abs(C).max())
    np.testing.assert_allclose(m.mean, mu, rtol=1e-12)
    assert m.Q == pytest.approx(m.M + m.V, rel=1e-15)


def test_float32_and_torch_input_match_float64_of_same_values():
    rng = np.random.default_rng(1)
    X32 = make_data(rng, 800, 16, 5.0, 1.0).astype(np.float32)
    ref, _, _ = reference(X32.astype(np.float64))
    m = Moments(16).update(torch.from_numpy(X32))
    got = m.metrics()
    for key in METRICS:
        assert got[key] == pytest.approx(ref[key], rel=1e-7), key


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_merge_in_any_split_equals_one_pass(splits):
    rng = np.random.default_rng(2)
    X = make_data(rng, 999, 12, 1e4, 1e-3)
    one = Moments(12).update(X)
    parts = [Moments(12).update(p) for p in np.array_split(X, splits)]
    rng.shuffle(parts)
    merged = Moments(12)
    for p in parts:
        merged.merge(p)
    a, b = one.metrics(), merged.metrics()
    for key in METRICS:
        assert b[key] == pytest.approx(a[key], rel=1e-9), key
    assert merged.n == one.n


def test_state_dict_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(3)
    m = Moments(8).update(rng.normal(size=(100, 8)))
    path = tmp_path / "m.pt"
    torch.save(m.state_dict(), path)
    r = Moments.from_state_dict(torch.load(path))
    assert r.n == m.n and r.metrics() == m.metrics()
    r.update(rng.normal(size=(5, 8)))  # still usable after loading
    assert r.n == 105
    empty = Moments.from_state_dict(Moments(4).state_dict())
    assert empty.n == 0


def test_zero_vectors_have_no_direction_for_mean_cosine():
    X = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    m = Moments(2).update(X)
    # pairs among the three non-zero vectors: cos = 1 (one pair), 0 (two pairs)
    assert m.mean_cosine == pytest.approx(1.0 / 3.0)
    assert m.n == 4 and m.n_nonzero == 3


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_batch_adds_nothing(bad):
    rng = np.random.default_rng(7)
    m = Moments(6).update(rng.normal(size=(50, 6)))
    before = m.state_dict()
    X = rng.normal(size=(30, 6))
    X[17, 2] = bad
    with pytest.raises(EmbgeomError, match="NaN or infinite"):
        m.update(X)
    after = m.state_dict()
    assert after["n"] == 50 and all(torch.equal(before[k], after[k]) for k in before if isinstance(before[k], torch.Tensor))


def test_anisotropy_function_on_plain_arrays():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(300, 10)) * np.r_[10.0, np.ones(9)]
    ref, _, _ = reference(X)
    assert anisotropy(X) == pytest.approx(ref["anisotropy"], rel=1e-10)


def test_bad_input_is_named():
    m = Moments(4)
    with pytest.raises(EmbgeomError, match="width 3"):
        m.update(np.zeros((2, 3)))
    with pytest.raises(EmbgeomError, match="shape"):
        m.update(np.zeros(4))
    with pytest.raises(EmbgeomError, match="non-finite|NaN"):
        m.update(np.array([[np.nan, 0, 0, 0]]))
    with pytest.raises(EmbgeomError, match="at least one"):
        Moments(4).metrics()
    with pytest.raises(EmbgeomError):
        Moments(0)
    with pytest.raises(EmbgeomError, match="width"):
        Moments(4).merge(Moments(5).update(np.ones((1, 5))))


@pytest.mark.parametrize("d", [7, 100, 191, 384, 577])
def test_upper_gram_symmetrised_is_exactly_symmetric_and_equals_xtx(d):
    from embgeom.stats.moments import add_gram_upper, symmetric_from_upper

    x = torch.from_numpy(np.random.default_rng(d).normal(size=(150, d)))
    g = symmetric_from_upper(add_gram_upper(torch.zeros(d, d, dtype=torch.float64), x))
    want = x.T @ x
    assert torch.equal(g, g.T)
    torch.testing.assert_close(g, want, rtol=1e-13, atol=1e-13 * float(want.abs().max()))
