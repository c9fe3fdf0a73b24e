"""The pooled moments of :class:`embgeom.stats.token_moments.TokenMoments`: n, Q, M,
V and V's within/between split over a set of token types, in two float64 passes.
"""
from __future__ import annotations

import torch

_F64 = torch.float64


def pool(acc, rows: torch.Tensor) -> dict:
    """n, Q, M, V, V_within, V_between of the pooled vectors of `rows` (stored
    rows, in sorted-id order so the result does not depend on the order in which
    types arrived: a state_dict round trip reproduces it bit for bit)."""
    k = int(rows.shape[0])
    cnt = acc._counts.index_select(0, rows).to(_F64)
    N = float(cnt.sum())
    v_within = float(acc._m2.index_select(0, rows).sum()) / N
    # Overall mean, as an offset from the most frequent type's mean (pivot), so
    # far-from-origin means lose nothing; then a second, centred pass.
    pivot = acc._mean[int(rows[int(torch.argmax(cnt))])].clone()
    chunks = list(acc._chunk_rows(k))
    # One chunk (the usual case): gather the means once for both passes.
    whole = acc._mean.index_select(0, rows).sub_(pivot) if len(chunks) == 1 else None

    def offsets(a, b):  # μ_t − pivot of rows a:b (the second pass may overwrite it)
        return whole if whole is not None else acc._mean.index_select(0, rows[a:b]).sub_(pivot)

    mu_off = torch.zeros(acc.dim, dtype=_F64, device=acc._device)
    for a, b in chunks:
        mu_off += cnt[a:b] @ offsets(a, b)
    mu_off /= N
    between = 0.0
    for a, b in chunks:
        dd = offsets(a, b).sub_(mu_off)
        between += float(cnt[a:b] @ dd.square_().sum(1))
    v_between = between / N
    mean = pivot + mu_off
    M = float(mean @ mean)
    V = v_within + v_between
    return {"n": int(N), "Q": M + V, "M": M, "V": V, "V_within": v_within, "V_between": v_between}
