"""Issue 17: GRIDE across scales, linear CKA and linearity between layers, curvature and
prompt entropy per window, each against a float64 reference written from its formula."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import betaln

import embgeom
from embgeom import EmbgeomError
from embgeom.metrics.gride import gride_from_distances, gride_plateau
from embgeom.stats.cross_moments import CrossMoments
from embgeom.stats.layers import LayerStatistics


# ----------------------------------------------------------------------------- GRIDE
def _knn_reference(X, k):
    D = np.sqrt(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(D, np.inf)
    return np.sort(D, axis=1)[:, :k]


def _gride_reference(dist, n1, n2):
    """Maximise the log-likelihood of f(μ) written out, numerically; id_err from a
    finite-difference second derivative."""
    mu = dist[:, n2 - 1] / dist[:, n1 - 1]

    def loglik(d):
        return np.sum(np.log(d) + (n2 - n1 - 1) * np.log(mu ** d - 1) - ((n2 - 1) * d + 1) * np.log(mu)
                      - betaln(n2 - n1, n1))

    d = minimize_scalar(lambda d: -loglik(d), bounds=(0.05, 200), method="bounded",
                        options=dict(xatol=1e-10)).x
    h = 1e-4 * d
    second = (loglik(d + h) - 2 * loglik(d) + loglik(d - h)) / h ** 2
    return d, 1 / math.sqrt(-second)


def test_gride_maximises_the_likelihood_of_the_formula():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 5))
    table = embgeom.gride(X, max_rank=16)
    assert table[["n1", "n2"]].values.tolist() == [[1, 2], [2, 4], [4, 8], [8, 16]]
    dist = _knn_reference(X, 16)
    for _, row in table.iterrows():
        d, err = _gride_reference(dist, int(row.n1), int(row.n2))
        assert row["id"] == pytest.approx(d, rel=1e-6)
        assert row["id_err"] == pytest.approx(err, rel=1e-4)
        assert row["scale"] == pytest.approx(dist[:, int(row.n2) - 1].mean(), rel=1e-12)


def test_gride_at_first_scale_is_the_maximum_likelihood_twonn():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 4))
    first = embgeom.gride(X, max_rank=8).iloc[0]
    n = len(X)
    d = _knn_reference(X, 2)
    S = np.log(d[:, 1] / d[:, 0]).sum()
    assert first["id"] == pytest.approx(n / S, rel=1e-12)
    assert first["id_err"] == pytest.approx(n / S / math.sqrt(n), rel=1e-12)
    # twonn_ml reports the unbiased (n − 1)/S; the likelihood's maximiser is n/S.
    assert first["id"] == pytest.approx(embgeom.twonn_ml(X)[0] * n / (n - 1), rel=1e-12)


def test_gride_removes_exact_duplicates():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(200, 3))
    doubled = np.concatenate([X, X[:50], X[:10]])
    pd.testing.assert_frame_equal(embgeom.gride(doubled, 32), embgeom.gride(X, 32))


def test_gride_finds_the_dimension_of_a_manifold_at_mid_scales():
    rng = np.random.default_rng(3)
    Z = rng.uniform(size=(4000, 3))
    Q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    X = Z @ Q[:3]  # a 3-d cube isometrically in R^12
    table = embgeom.gride(X, max_rank=32)
    mid = table[(table.n1 >= 2) & (table.n1 <= 8)]
    assert np.all(np.abs(mid["id"] - 3) / 3 < 0.05), table


def test_gride_refuses_bad_input():
    with pytest.raises(EmbgeomError, match="max_rank"):
        embgeom.gride(np.eye(5), max_rank=1)
    with pytest.raises(EmbgeomError, match="3 distinct"):
        embgeom.gride(np.ones((10, 2)))
    with pytest.raises(EmbgeomError, match="positive"):
        gride_from_distances(np.zeros((5, 4)))


def test_plateau_is_the_pair_of_scales_with_the_smallest_relative_change():
    t = pd.DataFrame(dict(n1=[1, 2, 4, 8, 16], n2=[2, 4, 8, 16, 32], scale=[1.0, 2, 3, 4, 5],
                          id=[5.0, 9.0, 10.0, 10.5, 14.0], id_err=0.1))
    p = gride_plateau(t)
    # relative changes: 4/7, 1/9.5, 0.5/10.25, 3.5/12.25 -> the third pair
    assert (p["n1_low"], p["n1_high"], p["scale_low"], p["scale_high"]) == (4, 8, 3.0, 4.0)
    assert p["id"] == pytest.approx(10.25)
    assert math.isnan(gride_plateau(t.iloc[:1])["id"])


# ----------------------------------------------------------------------- CKA, linearity
def _cka_reference(X, Y):
    """HSIC form of Kornblith et al.: tr(K H L H) / sqrt(tr(K H K H) tr(L H L H))."""
    n = len(X)
    H = np.eye(n) - 1.0 / n
    K, L = X @ X.T, Y @ Y.T
    return np.trace(K @ H @ L @ H) / math.sqrt(np.trace(K @ H @ K @ H) * np.trace(L @ H @ L @ H))


def _linearity_reference(X, Y):
    """1 − min_A ‖X̃A − Ỹ‖² by least squares, X̃ and Ỹ centred, unit Frobenius norm."""
    Xt = X - X.mean(0)
    Yt = Y - Y.mean(0)
    Xt, Yt = Xt / np.linalg.norm(Xt), Yt / np.linalg.norm(Yt)
    A = np.linalg.lstsq(Xt, Yt, rcond=None)[0]
    return 1 - np.linalg.norm(Xt @ A - Yt) ** 2


def test_linear_cka_and_linearity_against_their_definitions():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(120, 7)) + 3.0
    Y = np.tanh(X @ rng.normal(size=(7, 5))) + 0.1 * rng.normal(size=(120, 5))
    assert embgeom.linear_cka(X, Y) == pytest.approx(_cka_reference(X, Y), rel=1e-10)
    assert embgeom.linearity(X, Y) == pytest.approx(_linearity_reference(X, Y), rel=1e-10)
    # an affine map is perfectly linear; CKA is 1 up to rotation and scale
    R, _ = np.linalg.qr(rng.normal(size=(7, 7)))
    assert embgeom.linearity(X, 2 * X @ rng.normal(size=(7, 3)) + 1) == pytest.approx(1, abs=1e-12)
    assert embgeom.linear_cka(X, 3 * X @ R + 5) == pytest.approx(1, rel=1e-12)


def test_linearity_drops_null_directions_of_x():
    rng = np.random.default_rng(5)
    B = rng.normal(size=(40, 3))
    X = np.concatenate([B, B @ rng.normal(size=(3, 4))], axis=1)  # rank 3 in R^7
    Y = rng.normal(size=(40, 6))
    assert embgeom.linearity(X, Y) == pytest.approx(_linearity_reference(X, Y), rel=1e-8)


def test_cross_moments_stream_merge_and_state_equal_two_passes():
    rng = np.random.default_rng(6)
    X = rng.normal(size=(300, 6)) * 1e-3 + 1e4  # far from the origin, tiny spread
    Y = rng.normal(size=(300, 4)) + X[:, :4] * 0.5
    a, b = CrossMoments(6, 4), CrossMoments(6, 4)
    for s in range(0, 200, 37):
        a.update(torch.from_numpy(X[s:min(s + 37, 200)]), torch.from_numpy(Y[s:min(s + 37, 200)]))
    b.update(torch.from_numpy(X[200:]), torch.from_numpy(Y[200:]))
    a = CrossMoments.from_state_dict(a.state_dict()).merge(b)
    ref = (X - X.mean(0)).T @ (Y - Y.mean(0))
    # X is 1e7 spreads from the origin: the two-pass reference itself is good to ~1e-9.
    np.testing.assert_allclose(a.cross_scatter, ref, rtol=1e-7, atol=1e-8 * np.abs(ref).max())
    assert a.n == 300
    sd = a.state_dict()
    sd["version"] = 0
    with pytest.raises(EmbgeomError, match="version"):
        CrossMoments.from_state_dict(sd)


# ---------------------------------------------------------------- curvature, entropy
def _curvature_reference(H):
    angles = []
    for t in range(len(H) - 2):
        u, v = H[t + 1] - H[t], H[t + 2] - H[t + 1]
        angles.append(math.acos(np.clip(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)), -1, 1)))
    return float(np.mean(angles)) if angles else math.nan


def _entropy_reference(H, alpha=1.0):
    # H Hᵀ and Hᵀ H share their non-zero spectrum: take the smaller, whose zero
    # eigenvalues are true ones.
    G = H @ H.T if H.shape[0] <= H.shape[1] else H.T @ H
    lam = np.clip(np.linalg.eigvalsh(G), 0, None)
    p = lam / lam.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum()) if alpha == 1 else float(np.log((p ** alpha).sum()) / (1 - alpha))


def test_curvature_and_prompt_entropy_against_their_definitions():
    rng = np.random.default_rng(7)
    H = rng.normal(size=(30, 12)) + 2.0
    assert embgeom.curvature(H) == pytest.approx(_curvature_reference(H), rel=1e-12)
    for alpha in (1.0, 2.0, 0.5):
        assert embgeom.prompt_entropy(H, alpha) == pytest.approx(_entropy_reference(H, alpha), rel=1e-10)
    line = np.outer(np.arange(5.0), np.ones(3))
    assert embgeom.curvature(line) == pytest.approx(0, abs=1e-7)  # a straight path
    assert embgeom.prompt_entropy(line[1:]) == pytest.approx(0, abs=1e-12)  # rank one
    assert math.isnan(embgeom.curvature(H[:2]))
    assert embgeom.prompt_entropy(np.eye(4)) == pytest.approx(math.log(4))
    with pytest.raises(EmbgeomError, match="alpha"):
        embgeom.prompt_entropy(H, 0)


@pytest.mark.parametrize("n, d", [(6, 10), (10, 6), (9, 9)])
def test_window_entropies_batched_take_either_gram(n, d):
    """Equal windows (laid out as they come) and unequal ones (padded) alike, with
    fewer rows than features and more: each window's entropy is its own."""
    from embgeom.metrics.trajectory import padded_windows, window_curvatures, window_entropies

    rng = np.random.default_rng(n * d)
    for lengths in ([n, n, n], [n, 2, n - 1]):
        rows = rng.normal(size=(sum(lengths), d)) + 1.0
        lens = torch.tensor(lengths)
        P = padded_windows(torch.from_numpy(rows), lens)
        windows = np.split(rows, np.cumsum(lengths)[:-1])
        for alpha in (1.0, 0.5, 2.0):
            got = window_entropies(P, alpha).numpy()
            np.testing.assert_allclose(got, [_entropy_reference(H, alpha) for H in windows], rtol=1e-10)
        want_curv = [_curvature_reference(H) for H in windows]
        np.testing.assert_allclose(window_curvatures(P, lens).numpy(), want_curv, rtol=1e-12)


