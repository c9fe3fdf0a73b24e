"""Intrinsic dimension from nearest-neighbour distances: TwoNN, its maximum-likelihood
form with an exact confidence interval, and the Levina–Bickel MLE.

All estimators read only the sorted distances of each point to its nearest *other*
points, so the pipeline computes one exact k-NN per layer (:func:`embgeom.metrics.
neighbors.knn_distances`, k = 20) and derives everything from it:

>>> dist = knn_distances(X, 20)              # (n, 20) float64, ascending
>>> twonn_from_distances(dist)               # uses columns 0 and 1 (r1, r2)
>>> twonn_ml_from_distances(dist)
>>> mle_id_from_distances(dist, k=20)

The ``X``-taking functions (:func:`twonn`, :func:`twonn_ml`, :func:`mle_id`,
:func:`intrinsic_dimensions` given ``X``) estimate on the *distinct* points of ``X``:
exact duplicate rows are removed first (:func:`distinct_points`, as DADApy's
``remove_identical_points``), then the exact k-NN is computed. Kept, a copy would be
the nearest neighbour of the others at distance 0 and shrink every other point's
neighbourhood, which biases the dimension upward (a 3-D Gaussian with 60% repeated
points reads ~6.7 instead of 3). So ``twonn(X) == twonn(distinct_points(X))``.
The ``*_from_distances`` forms cannot see the points: given distances with a nearest
neighbour at distance 0, they drop those points (scikit-dimension's TwoNN does the
same; its MLE returns 0 instead, see :func:`mle_id`).

References
----------
- E. Facco, M. d'Errico, A. Rodriguez, A. Laio (2017), "Estimating the intrinsic
  dimension of datasets by a minimal neighborhood information", Sci. Rep. 7, 12140.
- E. Levina, P. J. Bickel (2004), "Maximum likelihood estimation of intrinsic
  dimension", NeurIPS 17.
- D. J. C. MacKay, Z. Ghahramani (2005), "Comments on 'Maximum likelihood estimation
  of intrinsic dimension' by E. Levina and P. Bickel" (note, University of Cambridge).
- F. Denti, D. Doimo, A. Laio, A. Mira (2022), "The generalized ratios intrinsic
  dimension estimator", Sci. Rep. 12, 20005 (the unbiased (n − 1)/Σ log μ form).
"""
from __future__ import annotations

import math
from fractions import Fraction
from statistics import NormalDist

import numpy as np
import torch

from .._validate import as_float_matrix
from ..errors import EmbgeomError
from .neighbors import knn_distances

__all__ = [
    "distinct_points",
    "twonn",
    "twonn_from_distances",
    "twonn_ranked_from_distances",
    "twonn_ml",
    "twonn_ml_from_distances",
    "mle_id",
    "mle_id_from_distances",
    "intrinsic_dimensions",
]


