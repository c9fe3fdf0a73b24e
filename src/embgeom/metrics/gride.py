"""GRIDE: intrinsic dimension as a function of scale (Denti et al. 2022).

For each point, μ = r_{n2} / r_{n1}, the ratio of its distances to its n2-th and
n1-th nearest distinct neighbours (n2 > n1), follows under a locally uniform density
of dimension d

    f(μ) = d (μ^d − 1)^{n2−n1−1} / (B(n2−n1, n1) μ^{(n2−1)d+1}),   μ > 1,

and the estimate maximises the likelihood of the observed ratios. Doubling n1 and n2
looks at the data at growing scales; where the estimate stops moving with scale is
the dimension one would read off a plateau.

Reference: F. Denti, D. Doimo, A. Laio, A. Mira (2022), "The generalized ratios
intrinsic dimension estimator", Sci. Rep. 12, 20005. At n1 = 1, n2 = 2 this is the
maximum-likelihood TwoNN (Facco et al. 2017): d̂ = N / Σ log μ.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from ..errors import EmbgeomError
from .id_inputs import distinct_points
from .neighbors import knn_distances

__all__ = ["gride", "gride_from_distances", "gride_scales", "gride_plateau"]

GRIDE_COLUMNS = ["n1", "n2", "scale", "id", "id_err"]


def gride_scales(max_rank: int) -> list[tuple[int, int]]:
    """(n1, n2) pairs n1 = 1, 2, 4, … with n2 = 2·n1 ≤ max_rank."""
    if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) or max_rank < 2:
        raise EmbgeomError(f"max_rank must be an integer ≥ 2, got {max_rank!r}")
    pairs, n1 = [], 1
    while 2 * n1 <= max_rank:
        pairs.append((n1, 2 * n1))
        n1 *= 2
    return pairs


def _score_and_information(d: float, L: np.ndarray, n1: int, n2: int) -> tuple[float, float]:
    """First derivative of the log-likelihood in d, and minus its second derivative
    (the observed Fisher information), at d for log-ratios L > 0."""
    N = L.size
    k = n2 - n1 - 1
    score = N / d - (n2 - 1) * float(L.sum())
    info = N / d ** 2
    if k:
        e = np.exp(-d * L)
        # μ^d / (μ^d − 1) = 1 / (1 − μ^{−d}); written with expm1 so large d L loses nothing.
        one_minus = -np.expm1(-d * L)
        score += k * float((L / one_minus).sum())
        info += k * float((L * L * e / one_minus ** 2).sum())
    return score, info


def _mle(L: np.ndarray, n1: int, n2: int) -> tuple[float, float]:
    """(d̂, standard error) for one (n1, n2). The log-likelihood is strictly concave
    in d, so its score has one root; it is bracketed and found by bisection-safeguarded
    Newton steps."""
    N = L.size
    S = float(L.sum())
    if n2 - n1 == 1:  # closed form: f(μ) ∝ d μ^{−(n2−1)d−1}
        d = N / ((n2 - 1) * S)
        return d, d / math.sqrt(N)
    # The score is positive near 0 and negative for d > N / (n1 S) · (1 + ...): grow hi.
    lo, hi = 0.0, N / (n1 * S)
    while _score_and_information(hi, L, n1, n2)[0] > 0:
        lo, hi = hi, 2 * hi
    d = 0.5 * (lo + hi)
    for _ in range(200):
        s, info = _score_and_information(d, L, n1, n2)
        if s > 0:
            lo = d
        else:
            hi = d
        nd = d + s / info
        if not (lo < nd < hi):
            nd = 0.5 * (lo + hi)
        if abs(nd - d) <= 1e-14 * d:
            d = nd
            break
        d = nd
    return d, 1.0 / math.sqrt(_score_and_information(d, L, n1, n2)[1])


def gride_from_distances(dist, max_rank: int | None = None) -> pd.DataFrame:
    """GRIDE at every scale from ascending neighbour distances of *distinct* points.

    dist : (N, ≥ max_rank) distances of each point to its nearest other points,
        ascending, all positive (remove duplicate points before the k-NN).
    max_rank : largest neighbour rank n2 used (default: the number of columns).

    Returns a DataFrame with columns ``n1, n2, scale, id, id_err``, one row per
    (n1, n2) of :func:`gride_scales`: ``scale`` is the mean of r_{n2}, ``id`` the
    likelihood maximiser and ``id_err`` = 1/√I(id) with I the observed Fisher
    information (minus the second derivative of the log-likelihood). Points whose
    ratio is exactly 1 (tied distances) have zero likelihood when n2 − n1 > 1 and are
    left out there; at n2 − n1 = 1 they count, as in TwoNN. A scale with fewer than 2
    usable points or no spread gives NaN.
    """
    if isinstance(dist, torch.Tensor):
        dist = dist.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(dist, dtype=np.float64)
    if a.ndim != 2:
        raise EmbgeomError(f"dist must be a 2-d array (points, neighbours), got shape {a.shape}")
    max_rank = a.shape[1] if max_rank is None else max_rank
    pairs = gride_scales(max_rank)
    if a.shape[1] < max_rank:
        raise EmbgeomError(f"dist has {a.shape[1]} neighbour column(s) but max_rank = {max_rank}; "
                           f"compute the k-NN with k ≥ {max_rank}")
    if not np.isfinite(a).all() or (a[:, :max_rank] <= 0).any():
        raise EmbgeomError("dist must hold finite, positive distances (remove duplicate points first)")
    rows = []
    for n1, n2 in pairs:
        L = np.log(a[:, n2 - 1] / a[:, n1 - 1])
        if n2 - n1 > 1:
            L = L[L > 0]
        d = err = math.nan
        if L.size >= 2 and L.sum() > 0:
            d, err = _mle(L, n1, n2)
        rows.append(dict(n1=n1, n2=n2, scale=float(a[:, n2 - 1].mean()), id=d, id_err=err))
    return pd.DataFrame(rows, columns=GRIDE_COLUMNS)


def gride(X, max_rank: int = 64) -> pd.DataFrame:
    """GRIDE intrinsic dimension of the rows of X at scales n1 = 1, 2, 4, … with
    n2 = 2·n1 ≤ max_rank, on the exact k-NN of the distinct rows (exact duplicates
    removed first).

    ``μ = r_n2 / r_n1`` has the density
    ``f(μ) = d (μ^d − 1)^(n2−n1−1) / (B(n2−n1, n1) μ^((n2−1)d+1))``, μ > 1; ``id`` is
    the maximiser of the likelihood of the observed ratios. Columns ``n1, n2, scale,
    id, id_err`` (``scale``: mean r_n2; ``id_err``: 1/√ observed Fisher information).

    Reference: F. Denti, D. Doimo, A. Laio, A. Mira (2022), "The generalized ratios
    intrinsic dimension estimator", Sci. Rep. 12, 20005.

    Parameters
    ----------
    X : (n, d) numpy array or torch tensor, at least 3 distinct rows.
    max_rank : largest neighbour rank n2 (scales up to n1 = max_rank / 2).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(1000, 3)) @ rng.normal(size=(3, 10))  # a 3-d plane in R^10
    >>> from embgeom import gride
    >>> gride(X, max_rank=16)[["n1", "n2", "id"]].round(1).to_numpy().tolist()
    [[1.0, 2.0, 3.0], [2.0, 4.0, 2.9], [4.0, 8.0, 3.0], [8.0, 16.0, 3.0]]

    See :func:`gride_from_distances` for the columns; the row
    n1 = 1 is the maximum-likelihood TwoNN N / Σ log(r2/r1), i.e. N/(N − 1) times
    :func:`embgeom.twonn_ml`'s unbiased estimate on data without duplicates."""
    gride_scales(max_rank)  # checks max_rank
    U = distinct_points(X)
    if U.shape[0] < 3:
        raise EmbgeomError(f"GRIDE needs at least 3 distinct points, got {U.shape[0]}")
    k = min(max_rank, U.shape[0] - 1)  # the scales with n2 ≤ k
    return gride_from_distances(knn_distances(U, k), k)


