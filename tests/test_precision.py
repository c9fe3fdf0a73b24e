"""Float32 products with float64 accumulation (precision="auto") against the float64
two-pass reference: within 1e-5 on every metric; precision="float64" within 1e-9."""
import numpy as np
import pytest
import torch

from embgeom import analyze
from embgeom.errors import EmbgeomError
from embgeom.stats.moments import Moments
from test_moments import METRICS, reference


def far_from_origin(n, d, seed=0):
    """float64 values: every coordinate near 1e3, spreads 0.1 to 1, one strong direction."""
    rng = np.random.default_rng(seed)
    X = 1e3 + rng.normal(size=(n, d)) * np.linspace(0.1, 1.0, d)
    X[:, :3] += 3 * rng.normal(size=(n, 1))
    return X


def streamed(X, precision="auto", parts=2, seed=0):
    """X in batches of 1 to 700 rows, dealt to `parts` accumulators, merged."""
    rng = np.random.default_rng(seed)
    accs = [Moments(X.shape[1], precision=precision) for _ in range(parts)]
    start, i = 0, 0
    while start < len(X):
        nb = int(rng.integers(1, 700))
        accs[i % parts].update(X[start:start + nb])
        start += nb
        i += 1
    for a in accs[1:]:
        accs[0].merge(a)
    return accs[0]


def assert_metrics(got, want, rel):
    for key in METRICS:
        assert got[key] == pytest.approx(want[key], rel=rel), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_model_precision_far_from_origin_within_1e5(dtype):
    X = torch.from_numpy(far_from_origin(4000, 40)).to(dtype)
    want, C, _ = reference(X.double().numpy())  # the same (rounded) values, float64 two-pass
    m = streamed(X, parts=3)
    assert m.products == {"float32"} and m.n == 4000
    assert_metrics(m.metrics(), want, 1e-5)
    np.testing.assert_allclose(m.covariance, C, rtol=0, atol=1e-5 * np.abs(C).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_float64_precision_within_1e9(dtype):
    X = torch.from_numpy(far_from_origin(3000, 24, seed=1)).to(dtype)
    want, _, _ = reference(X.double().numpy())
    m = streamed(X, precision="float64")
    assert m.products == {"float64"}
    assert_metrics(m.metrics(), want, 1e-9)
    # float64 input keeps float64 products under "auto" too
    if dtype == torch.float64:
        auto = streamed(X)
        assert auto.products == {"float64"}
        assert_metrics(auto.metrics(), want, 1e-9)


def test_merges_of_different_clouds_and_any_sharding_are_exact():
    X = torch.from_numpy(far_from_origin(3000, 16, seed=2)).float()
    Y = X[1500:] + 50.0  # a second cloud, far from the first one's mean
    a, b = Moments(16).update(X[:1500]), Moments(16).update(Y)
    ab = Moments.from_state_dict(a.state_dict()).merge(b)
    ba = Moments.from_state_dict(b.state_dict()).merge(a)
    # the merge is float64 algebra on the states: the order does not matter
    np.testing.assert_allclose(ab.mean, ba.mean, rtol=1e-15)
    np.testing.assert_allclose(ab.covariance, ba.covariance, rtol=1e-13, atol=1e-13 * np.abs(ab.covariance).max())
    both = torch.cat([X[:1500], Y])
    want, _, _ = reference(both.double().numpy())
    assert_metrics(ab.metrics(), want, 1e-5)
    # A batch's float32 products do not depend on the accumulator it goes to, so the
    # same batches dealt to one or to three accumulators agree to float64 rounding.
    one, three = streamed(both, parts=1, seed=5), streamed(both, parts=3, seed=5)
    assert_metrics(three.metrics(), one.metrics(), 1e-12)


def test_state_dict_round_trip_then_more_batches_is_exact(tmp_path):
    X = torch.from_numpy(far_from_origin(600, 8, seed=3)).float()
    m = Moments(8).update(X[:300])
    torch.save(m.state_dict(), tmp_path / "m.pt")
    r = Moments.from_state_dict(torch.load(tmp_path / "m.pt"))
    assert r.precision == "auto" and r.products == {"float32"}
    m.update(X[300:])
    r.update(X[300:])
    a, b = m.state_dict(), r.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in ("mean", "scatter", "unit_sum"))
    f = Moments.from_state_dict(Moments(8, precision="float64").update(X).state_dict())
    assert f.precision == "float64" and f.products == {"float64"}


def test_float32_overflow_falls_back_to_float64():
    # finite in bfloat16, but their squares overflow float32: the batch is redone in float64
    X = torch.from_numpy(far_from_origin(200, 6, seed=4) * 1e19).bfloat16()
    m = Moments(6).update(X)
    assert m.products == {"float64"}
    want, _, _ = reference(X.double().numpy())
    assert_metrics(m.metrics(), want, 1e-9)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_float32_batch_adds_nothing(bad):
    X = torch.from_numpy(far_from_origin(80, 6, seed=5)).float()
    m = Moments(6).update(X[:50])
    before = m.state_dict()
    Y = X[50:].clone()
    Y[7, 2] = bad
    with pytest.raises(EmbgeomError, match="NaN or infinite"):
        m.update(Y)
    after = m.state_dict()
    assert after["n"] == 50 and all(torch.equal(before[k], after[k]) for k in ("mean", "scatter", "unit_sum"))
    with pytest.raises(EmbgeomError, match="NaN or infinite"):
        Moments(6).update(Y)