# --------------------------------------------------------------- LayerStatistics
@pytest.mark.parametrize("T, d", [(40, 8), (12, 32)])  # windows longer than wide, and not
def test_layer_statistics_cross_layer_and_window_means_in_both_views(T, d):
    """Two layers with massive activations at different tokens: the inliers view of a
    pair is the tokens inliers in both; window means weight each window equally.
    Windows longer than wide take the d × d Gram, the others the n × n one."""
    rng = np.random.default_rng(8)
    B = 4
    batches = []
    for _ in range(5):
        h0 = rng.normal(size=(B, T, d))
        h1 = np.tanh(h0 @ rng.normal(size=(d, d))) + 0.3 * rng.normal(size=(B, T, d))
        h0[:, 3, 0] = 500.0  # outlier at layer 0 only
        h1[:, 7, 1] = 500.0  # outlier at layer 1 only
        h1[:, 11, 1] = 500.0
        h0[:, 11, 0] = 500.0  # outlier at both
        counted = np.ones((B, T), dtype=bool)
        counted[0, 30:] = False
        counted[1, 2:] = False  # a window of 2 counted tokens: no curvature
        batches.append((h0, h1, counted))
    stats = LayerStatistics({"main": 1}, d, with_types=False, outlier_factor=10.0)
    for i, (h0, h1, counted) in enumerate(batches):
        stats.update("main", [torch.from_numpy(h0), torch.from_numpy(h1)], torch.from_numpy(counted),
                     torch.zeros(B, T, dtype=torch.long))
        if i == 1:
            stats.calibrate()
    stats.finish()
    cross = stats.cross_layer_metrics("main")[1]
    X = np.concatenate([h0[c] for h0, _, c in batches])
    Y = np.concatenate([h1[c] for _, h1, c in batches])
    lim = [10 * stats.median_norm["main"][l] for l in (0, 1)]
    both = (np.linalg.norm(X, axis=1) <= lim[0]) & (np.linalg.norm(Y, axis=1) <= lim[1])
    assert both.sum() == len(X) - 3 * 3 * len(batches)  # tokens 3, 7, 11 of the 3 long windows
    for view, keep in (("all", slice(None)), ("inliers", both)):
        assert cross[view]["linear_cka"] == pytest.approx(_cka_reference(X[keep], Y[keep]), rel=1e-9)
        assert cross[view]["linearity"] == pytest.approx(_linearity_reference(X[keep], Y[keep]), rel=1e-9)
    for layer, lim_l in enumerate(lim):
        curv = {"all": [], "inliers": []}
        ent = {"all": [], "inliers": []}
        for batch in batches:
            h, counted = batch[layer], batch[2]
            for w in range(B):
                H = h[w][counted[w]]
                for view, Hv in (("all", H), ("inliers", H[np.linalg.norm(H, axis=1) <= lim_l])):
                    if len(Hv) >= 3:
                        curv[view].append(_curvature_reference(Hv))
                    if len(Hv):
                        ent[view].append(_entropy_reference(Hv))
        for view in ("all", "inliers"):
            got = stats.window_means("main", layer, view)
            assert got["curvature"] == pytest.approx(np.mean(curv[view]), rel=1e-10)
            assert got["prompt_entropy"] == pytest.approx(np.mean(ent[view]), rel=1e-10)
    assert stats.window_means("main", 0, "all") != stats.window_means("main", 0, "inliers")