# ---------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------
def _as_distances(dist, need: int, name: str = "dist") -> np.ndarray:
    """(n, m ≥ need) float64 numpy array of non-negative, finite, ascending rows
    (all columns are returned; a caller reads the first ``need``)."""
    if isinstance(dist, torch.Tensor):
        dist = dist.detach().to("cpu", torch.float64).numpy()
    try:
        a = np.asarray(dist, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise EmbgeomError(f"{name} must be an (n, k) array of neighbour distances, got {type(dist).__name__}") from exc
    if a.ndim != 2:
        raise EmbgeomError(f"{name} must be a 2-d array (n points, k neighbours), got shape {a.shape}")
    if a.shape[1] < need:
        raise EmbgeomError(
            f"{name} has {a.shape[1]} neighbour column(s) but {need} are needed; "
            f"compute the k-NN with k ≥ {need}"
        )
    if not np.isfinite(a).all():
        raise EmbgeomError(f"{name} contains NaN or infinite distances")
    if (a < 0).any():
        raise EmbgeomError(f"{name} contains negative distances")
    if need > 1 and (np.diff(a, axis=1) < 0).any():
        raise EmbgeomError(f"{name} rows must be sorted ascending (nearest neighbour first)")
    return a


def _check_fraction(discard_fraction) -> float:
    try:
        f = float(discard_fraction)
    except (TypeError, ValueError) as exc:
        raise EmbgeomError(f"discard_fraction must be a number in [0, 1), got {discard_fraction!r}") from exc
    if not (0.0 <= f < 1.0):
        raise EmbgeomError(f"discard_fraction must be in [0, 1), got {discard_fraction!r}")
    return f


def _check_k(k, minimum: int = 2) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise EmbgeomError(f"k must be an integer ≥ {minimum}, got {k!r}")
    if k < minimum:
        raise EmbgeomError(f"k must be an integer ≥ {minimum}, got {k}")
    return int(k)


def _check_confidence(confidence) -> float:
    try:
        c = float(confidence)
    except (TypeError, ValueError) as exc:
        raise EmbgeomError(f"confidence must be a number in (0, 1), got {confidence!r}") from exc
    if not (0.0 < c < 1.0):
        raise EmbgeomError(f"confidence must be in (0, 1), got {confidence!r}")
    return c


def _n_points(X) -> int:
    shape = getattr(X, "shape", None)
    if shape is None:
        shape = np.shape(X)
    return int(shape[0]) if len(shape) else 0


def distinct_points(X, name: str = "X") -> torch.Tensor:
    """The distinct rows of ``X`` ((n, d) array or tensor), each at its first
    occurrence, in their order, as a float tensor on ``X``'s device.

    Rows are equal when every coordinate compares equal (so 0.0 and −0.0 are one
    value; equal rows are exactly the pairs at Euclidean distance 0). The intrinsic
    dimension estimators here work on these points only (scikit-dimension and DADApy
    advise the same), so a repeated token vector counts once.
    """
    t = as_float_matrix(X, name)
    if t.shape[0] < 2:
        return t
    if not bool(torch.isfinite(t).all()):
        raise EmbgeomError(f"{name} contains NaN or infinite values")
    # + 0.0 turns −0.0 into 0.0, so the sort that finds equal rows sees one value.
    _, inverse = torch.unique(t + 0.0, dim=0, return_inverse=True)
    n_distinct = int(inverse.max()) + 1
    if n_distinct == t.shape[0]:
        return t
    rows = torch.arange(t.shape[0], device=t.device)
    first = torch.full((n_distinct,), t.shape[0], dtype=rows.dtype, device=t.device)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")
    return t[first.sort().values]


def _log_ratios(dist: np.ndarray) -> np.ndarray:
    """log(r2/r1) of the points whose nearest neighbour is at a positive distance."""
    r1, r2 = dist[:, 0], dist[:, 1]
    keep = r1 > 0
    return np.log(r2[keep] / r1[keep])


# ---------------------------------------------------------------------------
# TwoNN, linear fit (Facco et al. 2017)
# ---------------------------------------------------------------------------
def twonn_from_distances(dist, discard_fraction: float = 0.1) -> float:
    """TwoNN intrinsic dimension from nearest-neighbour distances.

    ``dist`` is (N, ≥2): each point's distances to its first and second nearest other
    points, ``r1 ≤ r2`` (columns 0 and 1; further columns are ignored).

    With ``μ_i = r2/r1`` the model says ``μ`` is Pareto: ``F(μ) = 1 − μ^(−d)``, so
    ``−log(1 − F(μ)) = d · log μ``. The estimate is the slope of that line, through
    the origin, fitted to the empirical distribution:

    1. points with ``r1 = 0`` (duplicates) are dropped; ``n`` points remain;
    2. the ratios are sorted, ``μ_(1) ≤ … ≤ μ_(n)``, and ``F_i = i/n`` (i = 1..n);
    3. the ``m = ⌊n (1 − discard_fraction)⌋`` smallest are kept (the largest ratios
       are the noisiest), ``x_i = log μ_(i)``, ``y_i = −log(1 − F_i)``;
    4. ``d = Σ x_i y_i / Σ x_i²``.

    This is exactly scikit-dimension's ``skdim.id.TwoNN(discard_fraction=...)``
    (same ``n`` after dropping, same ``F_i = i/n``, same floor), which the tests check
    to 1e-6. With ``discard_fraction = 0`` the last point (``F = 1``, ``y = ∞``) is left
    out, ``m = n − 1`` (scikit-dimension raises an error there instead).

    Raises EmbgeomError for fewer than 3 usable points or all ratios equal to 1.
    """
    f = _check_fraction(discard_fraction)
    a = _as_distances(dist, 2)
    x_all = np.sort(_log_ratios(a))
    n = x_all.size
    if n < 3:
        raise EmbgeomError(
            f"TwoNN needs at least 3 points whose nearest neighbour is at a positive "
            f"distance; got {a.shape[0]} point(s), {n} usable (duplicates are dropped)"
        )
    m = min(int(n * (1 - f)), n - 1)
    if m < 2:
        raise EmbgeomError(
            f"TwoNN with discard_fraction={f} keeps only {m} of {n} ratios; "
            f"use more points or a smaller discard_fraction"
        )
    x = x_all[:m]
    y = -np.log1p(-np.arange(1, m + 1, dtype=np.float64) / n)
    sxx = float(x @ x)
    if sxx == 0.0:
        raise EmbgeomError("TwoNN is undefined: every kept ratio r2/r1 equals 1 (degenerate, lattice-like data)")
    return float(x @ y) / sxx


def _kept_count(n: int, discard_fraction: float) -> int:
    """⌊n (1 − f)⌋ with f read as the decimal it was written as (0.8 keeps n // 5,
    where n·(1 − 0.8) in binary floating point falls just short for n a multiple of 5)."""
    keep = 1 - Fraction(repr(float(discard_fraction)))
    return int(n * keep.numerator // keep.denominator)


def twonn_ranked_from_distances(dist, discard_fraction: float = 0.8, *, scale: float = 1.0,
                                eps: float = 1e-8) -> float:
    """TwoNN as Razzhigaev et al. (EACL 2024 Findings, paper A) compute it: degenerate
    points are left out of the fit but keep their ranks.

    ``dist`` is (N, ≥2), each point's distances to its two nearest other points
    (columns 0 and 1). ``scale`` is the mean distance of the points from their
    centroid (the authors divide the centred points by it, so ``eps`` is relative to
    it).

    1. ``μ_i = r2/r1``; a point is degenerate when ``r1 < eps·scale`` (a duplicate)
       or ``μ_i ≤ 1 + eps`` (its two nearest neighbours tie); there are ``u`` of
       them, all ranked below the others;
    2. the other ``n = N − u`` ratios, ascending, get ``F_i = (u + i)/N``, i = 1..n
       (the empirical distribution over all N points);
    3. the ``m = min(⌊n (1 − discard_fraction)⌋, n − 1)`` smallest are kept,
       ``x_i = log μ_(i)``, ``y_i = −log(1 − F_i)``, and ``d = Σ x_i y_i / Σ x_i²``.

    Without degenerate points this is :func:`twonn_from_distances`. With them it is
    not: :func:`twonn_from_distances` drops duplicates before ranking (F over the
    others), while here they shift every F up, which raises the estimate, the more
    the more points repeat (paper A's embedding layers). The authors keep 20%
    (``discard_fraction = 0.8``; their ``n // 5``).

    Raises EmbgeomError for fewer than 3 usable points or all kept ratios equal to 1.
    """
    f = _check_fraction(discard_fraction)
    a = _as_distances(dist, 2)
    if not (math.isfinite(scale) and scale >= 0):
        raise EmbgeomError(f"scale must be a finite non-negative number, got {scale!r}")
    r1, r2 = a[:, 0], a[:, 1]
    good = r1 >= eps * scale
    mu = np.full(a.shape[0], 1.0)
    np.divide(r2, r1, out=mu, where=good & (r1 > 0))
    good &= mu > 1 + eps
    N = a.shape[0]
    u = N - int(good.sum())
    x_all = np.sort(np.log(mu[good]))
    n = x_all.size
    if n < 3:
        raise EmbgeomError(f"TwoNN needs at least 3 points whose two nearest neighbours are apart and not tied; "
                           f"got {N} point(s), {n} usable")
    m = min(_kept_count(n, f), n - 1)
    if m < 2:
        raise EmbgeomError(f"TwoNN with discard_fraction={f} keeps only {m} of {n} ratios; "
                           f"use more points or a smaller discard_fraction")
    x = x_all[:m]
    y = -np.log1p(-(u + np.arange(1, m + 1, dtype=np.float64)) / N)
    sxx = float(x @ x)
    if sxx == 0.0:
        raise EmbgeomError("TwoNN is undefined: every kept ratio r2/r1 equals 1")
    return float(x @ y) / sxx


def twonn(X, discard_fraction: float = 0.1) -> float:
    """TwoNN intrinsic dimension of the rows of ``X`` ((n, d) numpy array or torch
    tensor, CPU or CUDA), with exact Euclidean nearest neighbours.

    See :func:`twonn_from_distances` for the formula; equal to scikit-dimension's
    ``TwoNN(discard_fraction=discard_fraction).fit(X).dimension_`` on data without
    repeated rows. Exact duplicate rows are removed first (:func:`distinct_points`):
    ``twonn(X) == twonn(distinct_points(X))``.
    """
    f = _check_fraction(discard_fraction)
    X = distinct_points(X)
    n = _n_points(X)
    if n < 3:
        raise EmbgeomError(f"TwoNN needs at least 3 distinct points, got {n}")
    return twonn_from_distances(knn_distances(X, 2), f)


# ---------------------------------------------------------------------------
# TwoNN, maximum likelihood with an exact interval
# ---------------------------------------------------------------------------
def _gamma_quantile(shape: float, q: float) -> float:
    """Quantile of the Gamma(shape, 1) distribution (float64; Newton on the
    regularised incomplete gamma function, safeguarded by bisection)."""
    a = float(shape)
    z = NormalDist().inv_cdf(q)
    # Wilson–Hilferty start
    x = a * (1.0 - 1.0 / (9.0 * a) + z / (3.0 * math.sqrt(a))) ** 3
    if not (x > 0.0):
        x = max(1e-300, a * 0.5)
    lo, hi = 0.0, math.inf
    lg = math.lgamma(a)
    at = torch.tensor(a, dtype=torch.float64)
    for _ in range(200):
        F = float(torch.special.gammainc(at, torch.tensor(x, dtype=torch.float64)))
        if F < q:
            lo = x
        else:
            hi = x
        pdf = math.exp((a - 1.0) * math.log(x) - x - lg)
        step = (F - q) / pdf if pdf > 0 else math.inf
        nx = x - step
        if not (lo < nx < hi) or not math.isfinite(nx):
            nx = 0.5 * (lo + hi) if math.isfinite(hi) else 2.0 * x
        if abs(nx - x) <= 1e-15 * x:
            return nx
        x = nx
    return x


def twonn_ml_from_distances(dist, confidence: float = 0.95) -> tuple[float, float, float]:
    """Maximum-likelihood TwoNN with its exact confidence interval.

    Under the TwoNN model ``log μ_i = log(r2/r1)`` are independent exponentials with
    rate ``d``, so with ``n`` usable points (``r1 > 0``; duplicates dropped) and
    ``S = Σ_i log μ_i``:

    - ``d̂ = (n − 1) / S`` — the unbiased form of the likelihood maximiser ``n / S``
      (E[1/S] = d/(n − 1)); Denti et al. 2022, Facco et al. 2017. All ratios are used
      (no discarding).
    - ``d · S ~ Gamma(n, 1)`` exactly, so ``[g_{α/2} / S, g_{1−α/2} / S]`` with
      ``g_p`` the Gamma(n, 1) quantiles is an exact ``confidence`` interval for ``d``.

    Returns ``(estimate, low, high)``. Raises EmbgeomError for fewer than 3 usable
    points or ``S = 0``.
    """
    c = _check_confidence(confidence)
    a = _as_distances(dist, 2)
    logs = _log_ratios(a)
    n = logs.size
    if n < 3:
        raise EmbgeomError(
            f"maximum-likelihood TwoNN needs at least 3 points whose nearest neighbour is "
            f"at a positive distance; got {a.shape[0]} point(s), {n} usable"
        )
    s = float(logs.sum())
    if s <= 0.0:
        raise EmbgeomError("maximum-likelihood TwoNN is undefined: every ratio r2/r1 equals 1 (degenerate data)")
    alpha = 1.0 - c
    low = _gamma_quantile(n, alpha / 2) / s
    high = _gamma_quantile(n, 1.0 - alpha / 2) / s
    return (n - 1) / s, low, high


def twonn_ml(X, confidence: float = 0.95) -> tuple[float, float, float]:
    """Maximum-likelihood TwoNN ``(estimate, low, high)`` of the distinct rows of
    ``X`` (exact duplicates removed first, :func:`distinct_points`); see
    :func:`twonn_ml_from_distances`."""
    c = _check_confidence(confidence)
    X = distinct_points(X)
    n = _n_points(X)
    if n < 3:
        raise EmbgeomError(f"maximum-likelihood TwoNN needs at least 3 distinct points, got {n}")
    return twonn_ml_from_distances(knn_distances(X, 2), c)


# ---------------------------------------------------------------------------
# Levina–Bickel MLE, pooled as MacKay–Ghahramani
# ---------------------------------------------------------------------------
def mle_id_from_distances(dist, k: int = 20) -> float:
    """Levina–Bickel maximum-likelihood dimension with ``k`` neighbours, pooled over
    points as MacKay & Ghahramani suggest.

    ``dist`` is (n, ≥k), each row the ascending distances ``T_1 ≤ … ≤ T_k`` of a point
    to its ``k`` nearest other points (only the first ``k`` columns are read). Per point

        m̂_i = (k − 1) / Σ_{j=1}^{k−1} log(T_k / T_j)

    (the ``k − 1`` numerator is the one of Levina & Bickel's estimator and of
    scikit-dimension's default ``unbiased=False``; ``k − 2`` would make each 1/m̂_i
    unbiased instead), and the estimate is the inverse of the mean of the inverses,

        m̂ = [ (1/n) Σ_i 1/m̂_i ]^(−1) = (k − 1) n / Σ_i Σ_j log(T_k / T_j),

    which is scikit-dimension's ``skdim.id.MLE().fit(X, n_neighbors=k)`` global
    ``dimension_`` (its default ``comb='mle'``; note ``MLE(K=...)`` does not change the
    neighbour count, whose default is 20). Points with ``T_1 = 0`` (an exact duplicate)
    make the sum infinite and are dropped (scikit-dimension returns 0 then).

    Raises EmbgeomError for bad ``k``, no usable point, or all ``T_j`` equal.
    """
    k = _check_k(k)
    a = _as_distances(dist, k)
    a = a[a[:, 0] > 0]
    if a.shape[0] < 1:
        raise EmbgeomError("the MLE needs at least 1 point whose nearest neighbour is at a positive distance; got none")
    s = np.log(a[:, k - 1 : k] / a[:, : k - 1]).sum(axis=1)
    total = float(s.mean())
    if total <= 0.0:
        raise EmbgeomError(f"the MLE is undefined: the {k} nearest-neighbour distances of every point are equal")
    return (k - 1) / total


def mle_id(X, k: int = 20) -> float:
    """Levina–Bickel / MacKay–Ghahramani MLE dimension of the distinct rows of ``X``
    (exact duplicates removed first, :func:`distinct_points`) with ``k`` exact nearest
    neighbours; see :func:`mle_id_from_distances`. Equal to
    ``skdim.id.MLE(K=20).fit(X).dimension_`` for ``k = 20`` on data without repeated rows."""
    k = _check_k(k)
    X = distinct_points(X)
    n = _n_points(X)
    if n < k + 1:
        raise EmbgeomError(f"the MLE with k = {k} needs at least {k + 1} distinct points, got {n}; "
                           "use more points or a smaller k")
    return mle_id_from_distances(knn_distances(X, k), k)


# ---------------------------------------------------------------------------
# all columns at once (the pipeline's entry point)
# ---------------------------------------------------------------------------
def intrinsic_dimensions(
    X=None,
    *,
    distances=None,
    k: int = 20,
    discard_fraction: float = 0.1,
    confidence: float = 0.95,
) -> dict:
    """The ``id_*`` columns of SPEC §3 from one exact k-NN.

    Give either ``X`` ((n, d) array/tensor; its exact duplicate rows are removed, then
    the k-NN is computed here, exact) or ``distances`` ((n, ≥k) ascending neighbour
    distances of distinct points, e.g. ``knn_distances(distinct_points(X), k)``).
    Returns a dict with keys ``id_twonn``, ``id_twonn_ml``, ``id_twonn_ml_low``,
    ``id_twonn_ml_high``, ``id_mle``, ``id_n``: ``id_n`` is the number of points used,
    i.e. the distinct points (of ``distances``: those whose nearest neighbour is at a
    positive distance). An estimate that is undefined for the
    data (too few points, duplicates only, degenerate ratios) is NaN rather than an
    error, so one degenerate layer does not stop a run; bad arguments still raise.
    """
    k = _check_k(k)
    discard_fraction = _check_fraction(discard_fraction)
    confidence = _check_confidence(confidence)
    if (X is None) == (distances is None):
        raise EmbgeomError("give exactly one of X (points) or distances (k-NN distances)")
    nan = float("nan")
    out = dict(id_twonn=nan, id_twonn_ml=nan, id_twonn_ml_low=nan, id_twonn_ml_high=nan, id_mle=nan, id_n=0)
    if X is not None:
        X = distinct_points(X)
        n = _n_points(X)
        if n < 3:
            return out
        distances = knn_distances(X, min(k, n - 1))
    a = _as_distances(distances, 2)
    out["id_n"] = int((a[:, 0] > 0).sum())
    try:
        out["id_twonn"] = twonn_from_distances(a, discard_fraction)
    except EmbgeomError:
        pass
    try:
        out["id_twonn_ml"], out["id_twonn_ml_low"], out["id_twonn_ml_high"] = twonn_ml_from_distances(a, confidence)
    except EmbgeomError:
        pass
    if a.shape[1] >= k:
        try:
            out["id_mle"] = mle_id_from_distances(a, k)
        except EmbgeomError:
            pass
    return out
