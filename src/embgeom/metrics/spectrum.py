"""Metrics of a covariance spectrum: anisotropy, isotropy scores and effective dimension.

All functions take the eigenvalues of a covariance (or second-moment) matrix and
return plain floats; `anisotropy` also works on a plain (n, d) array of points.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .._validate import as_float_matrix
from ..errors import EmbgeomError

SPECTRUM_METRICS = ("anisotropy", "isoscore", "effective_rank", "participation_ratio")


def eigenvalues(matrix) -> np.ndarray:
    """Eigenvalues of a symmetric positive semi-definite matrix, descending, float64.

    Tiny negative values from rounding are clipped to 0.
    """
    a = torch.as_tensor(np.asarray(matrix, dtype=np.float64)) if not isinstance(matrix, torch.Tensor) else matrix.double()
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise EmbgeomError(f"expected a square matrix, got shape {tuple(a.shape)}")
    # torch's LAPACK (MKL on x86 wheels) is an order of magnitude faster here than
    # numpy's bundled OpenBLAS for d in the hundreds.
    if not bool(torch.isfinite(a).all()):
        raise EmbgeomError("the matrix holds NaN or infinite values (an overflow of squared values?); "
                           "its eigenvalues are undefined: rescale the data")
    lam = torch.linalg.eigvalsh((a + a.T) / 2.0).flip(0).cpu().numpy()
    return np.clip(lam, 0.0, None)


def top_eigenvalue(matrix) -> float:
    """Largest eigenvalue of a symmetric positive semi-definite matrix (float64).

    Implicitly restarted Lanczos (ARPACK through scipy) to machine precision
    (tol=0): a few hundred matrix-vector products instead of a full decomposition,
    ~100× cheaper at d = 576. Falls back to the full decomposition if ARPACK does
    not converge.
    """
    a = np.asarray(matrix.cpu().numpy() if isinstance(matrix, torch.Tensor) else matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise EmbgeomError(f"expected a square matrix, got shape {a.shape}")
    a = (a + a.T) / 2.0
    if not np.isfinite(a).all():
        raise EmbgeomError("the matrix holds NaN or infinite values; its eigenvalues are undefined")
    if not a.any():  # ARPACK refuses the zero matrix (its Krylov vectors vanish)
        return 0.0
    if a.shape[0] > 2:
        from scipy.sparse.linalg import ArpackError, eigsh

        # A fixed start vector: the same matrix always gives the same bits.
        v0 = np.random.default_rng(0).standard_normal(a.shape[0])
        try:
            return max(0.0, float(eigsh(a, k=1, which="LA", tol=0, v0=v0, return_eigenvectors=False)[0]))
        except ArpackError:  # no convergence (a subclass) or a breakdown: the full decomposition
            pass
    return float(eigenvalues(a)[0])


def anisotropy_from_eigenvalues(lam: np.ndarray) -> float:
    """Share of variance on the top principal axis: λ₁ / Σ λ_i.

    Equals σ₁² / Σ σ_i² of the centred data matrix (Razzhigaev et al., EACL 2024).
    """
    total = float(np.sum(lam))
    return float(lam[0] / total) if total > 0 else math.nan


def isoscore_from_eigenvalues(lam: np.ndarray) -> float:
    """IsoScore (Rudman et al., ACL Findings 2022) from covariance eigenvalues.

    λ̂ = √d·λ/‖λ‖, δ = ‖λ̂ − 1‖ / √(2(d − √d)),
    score = ((d − δ²(d − √d))² − d) / (d(d − 1)); 1 is isotropic, 0 uses one axis.
    """
    lam = np.asarray(lam, dtype=np.float64)
    d = lam.size
    norm = float(np.linalg.norm(lam))
    if d < 2 or norm == 0:
        return math.nan
    sd = math.sqrt(d)
    lam_hat = sd * lam / norm
    delta = float(np.linalg.norm(lam_hat - 1.0)) / math.sqrt(2.0 * (d - sd))
    return ((d - delta**2 * (d - sd)) ** 2 - d) / (d * (d - 1))


def effective_rank_from_eigenvalues(lam: np.ndarray) -> float:
    """Effective rank (Roy & Vetterli 2007): exp(−Σ p_i log p_i), p = λ / Σ λ."""
    total = float(np.sum(lam))
    if total <= 0:
        return math.nan
    p = lam[lam > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def participation_ratio_from_eigenvalues(lam: np.ndarray) -> float:
    """Participation ratio: (Σ λ_i)² / Σ λ_i²."""
    sq = float(np.sum(np.square(lam)))
    return float(np.sum(lam)) ** 2 / sq if sq > 0 else math.nan


def spectrum_metrics(lam: np.ndarray) -> dict[str, float]:
    """All spectrum metrics of one covariance spectrum (eigenvalues, any order)."""
    lam = np.sort(np.clip(np.asarray(lam, dtype=np.float64), 0.0, None))[::-1]
    if lam.size and lam[0] > 0:  # every metric here is scale-free: keep the squares in range
        lam = lam / lam[0]
    return {
        "anisotropy": anisotropy_from_eigenvalues(lam),
        "isoscore": isoscore_from_eigenvalues(lam),
        "effective_rank": effective_rank_from_eigenvalues(lam),
        "participation_ratio": participation_ratio_from_eigenvalues(lam),
    }


def anisotropy(X) -> float:
    """Anisotropy of a point cloud: the share of its variance on the top principal
    axis, λ₁ / Σ λ_i, with λ the eigenvalues of the population covariance of the rows
    (float64); equal to σ₁² / Σ σ_i² of the centred data matrix. 1: the points lie on
    a line; about 1/d for isotropic data.

    Reference: A. Razzhigaev, M. Mikhalchuk, E. Goncharova, I. Oseledets, D. Dimitrov,
    A. Kuznetsov (2024), "The Shape of Learning: Anisotropy and Intrinsic Dimensions in
    Transformer-Based Models", Findings of EACL.

    Parameters
    ----------
    X : (n, d) array or tensor, n ≥ 2.

    >>> import numpy as np
    >>> from embgeom import anisotropy
    >>> X = np.random.default_rng(0).normal(size=(500, 8)) * [5, 1, 1, 1, 1, 1, 1, 1]
    >>> round(anisotropy(X), 2)  # about 25 / (25 + 7)
    0.75
    """
    t = as_float_matrix(X, "X")
    if t.shape[0] < 2:
        raise EmbgeomError(f"anisotropy needs at least 2 points, got X of shape {tuple(t.shape)}")
    x = t.detach().to(dtype=torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise EmbgeomError("X contains NaN or infinite values; anisotropy is undefined: drop or repair those rows")
    # The ratio does not depend on the scale: dividing by the largest magnitude first
    # keeps the squares in range (values of 1e200 would overflow float64 squared).
    scale = float(x.abs().max())
    if scale > 0:
        x = x / scale
    xc = x - x.mean(dim=0)
    # Singular values of the centred matrix avoid forming the d×d covariance.
    s = torch.linalg.svdvals(xc).cpu().numpy()
    return anisotropy_from_eigenvalues(s**2)

