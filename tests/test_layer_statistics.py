"""The two views (all, inliers) on synthetic hidden states with massive activations."""
import numpy as np
import pytest
import torch

from embgeom.stats.layers import LayerStatistics
from reference import two_pass


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


def test_views_split_outliers_and_merge_exactly():
    rng = np.random.default_rng(0)
    stream = list(synthetic_stream(rng))
    stats = LayerStatistics({"decoder": 1}, 16, outlier_factor=10.0)
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
        assert all_view.moments.metrics()[key] == pytest.approx(want_all[key], rel=1e-9), key
        assert inl_view.moments.metrics()[key] == pytest.approx(want_in[key], rel=1e-9), key
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
