"""Input validation shared by accumulators and estimators (arrays in, checked once)."""
from __future__ import annotations

import numpy as np
import torch

from .errors import EmbgeomError


def as_float_matrix(x, name: str = "X", dim: int | None = None):
    """Return ``x`` as a 2-d float torch tensor (no copy when already one).

    Accepts numpy arrays and torch tensors of any floating dtype; integer arrays are
    promoted to float64. Raises EmbgeomError naming the shape or dtype it got.
    """
    if isinstance(x, np.ndarray):
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise EmbgeomError(f"{name} must hold real numbers, got dtype {x.dtype}")
        if np.issubdtype(x.dtype, np.integer) or x.dtype == np.float16:
            x = x.astype(np.float64)
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x
        if not t.is_floating_point():
            if t.is_complex():
                raise EmbgeomError(f"{name} must hold real numbers, got dtype {t.dtype}")
            t = t.to(torch.float64)
    else:
        try:
            t = torch.as_tensor(np.asarray(x, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise EmbgeomError(f"{name} must be an (n, d) array of numbers, got {type(x).__name__}") from exc
    if t.ndim != 2:
        raise EmbgeomError(f"{name} must be a 2-d array of shape (n, d), got shape {tuple(t.shape)}")
    if dim is not None and t.shape[1] != dim:
        raise EmbgeomError(f"{name} has width {t.shape[1]}, but this accumulator was made for width {dim}")
    return t