def test_layer_statistics_without_cross_layer_keep_no_pairs():
    stats = LayerStatistics({"main": 2}, 4, with_types=False, cross_layer=False)
    assert stats.pairs == {}
    with_pairs = LayerStatistics.planned_parts({"main": 2}, 4, cross_layer=True)
    without = LayerStatistics.planned_parts({"main": 2}, 4, cross_layer=False)
    assert with_pairs["cross-layer moments"] == 2 * (2 * 8 * (16 + 8) + 2 * 8 * (16 + 8))
    assert "cross-layer moments" not in without


# ------------------------------------------------------------------------- pipeline
def test_pipeline_columns_match_the_functions_on_hidden_states(tiny_models, lee_corpus, tmp_path):
    """Every window run alone: the per-window means, CKA/linearity between consecutive
    layers and GRIDE on every token (the sample holds them all) equal the functions."""
    from embgeom.models import load_model
    from reference import windows_of

    texts = lee_corpus.read_text().splitlines()[:6]
    res = embgeom.analyze(str(tiny_models["gpt2"]), texts, seq_len=32, batch_size=3, device="cpu",
                          id_sample=100000, outlier_factor=1e6)
    lm = load_model(str(tiny_models["gpt2"]), device="cpu")
    windows = windows_of(texts, lm.tokenizer, 32, lm.facts.special_prefix, lm.facts.special_suffix)
    per_window = []
    with torch.no_grad():
        for w in windows:
            hs = lm.model(input_ids=torch.tensor([w]), output_hidden_states=True).hidden_states
            per_window.append([h[0].double().numpy() for h in hs])
    L = len(per_window[0])
    X = [np.concatenate([pw[layer] for pw in per_window]) for layer in range(L)]
    rows = res.layers[res.layers["view"] == "all"].sort_values("layer").reset_index(drop=True)
    # batching pads windows: float32 attention differs in the last bits
    for layer in range(L):
        row = rows.iloc[layer]
        curv = np.nanmean([_curvature_reference(pw[layer]) for pw in per_window if len(pw[layer]) >= 3])
        ent = np.mean([_entropy_reference(pw[layer]) for pw in per_window])
        assert row["curvature"] == pytest.approx(curv, rel=1e-4)
        assert row["prompt_entropy"] == pytest.approx(ent, rel=1e-4)
        if layer == 0:
            assert math.isnan(row["linear_cka"]) and math.isnan(row["linearity"])
        else:
            assert row["linear_cka"] == pytest.approx(_cka_reference(X[layer - 1], X[layer]), rel=1e-4)
            assert row["linearity"] == pytest.approx(_linearity_reference(X[layer - 1], X[layer]), rel=1e-4)
        got = res.id_scale[(res.id_scale["layer"] == layer) & (res.id_scale["view"] == "all")]
        want = embgeom.gride(X[layer], 64)
        np.testing.assert_allclose(got["id"].to_numpy(), want["id"].to_numpy(), rtol=1e-3)
    assert list(res.id_scale.columns) == ["model", "revision", "step", "stack", "layer", "view", "n1", "n2",
                                          "scale", "id", "id_err"]
    assert set(res.id_scale["view"]) == {"all", "inliers"}
    out = embgeom.save_run(res, tmp_path / "out")
    loaded = embgeom.Result.load(out)
    pd.testing.assert_frame_equal(loaded.id_scale, res.id_scale)
    report = (out / "report.md").read_text()
    assert "linear CKA" in report and "plateau" in report and "curvature" in report
    for name in ("cross_layer.png", "curvature_entropy.png"):
        assert (out / "figures" / name).exists(), name
    assert len(list((out / "figures").glob("id_scale_*.png"))) == 1


