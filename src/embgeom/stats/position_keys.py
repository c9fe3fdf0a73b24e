"""Keys and seeded priorities of token positions, for :class:`PositionSample`'s
bottom-k sampling (the method is described in ``position_sample``).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import EmbgeomError

__all__ = ["pack_position_keys", "position_priorities"]

_M64 = (1 << 64) - 1


def pack_position_keys(document_index, token_offset) -> torch.Tensor:
    """Pack (document index, token offset in the document) into unique int64 keys:
    ``document_index · 2³² + token_offset``. Accepts integer arrays/tensors (broadcast);
    requires ``0 ≤ document_index < 2³¹`` and ``0 ≤ token_offset < 2³²``."""
    d = document_index if isinstance(document_index, torch.Tensor) else torch.as_tensor(np.asarray(document_index))
    o = token_offset if isinstance(token_offset, torch.Tensor) else torch.as_tensor(np.asarray(token_offset))
    if d.is_floating_point() or o.is_floating_point() or d.dtype == torch.bool or o.dtype == torch.bool:
        raise EmbgeomError("document_index and token_offset must be integers")
    d = d.to(torch.int64)
    o = o.to(device=d.device, dtype=torch.int64)
    if d.numel() and (int(d.min()) < 0 or int(d.max()) >= 1 << 31):
        raise EmbgeomError("document_index must be in [0, 2**31) to be packed into a key")
    if o.numel() and (int(o.min()) < 0 or int(o.max()) >= 1 << 32):
        raise EmbgeomError("token_offset must be in [0, 2**32) to be packed into a key")
    return d * (1 << 32) + o


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (Steele, Lea, Flood 2014) on a uint64 array."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def position_priorities(keys, seed: int = 0) -> np.ndarray:
    """Seeded 64-bit priorities of int64 keys, as int64 whose signed order is the
    unsigned order of the hash ``splitmix64(key XOR splitmix64(seed))``."""
    k = np.ascontiguousarray(np.asarray(keys, dtype=np.int64)).view(np.uint64)
    s = _splitmix64(np.array([int(seed) & _M64], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        h = _splitmix64(k ^ s)
    return (h ^ np.uint64(1 << 63)).view(np.int64)


def _as_keys(keys) -> np.ndarray:
    if isinstance(keys, torch.Tensor):
        if keys.is_floating_point() or keys.is_complex():
            raise EmbgeomError(f"keys must be integers (int64), got dtype {keys.dtype}")
        k = keys.detach().to("cpu", torch.int64).numpy()
    else:
        k = np.asarray(keys)
        if k.size and not np.issubdtype(k.dtype, np.integer):
            raise EmbgeomError(f"keys must be integers (int64), got dtype {k.dtype}")
        k = k.astype(np.int64, copy=False)
    if k.ndim != 1:
        raise EmbgeomError(f"keys must be a 1-d array of int64, got shape {k.shape}")
    return np.ascontiguousarray(k)


def _order(prio: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Indices sorted by (priority, key)."""
    return np.lexsort((keys, prio))
