"""TwoNN intrinsic dimension (Facco et al. 2017): the linear fit, plain and ranked,
and the maximum-likelihood estimate with an exact interval.
The contract shared with the other estimators is in ``intrinsic_dim``.
"""
from __future__ import annotations

import math
from fractions import Fraction
from statistics import NormalDist

import numpy as np
import torch

from ..errors import EmbgeomError
from .id_inputs import _as_distances, _check_confidence, _check_fraction, _log_ratios, distinct_distances

__all__ = ["twonn", "twonn_from_distances", "twonn_ranked_from_distances", "twonn_ml", "twonn_ml_from_distances"]


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
    """TwoNN intrinsic dimension of the rows of ``X``, with exact Euclidean nearest
    neighbours.

    With ``μ_i = r2/r1`` each point's distances to its second and first nearest
    neighbours, ``μ`` is Pareto, ``F(μ) = 1 − μ^(−d)``; ``d`` is the slope through the
    origin of ``−log(1 − F_i)`` on ``log μ_(i)``, ``F_i = i/n``, over the
    ``⌊(1 − discard_fraction) n⌋`` smallest ratios (:func:`twonn_from_distances`).
    Equal to scikit-dimension's ``TwoNN(discard_fraction=...).fit(X).dimension_`` on
    data without repeated rows; exact duplicate rows are removed first
    (:func:`distinct_points`): ``twonn(X) == twonn(distinct_points(X))``.

    Reference: E. Facco, M. d'Errico, A. Rodriguez, A. Laio (2017), "Estimating the intrinsic
    dimension of datasets by a minimal neighborhood information", Sci. Rep. 7, 12140.

    Parameters
    ----------
    X : (n, d) numpy array or torch tensor (CPU or CUDA), at least 3 distinct rows.
    discard_fraction : share of the largest ratios left out of the fit (paper A's
        protocol leaves out 0.8).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(1000, 3)) @ rng.normal(size=(3, 10))  # a 3-d plane in R^10
    >>> from embgeom import twonn
    >>> round(twonn(X), 1)
    3.0
    """
    f = _check_fraction(discard_fraction)
    return twonn_from_distances(distinct_distances(X, 2, 3, "TwoNN"), f)


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
    ``X`` (exact duplicates removed first, :func:`distinct_points`).

    ``log μ_i = log(r2/r1)`` are exponentials of rate ``d``: with ``S = Σ log μ_i``
    over the ``n`` points, ``d̂ = (n − 1)/S`` (unbiased), and ``d·S ~ Gamma(n, 1)``
    gives the exact interval ``[g_(α/2)/S, g_(1−α/2)/S]``, ``α = 1 − confidence``
    (:func:`twonn_ml_from_distances`).

    References: E. Facco, M. d'Errico, A. Rodriguez, A. Laio (2017), "Estimating the
    intrinsic dimension of datasets by a minimal neighborhood information", Sci. Rep.
    7, 12140; F. Denti, D. Doimo, A. Laio, A. Mira (2022), "The generalized ratios
    intrinsic dimension estimator", Sci. Rep. 12, 20005.

    Parameters
    ----------
    X : (n, d) numpy array or torch tensor, at least 3 distinct rows.
    confidence : level of the interval, in (0, 1).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(1000, 3)) @ rng.normal(size=(3, 10))  # a 3-d plane in R^10
    >>> from embgeom import twonn_ml
    >>> [round(v, 1) for v in twonn_ml(X)]
    [3.0, 2.8, 3.2]
    """
    c = _check_confidence(confidence)
    return twonn_ml_from_distances(distinct_distances(X, 2, 3, "maximum-likelihood TwoNN"), c)
