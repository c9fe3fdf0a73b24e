"""Gram-matrix kernels of the moment accumulators: xᵀx added to the upper triangle
only, a per-thread float32 work matrix, and the symmetric matrix read back.
"""
from __future__ import annotations

import threading

import torch

__all__ = ["add_gram_upper", "symmetric_from_upper"]


def _strips(d: int) -> list[tuple[int, int]]:
    """Row strips [a, b) of about 96 columns covering a d × d matrix."""
    k = max(1, d // 96)
    edges = [round(i * d / k) for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


def add_gram_upper(acc: torch.Tensor, x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """acc += xᵀx on the upper triangle (and diagonal blocks) only, in place: one
    matrix product per row strip of about 96 columns, written straight into `acc`.
    There is no symmetric rank-k update in torch; computing about half the entries
    of x.T @ x, with no temporary, is the next best thing.
    Entries strictly below the diagonal blocks are left as they were; beta=0 writes
    xᵀx instead of adding it (what was there is ignored, NaN included)."""
    for a, b in _strips(x.shape[1]):
        acc[a:b, a:].addmm_(x[:, a:b].T, x[:, a:], beta=beta)
    return acc


_work = threading.local()


def _gram_work(dim: int, device: torch.device) -> torch.Tensor:
    """A float32 d × d work matrix for one batch's Gram, shared by the accumulators of
    this thread (one per width and device, not one per accumulator). `add_gram_upper`
    with beta=0 overwrites the same upper strips every time, so below the diagonal
    blocks it stays zero."""
    cache = _work.__dict__.setdefault("gram", {})
    key = (dim, str(device))
    if key not in cache:
        cache[key] = torch.zeros(dim, dim, dtype=torch.float32, device=device)
    return cache[key]


def symmetric_from_upper(m: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is that of `m` (a new tensor)."""
    u = torch.triu(m)
    return u.add_(torch.triu(m, 1).T)