def test_unknown_precision_is_refused(tiny_models):
    with pytest.raises(EmbgeomError, match="precision"):
        Moments(4, precision="float16")
    with pytest.raises(EmbgeomError, match="^precision must"):  # the Python API's spelling
        analyze(str(tiny_models["gpt2"]), ["some text here"], precision="bf16")


def test_analyze_records_precision_and_both_paths_agree(tiny_models, lee_corpus):
    kw = dict(seq_len=32, batch_size=4, max_tokens=400, device="cpu", id_sample=0, token_types="none")
    auto = analyze(str(tiny_models["llama"]), lee_corpus, **kw)
    exact = analyze(str(tiny_models["llama"]), lee_corpus, precision="float64", **kw)
    assert auto.run["precision"]["products"] == ["float32"] and auto.run["config"]["precision"] == "auto"
    assert exact.run["precision"]["products"] == ["float64"]
    for a, b in ((auto.layers, exact.layers), (auto.spectrum, exact.spectrum)):
        num = [c for c in a.columns if a[c].dtype.kind == "f" and not a[c].isna().all()]
        np.testing.assert_allclose(a[num].to_numpy(), b[num].to_numpy(), rtol=1e-5, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_float32_products_ignore_tf32():
    X = torch.from_numpy(far_from_origin(3000, 64, seed=6)).float()
    want, _, _ = reference(X.double().numpy())
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # a user's global setting must not reach the Gram
    try:
        m = streamed(X.cuda())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert m.products == {"float32"}
    assert_metrics(m.metrics(), want, 1e-5)


@pytest.mark.slow
def test_minilm_hidden_states_within_1e5(lee_corpus):
    from embgeom.models import load_model
    from embgeom.packaged import minilm_path
    from reference import hidden_vectors, windows_of

    lm = load_model(str(minilm_path()), device="cpu")
    texts = lee_corpus.read_text().splitlines()[:4]
    windows = windows_of(texts, lm.tokenizer, 96, lm.facts.special_prefix, lm.facts.special_suffix)
    for X in hidden_vectors(lm.model, windows)["main"]:
        want, _, _ = reference(X)
        m = streamed(torch.from_numpy(X).float(), parts=2)
        assert m.products == {"float32"}
        assert_metrics(m.metrics(), want, 1e-5)


def _streamed_cross(X, Y, precision="auto", seed=0):
    """Pairs (X, Y) in batches of 1 to 700 rows into two CrossMoments, merged."""
    from embgeom.stats.cross_moments import CrossMoments

    rng = np.random.default_rng(seed)
    accs = [CrossMoments(X.shape[1], Y.shape[1], precision=precision) for _ in range(2)]
    start, i = 0, 0
    while start < len(X):
        nb = int(rng.integers(1, 700))
        accs[i % 2].update(X[start:start + nb], Y[start:start + nb])
        start, i = start + nb, i + 1
    return accs[0].merge(accs[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cross_moments_model_precision_far_from_origin(dtype):
    X = torch.from_numpy(far_from_origin(4000, 24, seed=2)).to(dtype)
    Y = torch.from_numpy(far_from_origin(4000, 16, seed=3) + 0.5 * far_from_origin(4000, 24, seed=2)[:, :16]).to(dtype)
    Xd, Yd = X.double().numpy(), Y.double().numpy()
    ref = (Xd - Xd.mean(0)).T @ (Yd - Yd.mean(0))
    auto = _streamed_cross(X, Y)
    np.testing.assert_allclose(auto.cross_scatter, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    exact = _streamed_cross(X, Y, precision="float64")
    np.testing.assert_allclose(exact.cross_scatter, ref, rtol=0, atol=1e-9 * np.abs(ref).max())
    # The float32 path is not the float64 one in disguise: its products differ in the last bits.
    assert not np.array_equal(auto.cross_scatter, exact.cross_scatter)
    assert auto.state_dict()["precision"] == "auto" and exact.state_dict()["precision"] == "float64"


def test_cross_moments_float32_overflow_falls_back_to_float64():
    from embgeom.stats.cross_moments import CrossMoments

    X = torch.tensor([[3e19], [-3e19], [1e19]], dtype=torch.float32)  # squares overflow float32
    got = CrossMoments(1, 1).update(X, X).cross_scatter
    Xd = X.double().numpy()
    want = (Xd - Xd.mean(0)).T @ (Xd - Xd.mean(0))
    np.testing.assert_allclose(got, want, rtol=1e-6)