def test_no_cross_layer_leaves_those_columns_nan(tiny_models, lee_corpus):
    texts = lee_corpus.read_text().splitlines()[:3]
    res = embgeom.analyze(str(tiny_models["gpt2"]), texts, seq_len=32, batch_size=3, device="cpu", id_sample=0,
                          cross_layer=False)
    assert res.layers["linear_cka"].isna().all() and res.layers["linearity"].isna().all()
    assert res.layers["curvature"].notna().all()
    assert res.id_scale is not None and len(res.id_scale) == 0
    off = embgeom.analyze(str(tiny_models["gpt2"]), texts, seq_len=32, batch_size=3, device="cpu", id_sample=0,
                          window_measures=False)
    assert off.layers["curvature"].isna().all() and off.layers["prompt_entropy"].isna().all()
    assert off.layers.loc[off.layers["layer"] > 0, "linear_cka"].notna().all() and off.run["config"]["window_measures"] is False
    same = ["layer", "view", "M", "V", "anisotropy"]
    pd.testing.assert_frame_equal(off.layers[same], res.layers[same])


def test_gride_max_rank_sets_the_scales_and_zero_drops_them(tiny_models, lee_corpus):
    """The id_* columns do not depend on GRIDE's rank (the first k columns of an
    exact k-NN are the smaller search's); the rank sets id_scale's scales, and 0
    leaves id_scale empty with a rank-20 search."""
    texts = lee_corpus.read_text().splitlines()[:6]
    runs = {r: embgeom.analyze(str(tiny_models["gpt2"]), texts, seq_len=32, batch_size=3, device="cpu",
                               id_sample=300, cross_layer=False, window_measures=False, gride_max_rank=r)
            for r in (0, 16, 64)}
    ids = [c for c in runs[64].layers.columns if c.startswith("id_")]
    for r in (0, 16):
        pd.testing.assert_frame_equal(runs[r].layers[ids], runs[64].layers[ids])
        assert runs[r].run["config"]["gride_max_rank"] == r
    assert len(runs[0].id_scale) == 0
    assert sorted(set(runs[16].id_scale["n2"])) == [2, 4, 8, 16]
    assert sorted(set(runs[64].id_scale["n2"])) == [2, 4, 8, 16, 32, 64]
    head = runs[64].id_scale[runs[64].id_scale["n2"] <= 16].reset_index(drop=True)
    pd.testing.assert_frame_equal(runs[16].id_scale, head)
    with pytest.raises(EmbgeomError, match="gride_max_rank must be 0"):
        embgeom.analyze(str(tiny_models["gpt2"]), texts, gride_max_rank=1)


