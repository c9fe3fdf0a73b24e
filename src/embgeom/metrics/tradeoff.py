"""The norm–variance trade-off across token types (paper B): the mv_* and q_cv
columns of layers.csv.

Yamagiwa & Shimodaira, "Norm of Mean Contextualized Embeddings Determines their
Variance", COLING 2025, arXiv:2409.11253.

For each token type t of one layer we have n_t (how many vectors of that type),
Q_t = (1/n_t) Σ ‖x‖², M_t = ‖μ_t‖² and V_t = (1/n_t) Σ ‖x − μ_t‖², with
Q_t = M_t + V_t. Across the types with ``min_count ≤ n_t ≤ max_count`` (the paper
uses 10 and 100000, so that rare types with noisy V_t and a handful of ubiquitous
ones do not dominate), this module reports

* ``mv_slope``, ``mv_intercept``: ordinary least squares V_t ≈ a·M_t + b,
  a = Σ (M_t − M̄)(V_t − V̄) / Σ (M_t − M̄)², b = V̄ − a·M̄ (every qualifying type has
  weight one, whatever its count);
* ``mv_r2``: coefficient of determination 1 − Σ (V_t − a·M_t − b)² / Σ (V_t − V̄)²;
* ``mv_pearson``: Pearson correlation of M_t and V_t (so ``mv_r2 = mv_pearson²``);
  a strongly negative value is the paper's trade-off, "the closer the mean is to the
  origin, the larger the variance";
* ``q_cv``: coefficient of variation of Q_t, population standard deviation over mean,
  sqrt((1/k) Σ (Q_t − Q̄)²) / Q̄ (small for post-LN models, where Q is nearly fixed and
  hence V_t ≈ c − M_t);
* ``n_types``: k, the number of qualifying types.

Degenerate cases give NaN instead of raising, so that one sparse layer does not stop
a run: with fewer than 2 qualifying types, or when M_t has no spread, the regression
numbers (slope, intercept, R², Pearson) are NaN; when V_t has no spread, R² and
Pearson are NaN (slope and intercept are still defined). ``q_cv`` is NaN with no
qualifying type or when Q̄ = 0, and 0.0 for a single type. Types with a non-finite
M, V or Q are left out.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import EmbgeomError

__all__ = ["norm_variance_tradeoff", "TRADEOFF_KEYS"]

TRADEOFF_KEYS = ("mv_slope", "mv_intercept", "mv_r2", "mv_pearson", "q_cv", "n_types")


def _as_vector(a, name: str) -> np.ndarray:
    try:
        v = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise EmbgeomError(f"{name} must be a 1-d array of numbers, got {type(a).__name__}") from exc
    if v.ndim != 1:
        raise EmbgeomError(f"{name} must be a 1-d array (one value per token type), got shape {v.shape}")
    return v


def norm_variance_tradeoff(M, V, Q, n, min_count: int = 10, max_count: int = 100_000) -> dict:
    """Norm–variance trade-off across token types (see the module docstring).

    Parameters
    ----------
    M, V, Q : array-like, shape (T,)
        Per type ‖μ_t‖², trace of the covariance, and mean squared norm (float64).
    n : array-like, shape (T,)
        Per type count n_t.
    min_count, max_count : int
        Only types with ``min_count ≤ n_t ≤ max_count`` take part (defaults 10 and
        100000, as in Yamagiwa & Shimodaira 2025).

    Returns
    -------
    dict with float ``mv_slope``, ``mv_intercept``, ``mv_r2``, ``mv_pearson``,
    ``q_cv`` and int ``n_types``; NaN where undefined (fewer than 2 types, no spread).
    """
    M = _as_vector(M, "M")
    V = _as_vector(V, "V")
    Q = _as_vector(Q, "Q")
    counts = _as_vector(n, "n")
    if not (M.shape == V.shape == Q.shape == counts.shape):
        raise EmbgeomError(
            f"M, V, Q and n must have one value per token type each, got lengths "
            f"{M.shape[0]}, {V.shape[0]}, {Q.shape[0]}, {counts.shape[0]}"
        )
    if min_count > max_count:
        raise EmbgeomError(f"min_count ({min_count}) must not exceed max_count ({max_count})")

    keep = (counts >= min_count) & (counts <= max_count)
    keep &= np.isfinite(M) & np.isfinite(V) & np.isfinite(Q)
    m, v, q = M[keep], V[keep], Q[keep]
    k = int(m.size)
    nan = math.nan
    out = {"mv_slope": nan, "mv_intercept": nan, "mv_r2": nan, "mv_pearson": nan, "q_cv": nan, "n_types": k}

    if k >= 1:
        q_mean = float(q.mean())
        if q_mean != 0.0:
            out["q_cv"] = float(np.sqrt(np.mean((q - q_mean) ** 2)) / q_mean)
    if k < 2:
        return out

    m_mean, v_mean = float(m.mean()), float(v.mean())
    dm, dv = m - m_mean, v - v_mean
    sxx = float(dm @ dm)
    syy = float(dv @ dv)
    sxy = float(dm @ dv)
    # "No spread" up to rounding of the centring itself.
    tiny = np.finfo(np.float64).eps
    if sxx <= k * (tiny * float(np.max(np.abs(m)))) ** 2:
        return out
    slope = sxy / sxx
    intercept = v_mean - slope * m_mean
    out["mv_slope"] = float(slope)
    out["mv_intercept"] = float(intercept)
    if syy > k * (tiny * float(np.max(np.abs(v)))) ** 2:
        resid = dv - slope * dm
        out["mv_r2"] = float(1.0 - float(resid @ resid) / syy)
        out["mv_pearson"] = float(np.clip(sxy / math.sqrt(sxx * syy), -1.0, 1.0))
    return out
