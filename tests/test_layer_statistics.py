"""The two views (all, inliers) on synthetic hidden states with massive activations."""
import numpy as np
import pytest
import torch

from embgeom.stats.layers import LayerStatistics
from reference import two_pass

# Every test on both paths of the per-type accumulators (compiled loops and torch).
pytestmark = pytest.mark.usefixtures("path")


def synthetic_stream(rng, n_batches=6, B=4, T=50, d=16, huge_every=25):
    """Isotropic vectors; every `huge_every`-th position of each window is a massive
    activation (norm ~1000x) along one fixed direction, as first tokens are in decoders."""
    direction = np.zeros(d)
    direction[0] = 1.0
    for _ in range(n_batches):
        h = rng.normal(size=(B, T, d))
        h[:, ::huge_every, :] = 3000.0 * direction + rng.normal(size=(B, T // huge_every, d))
        counted = np.ones((B, T), dtype=bool)
        counted[-1, -7:] = False  # padding of the last window
        types = rng.integers(0, 30, size=(B, T))
        yield h, counted, types


@pytest.mark.parametrize("precision,rel", [("float64", 1e-9), ("auto", 1e-5)])
def test_views_split_outliers_and_merge_exactly(precision, rel):
    rng = np.random.default_rng(0)
    stream = list(synthetic_stream(rng))
    stats = LayerStatistics({"decoder": 1}, 16, outlier_factor=10.0, precision=precision)
    for i, (h, counted, types) in enumerate(stream):
        if i == 2:
            stats.calibrate()
        hidden = [torch.from_numpy(h).float(), torch.from_numpy(2 * h).float()]
        meta = {"position": torch.arange(50).expand(4, 50)}
        stats.update("decoder", hidden, torch.from_numpy(counted), torch.from_numpy(types), meta)
    stats.finish()

    X = np.concatenate([h[c] for h, c, _ in stream]).astype(np.float32).astype(np.float64)
    norms = np.linalg.norm(X, axis=1)
    # The median is calibrated on the batches given before calibrate().
    first = np.concatenate([h[c] for h, c, _ in stream[:2]]).astype(np.float32).astype(np.float64)
    median = np.median(np.linalg.norm(first, axis=1))  # even count: torch takes the lower middle
    calib = np.sort(np.linalg.norm(first, axis=1))[(len(first) - 1) // 2]
    assert stats.median_norm["decoder"][0] == pytest.approx(calib, rel=1e-6)
    assert abs(calib - median) / median < 0.05
    inlier = norms <= 10.0 * calib

    all_view = stats.view("all", "decoder", 0)
    inl_view = stats.view("inliers", "decoder", 0)
    want_all, want_in = two_pass(X), two_pass(X[inlier])
    assert all_view.moments.n == len(X) and inl_view.moments.n == inlier.sum()
    for key in ("Q", "M", "V", "anisotropy", "mean_cosine"):
        assert all_view.moments.metrics()[key] == pytest.approx(want_all[key], rel=rel), key
        assert inl_view.moments.metrics()[key] == pytest.approx(want_in[key], rel=rel), key
    # A few huge vectors make the whole cloud one-dimensional; without them it is isotropic.
    assert all_view.moments.metrics()["anisotropy"] > 0.99
    assert inl_view.moments.metrics()["anisotropy"] < 0.2
    # Per-type counts add up in both views.
    assert all_view.types.table()["n"].sum() == len(X)
    assert inl_view.types.table()["n"].sum() == inlier.sum()
    # Every outlier is listed, with its position (multiples of 25).
    rows = [r for r in stats.outlier_records() if r["layer"] == 0]
    positions = torch.cat([r["position"] for r in rows]).numpy()
    assert len(positions) == (~inlier).sum() and set(positions % 25) == {0}


def test_non_finite_hidden_state_names_the_layer():
    from embgeom.errors import EmbgeomError

    stats = LayerStatistics({"encoder": 2}, 4)
    h = torch.ones(1, 3, 4)
    bad = h.clone()
    bad[0, 1, 2] = float("inf")
    with pytest.raises(EmbgeomError, match="encoder layer 2"):
        stats.update("encoder", [h, h, bad], torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 3, dtype=torch.long))
        stats.finish()  # batches before calibration are checked when they are accumulated


def test_calibration_mask_limits_the_median_not_the_accumulation():
    rng = np.random.default_rng(3)
    stream = list(synthetic_stream(rng, n_batches=3))
    stats = LayerStatistics({"main": 0}, 16, outlier_factor=10.0, precision="float64")
    keep = []
    for i, (h, counted, types) in enumerate(stream):
        if i == 2:
            stats.calibrate()
        calib = np.zeros_like(counted)
        calib[: 2 + i] = True  # the first windows of each held-back batch only
        keep.append(calib)
        stats.update("main", [torch.from_numpy(h).float()], torch.from_numpy(counted), torch.from_numpy(types),
                     calibration=torch.from_numpy(calib) if i < 2 else None)
    stats.finish()
    first = np.concatenate([h[c & k] for (h, c, _), k in zip(stream[:2], keep[:2])]).astype(np.float32)
    norms = np.sort(np.linalg.norm(first.astype(np.float64), axis=1))
    assert stats.calibrated_on["main"] == len(norms)
    assert stats.median_norm["main"][0] == pytest.approx(norms[(len(norms) - 1) // 2], rel=1e-6)
    X = np.concatenate([h[c] for h, c, _ in stream]).astype(np.float32).astype(np.float64)
    assert stats.view("all", "main", 0).moments.n == len(X)
    assert stats.view("all", "main", 0).moments.metrics()["V"] == pytest.approx(two_pass(X)["V"], rel=1e-9)


def test_fully_counted_batches_read_in_place_match_gathered_ones():
    # A batch whose every position counts is read without a gather; one with a
    # position left out is gathered: both give the statistics of their rows.
    rng = np.random.default_rng(4)
    h = rng.normal(size=(3, 40, 8)) + 5.0
    types = torch.from_numpy(rng.integers(0, 9, size=(3, 40)))
    full = torch.ones(3, 40, dtype=torch.bool)
    part = full.clone()
    part[1, 3] = False
    got = {}
    for name, counted in (("full", full), ("part", part)):
        stats = LayerStatistics({"main": 0}, 8, precision="float64")
        stats.calibrate()
        stats.median_norm["main"] = [1e9]  # no outliers
        stats.update("main", [torch.from_numpy(h).float()], counted, types)
        got[name] = stats.view("all", "main", 0)
    for name, counted in (("full", full), ("part", part)):
        X = h.astype(np.float32).astype(np.float64)[counted.numpy()]
        m = got[name].moments
        assert m.n == len(X)
        np.testing.assert_allclose(m.mean, X.mean(0), rtol=1e-12)
        np.testing.assert_allclose(m.covariance, np.cov(X.T, bias=True), rtol=1e-9, atol=1e-12)
        tab = got[name].types.table().set_index("token_id")
        t = types.numpy()[counted.numpy()]
        for tid in np.unique(t):
            assert tab.loc[tid, "n"] == (t == tid).sum()


@pytest.mark.parametrize("first", ["all", "inliers"])
def test_intrinsic_dimension_of_both_views_from_one_search(first):
    """The all view's k-NN extends the inliers' (a few massive activations added):
    its estimates equal those of a search of all sampled points, whichever view is
    asked for first, and the inliers' equal a search of the inliers."""
    from embgeom.metrics.gride import gride
    from embgeom.metrics.intrinsic_dim import intrinsic_dimensions

    rng = np.random.default_rng(4)
    stream = list(synthetic_stream(rng, n_batches=8, T=100))
    stats = LayerStatistics({"decoder": 1}, 16, outlier_factor=10.0, id_sample=600, seed=3)
    for i, (h, counted, types) in enumerate(stream):
        if i == 2:
            stats.calibrate()
        hidden = [torch.from_numpy(h).float(), torch.from_numpy(2 * h).float()]
        keys = torch.arange(i * 400, (i + 1) * 400).reshape(4, 100)
        stats.update("decoder", hidden, torch.from_numpy(counted), torch.from_numpy(types), keys=keys)
    stats.finish()
    for layer in (0, 1):
        X = torch.from_numpy(stats.samples["decoder"].layer(layer))
        inlier = torch.linalg.vector_norm(X, dim=1) <= 10.0 * stats.median_norm["decoder"][layer]
        assert 0 < int((~inlier).sum()) <= 64  # a few outliers in the sample: the extension is used
        order = [first, "inliers" if first == "all" else "all"]
        got = {view: stats.intrinsic_dimension("decoder", layer, view) for view in order}
        want = {"all": intrinsic_dimensions(X), "inliers": intrinsic_dimensions(X[inlier])}
        for view in order:
            assert got[view]["id_n"] == want[view]["id_n"]
            for key in ("id_twonn", "id_twonn_ml", "id_mle"):
                assert got[view][key] == pytest.approx(want[view][key], rel=1e-12, abs=0), (view, key)
        # GRIDE reads the same search (rank 64 ≥ k = 20): equal to its own search's
        for view, pts in (("all", X), ("inliers", X[inlier])):
            table, want_table = stats.id_scales("decoder", layer, view), gride(pts)
            assert list(table["n2"]) == list(want_table["n2"]) == [2, 4, 8, 16, 32, 64]
            np.testing.assert_allclose(table[["scale", "id", "id_err"]].to_numpy(),
                                       want_table[["scale", "id", "id_err"]].to_numpy(), rtol=1e-12)
        assert stats._id_cache[("search", True)]["key"] == ("decoder", layer)  # only the last layer's search is kept
    # one search per layer for every ID column and scale (the all view extends it),
    # its diagnostics kept for run.json
    summary = stats.knn_summary()
    assert summary["searches"] == 2 and summary["points"] == sum(
        int((torch.linalg.vector_norm(torch.from_numpy(stats.samples["decoder"].layer(layer)), dim=1)
             <= 10.0 * stats.median_norm["decoder"][layer]).sum()) for layer in (0, 1))
    assert summary["fallback_rows"] >= 0 and summary["choices"]
    assert {c["precision"] for c in summary["choices"]} <= {"bf16", "fp32"}
    assert all(c["chosen_by"] == "measured" and c["tile_seconds"]["fp32"] > 0 for c in summary["choices"])
    import json

    json.dumps(summary)  # run.json can hold it
