"""Similarity of two representations of the same tokens: linear CKA and linearity.

Both read only the covariances of the centred rows (Σ_xx, Σ_yy and the cross
covariance Σ_xy), so the pipeline computes them from streaming float64 cross-moments
of consecutive layers, with no N × N matrix; the functions on arrays below build the
same covariances from X and Y.

References
----------
- S. Kornblith, M. Norouzi, H. Lee, G. Hinton (2019), "Similarity of neural network
  representations revisited", ICML (linear CKA).
- A. Razzhigaev, M. Mikhalchuk, E. Goncharova, N. Gerasimenko, I. Oseledets,
  D. Dimitrov, A. Kuznetsov (2024), "Your Transformer is Secretly Linear", ACL
  (the linearity score).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import EmbgeomError

__all__ = ["linear_cka", "linearity", "cka_from_covariances", "linearity_from_covariances"]

# Eigenvalues of Σ_xx below this fraction of the largest are left out of its pseudo-inverse.
PINV_RTOL = 1e-10


def _pair(X, Y) -> tuple[np.ndarray, np.ndarray]:
    def arr(a, name):
        if isinstance(a, torch.Tensor):
            a = a.detach().to("cpu", torch.float64).numpy()
        a = np.asarray(a, dtype=np.float64)
        if a.ndim != 2:
            raise EmbgeomError(f"{name} must be a 2-d array (tokens, features), got shape {a.shape}")
        if not np.isfinite(a).all():
            raise EmbgeomError(f"{name} holds NaN or infinite values")
        return a

    X, Y = arr(X, "X"), arr(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise EmbgeomError(f"X and Y must hold the same tokens (rows): {X.shape[0]} vs {Y.shape[0]}")
    if X.shape[0] < 2:
        raise EmbgeomError(f"X and Y need at least 2 rows, got {X.shape[0]}")
    return X, Y


def _covariances(X, Y):
    X, Y = _pair(X, Y)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    n = X.shape[0]
    return Xc.T @ Xc / n, Yc.T @ Yc / n, Xc.T @ Yc / n


def cka_from_covariances(Sxx, Syy, Sxy) -> float:
    """‖Σ_xy‖²_F / (‖Σ_xx‖_F ‖Σ_yy‖_F); any common scale of the three cancels (so
    scatter matrices do as well). NaN when either representation has no variance."""
    den = float(np.linalg.norm(Sxx) * np.linalg.norm(Syy))
    return float(np.sum(np.square(Sxy)) / den) if den > 0 else math.nan


def linearity_from_covariances(Sxx, Syy, Sxy) -> float:
    """tr(Σ_yx Σ_xx⁺ Σ_xy) / tr(Σ_yy), the pseudo-inverse keeping the eigenvalues of
    Σ_xx above PINV_RTOL × the largest. Scale-free like CKA. NaN when Y or X has no
    variance."""
    Sxx = np.asarray(Sxx, dtype=np.float64)
    tyy = float(np.trace(Syy))
    if not tyy > 0:
        return math.nan
    # torch's LAPACK (MKL) is much faster than numpy's here at widths in the hundreds.
    lam, V = torch.linalg.eigh(torch.from_numpy(0.5 * (Sxx + Sxx.T)))
    if not lam.numel() or lam[-1] <= 0:
        return math.nan
    keep = lam > PINV_RTOL * lam[-1]
    P = V[:, keep].T @ torch.from_numpy(np.ascontiguousarray(Sxy, dtype=np.float64))  # Σ_xy in Σ_xx's eigenbasis
    return float((P.square() / lam[keep, None]).sum()) / tyy


def linear_cka(X, Y) -> float:
    """Linear CKA of two representations of the same n tokens, X (n, p) and Y (n, q):
    ‖Σ_xy‖²_F / (‖Σ_xx‖_F ‖Σ_yy‖_F) with Σ the covariances of the centred rows
    (float64). 1 for representations equal up to an orthogonal map and isotropic
    scaling; near 0 for unrelated ones.

    Reference: S. Kornblith, M. Norouzi, H. Lee, G. Hinton (2019), "Similarity of
    neural network representations revisited", ICML.

    Parameters
    ----------
    X, Y : (n, p) and (n, q) arrays or tensors, row i of both the same token.

    >>> import numpy as np
    >>> from embgeom import linear_cka
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 16))
    >>> Q = np.linalg.qr(rng.normal(size=(16, 16)))[0]  # an orthogonal map
    >>> round(linear_cka(X, 3 * X @ Q), 6), round(linear_cka(X, rng.normal(size=(200, 16))), 3)
    (1.0, 0.075)
    """
    return cka_from_covariances(*_covariances(X, Y))


def linearity(X, Y) -> float:
    """Linearity score of Y on X: 1 − min_A ‖X̃A − Ỹ‖²_F, X̃, Ỹ the centred rows
    scaled to unit Frobenius norm. The least-squares residual is
    ‖Ỹ‖² − tr(Ỹᵀ P_X Ỹ), so the score is tr(Σ_yx Σ_xx⁺ Σ_xy) / tr(Σ_yy): the share of
    Y's variance a linear map of X explains (1: Y is an affine function of X).
    Eigenvalues of Σ_xx below 1e-10 of the largest are dropped from Σ_xx⁺.

    Reference: A. Razzhigaev, M. Mikhalchuk, E. Goncharova, N. Gerasimenko,
    I. Oseledets, D. Dimitrov, A. Kuznetsov (2024), "Your Transformer is Secretly
    Linear", ACL.

    Parameters
    ----------
    X, Y : (n, p) and (n, q) arrays or tensors, row i of both the same token.

    >>> import numpy as np
    >>> from embgeom import linearity
    >>> rng = np.random.default_rng(0)
    >>> X, A = rng.normal(size=(200, 16)), rng.normal(size=(16, 8))
    >>> round(linearity(X, X @ A + 1), 6), round(linearity(X, np.tanh(X @ A)), 2)
    (1.0, 0.79)
    """
    return linearity_from_covariances(*_covariances(X, Y))