def gride_plateau(table: pd.DataFrame) -> dict:
    """The scale range where the ID-against-scale curve is flattest.

    Rule: among consecutive scales i, i+1 (rows in order of n1) with finite ids, the
    pair with the smallest relative change |id_{i+1} − id_i| / ((id_i + id_{i+1})/2);
    the first such pair on a tie. Returns {'n1_low', 'n1_high', 'scale_low',
    'scale_high', 'id'} with id the mean of the pair's two ids, or NaNs when fewer
    than two finite scales exist.

    Reference (ID against scale, read off where it is stable): F. Denti, D. Doimo,
    A. Laio, A. Mira (2022), "The generalized ratios intrinsic dimension estimator",
    Sci. Rep. 12, 20005.

    Parameters
    ----------
    table : a :func:`gride` table (columns n1, scale, id).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(1000, 3)) @ rng.normal(size=(3, 10))  # a 3-d plane in R^10
    >>> from embgeom import gride, gride_plateau
    >>> p = gride_plateau(gride(X, max_rank=16))
    >>> p["n1_low"], p["n1_high"], round(p["id"], 1)
    (4, 8, 3.0)
    """
    t = table.sort_values("n1").reset_index(drop=True)
    best, out = math.inf, dict(n1_low=math.nan, n1_high=math.nan, scale_low=math.nan, scale_high=math.nan,
                               id=math.nan)
    for i in range(len(t) - 1):
        a, b = float(t["id"].iloc[i]), float(t["id"].iloc[i + 1])
        if not (math.isfinite(a) and math.isfinite(b)) or a + b <= 0:
            continue
        change = abs(b - a) / (0.5 * (a + b))
        if change < best:
            best = change
            out = dict(n1_low=int(t["n1"].iloc[i]), n1_high=int(t["n1"].iloc[i + 1]),
                       scale_low=float(t["scale"].iloc[i]), scale_high=float(t["scale"].iloc[i + 1]),
                       id=0.5 * (a + b))
    return out