@pytest.mark.parametrize("change, match", [
    (lambda sd: sd.update(n=-3), "n must be"),
    (lambda sd: sd.update(n=2.5), "n must be an integer"),
    (lambda sd: sd["cross"].__setitem__((0, 0), float("nan")), "cross holds NaN"),
    (lambda sd: sd.update(mean_x=sd["mean_x"][:2]), "mean_x has shape"),
    (lambda sd: sd.pop("cross"), "lacks the entry 'cross'"),
])
def test_cross_moments_state_refused_when_damaged(change, match):
    sd = CrossMoments(3, 2).update(torch.randn(10, 3), torch.randn(10, 2)).state_dict()
    change(sd)
    with pytest.raises(EmbgeomError, match=match):
        CrossMoments.from_state_dict(sd)


def test_window_measures_read_curvature_off_the_gram_only_where_it_is_exact():
    """One Gram per window serves both measures. Windows whose steps are long next
    to their states take the curvature from the Gram; windows with a zero step
    (a repeated state) or short steps far from the origin are computed from the
    rows: every value equals the direct one."""
    from embgeom.metrics.trajectory import _curvatures_from_gram, padded_windows, window_grams, window_measures

    rng = np.random.default_rng(21)
    d = 24
    plain = rng.normal(size=(10, d))
    repeated = rng.normal(size=(10, d))
    repeated[4] = repeated[3]  # a zero step
    far = 1e4 + 1e-2 * rng.normal(size=(10, d))  # short steps between long states
    short = rng.normal(size=(5, d))
    windows = [plain, repeated, far, short, plain[:2]]
    lens = torch.tensor([len(w) for w in windows])
    P = padded_windows(torch.from_numpy(np.concatenate(windows)), lens)
    _, trusted = _curvatures_from_gram(window_grams(P), lens, d)
    assert trusted.tolist() == [True, False, False, True, True]
    got = window_measures(P, lens)
    # the zero step v_3 has no direction: the angles at t = 2 and 3 are left out
    with_gap = _curvature_reference(repeated[:4]) * 2 / 6 + _curvature_reference(repeated[4:]) * 4 / 6
    want_curv = [with_gap if w is repeated else _curvature_reference(w) for w in windows]
    np.testing.assert_allclose(got[0].numpy(), want_curv, rtol=1e-12)
    np.testing.assert_allclose(got[1].numpy(), [_entropy_reference(w) for w in windows], rtol=1e-10, atol=1e-12)
    # the Gram's own values of the untrusted windows are off: the redo is needed
    values, _ = _curvatures_from_gram(window_grams(P), lens, d)
    assert abs(values[2].item() - want_curv[2]) > 1e-9
