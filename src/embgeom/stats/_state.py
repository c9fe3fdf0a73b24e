"""Checks of the state dicts the accumulators are rebuilt from.

Every accumulator's ``from_state_dict(sd, device=None)`` refuses a state that no
accumulator could have written (a negative or fractional count, a NaN, a wrong
shape, an asymmetric scatter matrix, a negative sum of squares, an unknown
version) with an EmbgeomError that names the entry, instead of rebuilding an
accumulator that would report different numbers or fail later in linear algebra.
The checks are necessary conditions, cheap next to the state's size (O(d²) for a
d × d matrix); a snapshot file also carries a checksum of its bytes.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import EmbgeomError


def check_kind(sd, kind: str, versions=(1,)) -> None:
    """`sd` is a dict of `kind` whose 'version' is one this code reads."""
    if not isinstance(sd, dict) or sd.get("kind") != kind:
        raise EmbgeomError(f"not a {kind} state_dict (missing kind='{kind}')")
    v = sd.get("version")
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) not in versions:
        raise EmbgeomError(
            f"{kind} state_dict has version {v!r}, which this embgeom does not read (it reads version "
            f"{', '.join(map(str, versions))}); rebuild it with the embgeom that wrote it, or start over"
        )


def entry(sd: dict, kind: str, key: str):
    try:
        return sd[key]
    except KeyError:
        raise EmbgeomError(f"{kind} state_dict lacks the entry '{key}'") from None


def count(value, kind: str, name: str, low: int = 0, high: int | None = None) -> int:
    """An integer count in [low, high]: ints (and 0-d integer tensors) only, so that
    3.5 or -2 is refused rather than rounded."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise EmbgeomError(f"{kind} state_dict: {name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise EmbgeomError(f"{kind} state_dict: {name} must be {bound}, got {value}")
    return int(value)


def tensor(value, kind: str, name: str, shape: tuple, *, floating: bool = True) -> torch.Tensor:
    """A tensor (or array) of `shape` (None: any length on that axis), floating
    point and finite, or integer."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise EmbgeomError(f"{kind} state_dict: {name} must be a tensor, got {type(value).__name__}")
    if value.ndim != len(shape) or any(w is not None and s != w for s, w in zip(value.shape, shape)):
        want = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ")"
        raise EmbgeomError(f"{kind} state_dict: {name} has shape {tuple(value.shape)}, expected {want}")
    if floating:
        if not value.is_floating_point():
            raise EmbgeomError(f"{kind} state_dict: {name} must be floating point, got {value.dtype}")
        if value.numel() and not bool(torch.isfinite(value).all()):
            raise EmbgeomError(f"{kind} state_dict: {name} holds NaN or infinite values")
    elif value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise EmbgeomError(f"{kind} state_dict: {name} must hold integers, got {value.dtype}")
    return value


def non_negative(t: torch.Tensor, kind: str, name: str) -> torch.Tensor:
    if t.numel() and bool((t < 0).any()):
        raise EmbgeomError(f"{kind} state_dict: {name} holds negative values (a sum of squares or a count "
                           "cannot be negative)")
    return t


def scatter_matrix(s: torch.Tensor, kind: str, name: str) -> torch.Tensor:
    """A sum of outer products Σ (x − μ)(x − μ)ᵀ: symmetric, non-negative diagonal,
    and |S_ij| ≤ √(S_ii S_jj) (Cauchy–Schwarz, with room for rounding)."""
    if not torch.equal(s, s.T):
        raise EmbgeomError(f"{kind} state_dict: {name} is not symmetric")
    diag = s.diagonal()
    non_negative(diag, kind, f"the diagonal of {name} (variances)")
    root = diag.sqrt()
    # Room for rounding: an accumulator whose batches' products were float32 (the
    # default for model-precision inputs) carries errors of about 1e-7 of its
    # largest variance, which a nearly degenerate direction can show.
    slack = 1e-5 * float(diag.max()) if diag.numel() else 0.0
    bound = torch.outer(root, root).mul_(1 + 1e-6).add_(slack + 1e-300)
    if bool((s.abs() > bound).any()):
        raise EmbgeomError(f"{kind} state_dict: {name} is not a covariance (an entry exceeds the square root "
                           "of its variances' product)")
    return s


def norm_at_most(v: torch.Tensor, limit: float, kind: str, name: str) -> None:
    """‖v‖ ≤ limit (a sum of unit vectors is no longer than their number)."""
    norm = float(torch.linalg.vector_norm(v.double()))
    if norm > limit * (1 + 1e-6) + 1e-6:  # unit vectors normalised in float32 are 1 to about 1e-7
        raise EmbgeomError(f"{kind} state_dict: {name} has norm {norm:.6g}, more than its {limit} vectors allow")


def finite_or_nan(values, kind: str, name: str, length: int) -> list:
    """A list of `length` numbers, each finite and >= 0 or NaN (a median norm)."""
    if not isinstance(values, (list, tuple)) or len(values) != length:
        raise EmbgeomError(f"{kind} state_dict: {name} must list {length} numbers")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or \
                (not math.isnan(v) and not (math.isfinite(v) and v >= 0)):
            raise EmbgeomError(f"{kind} state_dict: {name} holds {v!r}, not a non-negative number")
        out.append(float(v))
    return out
