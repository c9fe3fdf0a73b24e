"""Input checks shared by the intrinsic-dimension estimators, and the distinct points
they estimate on (exact duplicate rows removed; why, see ``intrinsic_dim``).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import _numba
from .._validate import as_float_matrix
from ..errors import EmbgeomError

__all__ = ["distinct_points"]


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
    # A sum is finite when every value is (one cheap pass); only a non-finite sum,
    # which finite values can also overflow to, needs the exact check.
    if not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):
        raise EmbgeomError(f"{name} contains NaN or infinite values")
    if t.device.type == "cpu" and _numba.AVAILABLE:
        # the exact k-NN's own grouping of equal rows (a hash, then exact comparison)
        from .neighbors import _as_cpu_floats, _groups

        groups = _groups(_as_cpu_floats(t).numpy())
        return t if groups is None else t[torch.from_numpy(groups[0])]
    # + 0.0 turns −0.0 into 0.0, so the sort that finds equal rows sees one value.
    _, inverse = torch.unique(t + 0.0, dim=0, return_inverse=True)
    n_distinct = int(inverse.max()) + 1
    if n_distinct == t.shape[0]:
        return t
    rows = torch.arange(t.shape[0], device=t.device)
    first = torch.full((n_distinct,), t.shape[0], dtype=rows.dtype, device=t.device)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")
    return t[first.sort().values]


def distinct_distances(X, k: int, need: int, what: str, fix: str = "") -> torch.Tensor:
    """Exact distances from each distinct row of `X` (duplicates removed first, see
    :func:`distinct_points`) to its `k` nearest others; EmbgeomError naming `what`
    when fewer than `need` distinct rows remain (`fix`: advice appended)."""
    from .neighbors import knn_distances

    X = distinct_points(X)
    n = _n_points(X)
    if n < need:
        raise EmbgeomError(f"{what} needs at least {need} distinct points, got {n}{fix}")
    return knn_distances(X, k)


def _log_ratios(dist: np.ndarray) -> np.ndarray:
    """log(r2/r1) of the points whose nearest neighbour is at a positive distance."""
    r1, r2 = dist[:, 0], dist[:, 1]
    keep = r1 > 0
    return np.log(r2[keep] / r1[keep])
