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

import numpy as np

from ..errors import EmbgeomError
from .id_inputs import (_as_distances, _check_confidence, _check_fraction, _check_k, _n_points, distinct_distances,
                        distinct_points)
from .neighbors import knn_distances
# The TwoNN family lives in .twonn and the input checks in .id_inputs; their public
# names are re-exported here, the one module callers import estimators from.
from .twonn import (_gamma_quantile, twonn, twonn_from_distances, twonn_ml, twonn_ml_from_distances,
                    twonn_ranked_from_distances)

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
    """Levina–Bickel maximum-likelihood dimension of the distinct rows of ``X``
    (exact duplicates removed first, :func:`distinct_points`) with ``k`` exact nearest
    neighbours, pooled over points as MacKay & Ghahramani suggest:
    ``m̂ = (k − 1) n / Σ_i Σ_(j<k) log(T_k / T_j)``, ``T_j`` a point's distance to its
    j-th neighbour (:func:`mle_id_from_distances`). Equal to
    ``skdim.id.MLE().fit(X).dimension_`` for ``k = 20`` on data without repeated rows.

    References: E. Levina, P. J. Bickel (2004), "Maximum likelihood estimation of
    intrinsic dimension", NeurIPS 17; D. J. C. MacKay, Z. Ghahramani (2005),
    "Comments on 'Maximum likelihood estimation of intrinsic dimension' by E. Levina
    and P. Bickel" (note, University of Cambridge).

    Parameters
    ----------
    X : (n, d) numpy array or torch tensor, more than ``k`` distinct rows.
    k : neighbours per point, ≥ 2.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(1000, 3)) @ rng.normal(size=(3, 10))  # a 3-d plane in R^10
    >>> from embgeom import mle_id
    >>> round(mle_id(X), 1)
    3.0
    """
    k = _check_k(k)
    dist = distinct_distances(X, k, k + 1, f"the MLE with k = {k}", "; use more points or a smaller k")
    return mle_id_from_distances(dist, k)


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
    """The ``id_*`` columns of layers.csv from one exact k-NN.

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
