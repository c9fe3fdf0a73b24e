"""The exact k-NN of distinct points: candidates from low-precision tiles, exact
float64 distances, the certificate, and the float64 fallback (see :mod:`.neighbors`
for the method; :mod:`._knn_bounds` for what a key proves)."""
from __future__ import annotations

import math

import numpy as np
import torch

from . import _knn_bounds as kb
from . import _knn_points as kp
from . import _knn_precision
from . import _knn_tiles as kt
from ._knn_bounds import _GROUP, _U64, _gamma
from .._hardware import ieee_fp32_matmul

_SPLIT_MIN = 256  # diagonal blocks of ≥ 2·_SPLIT_MIN points are split in halves
_CHUNK_ELEMS = 1 << 17  # elements per row chunk of the fallback's passes (1 MiB of float64)


def _row_chunks(n: int, d: int, elems: int = _CHUNK_ELEMS):
    """``(start, end)`` row ranges covering ``0:n`` in pieces of about ``elems``
    elements of an ``n × d`` matrix (no n × d temporaries)."""
    step = max(1, elems // max(1, d))
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def _threshold_rows(X64, mean, scale, half64, rows, tau, k, block):
    """Exact k-NN of the points ``rows`` by collecting *every* point whose float64 key is
    at most ``tau`` (a key is a lower bound of the scaled half squared distance, and
    ``tau`` an upper bound of the k-th neighbour's), then evaluating those exactly.

    The centred, scaled coordinates ``(X64 − mean)·scale`` are formed a block of
    columns at a time (and, per block, for the rows' own chunk), never as a whole
    n × d copy; ``half64`` are the lowered half squared norms of all of them.
    Exact distances by :func:`_pairs` (the values :func:`resolve` gives too)."""
    m = rows.shape[0]
    n = X64.shape[0]
    dev = X64.device
    out_sq = torch.empty((m, k), dtype=torch.float64, device=dev)
    out_nb = torch.empty((m, k), dtype=torch.int64, device=dev)

    def centred(x):
        x = torch.sub(x, mean)
        return x.mul_(scale) if scale != 1.0 else x

    rb = max(1, min(256, m))
    chunks = [(i0, min(i0 + rb, m)) for i0 in range(0, m, rb)]
    found = [([], []) for _ in chunks]
    for j0 in range(0, n, block):
        j1 = min(j0 + block, n)
        xj = centred(X64[j0:j1])
        for (i0, i1), (pr, pc) in zip(chunks, found):
            ri = rows[i0:i1]
            t = half64[ri, None] + half64[None, j0:j1]
            t.addmm_(centred(X64[ri]), xj.T, alpha=-1.0)
            inside = (ri >= j0) & (ri < j1)
            if bool(inside.any()):
                r = torch.nonzero(inside).squeeze(1)
                t[r, ri[r] - j0] = math.inf
            nz = torch.nonzero(t <= tau[i0:i1, None])
            pr.append(nz[:, 0])
            pc.append(nz[:, 1] + j0)
            del t
        del xj
    for (i0, i1), (pr, pc) in zip(chunks, found):
        ri = rows[i0:i1]
        pr = torch.cat(pr)
        pc = torch.cat(pc)
        s = _pairs(X64, ri[pr], pc)
        o = torch.argsort(s, stable=True)
        o = o[torch.argsort(pr[o], stable=True)]
        pr, pc, s = pr[o], pc[o], s[o]
        counts = torch.bincount(pr, minlength=i1 - i0)
        if bool((counts < k).any()):  # pragma: no cover - would be a bug in the bounds
            raise RuntimeError("embgeom internal error: exact k-NN fallback collected too few points")
        first = torch.cumsum(counts, 0) - counts
        pos = torch.arange(pr.numel(), device=dev) - first[pr]
        keep = pos < k
        out_sq[pr[keep] + i0, pos[keep]] = s[keep]
        out_nb[pr[keep] + i0, pos[keep]] = pc[keep]
    return out_sq, out_nb


def _pairs(X64, a, b):
    """Exact float64 squared distances of the pairs (a[t], b[t]) of rows of the
    contiguous CPU float64 or float32 ``X64`` (compiled: the values of resolve)."""
    out = np.empty(a.shape[0])
    kp.pair_sq(X64.numpy(), a.numpy(), b.numpy(), out)
    return torch.from_numpy(out)


def _plan(n, d, k, margin, abs_max, mean_max, precision):
    """Scaling, centring error and list length of a k-NN of n points with candidates
    in ``precision``: (scale, to_scaled, delta, p, n_pad), or None when every point
    is the origin. ``abs_max`` bounds ``max |X|``, ``mean_max`` is ``max |mean|``."""
    amax = (abs_max + mean_max) * (1 + 1e-12)
    if amax == 0.0:
        return None
    # Scale by a power of two (exact) only when the coordinates are far from 1 in
    # magnitude, so that float32/bf16 neither overflow nor lose everything to underflow.
    e = 0 if 2.0 ** -20 <= amax <= 2.0 ** 20 else math.frexp(amax)[1]
    scale = 2.0 ** -e
    to_scaled = 2.0 ** (-2 * e)  # scaled squared distance = to_scaled × true squared distance
    # |‖xs_i − xs_j‖ − ‖x_i − x_j‖·2⁻ᵉ| ≤ delta: rounding of the centring
    delta = 2.1 * math.sqrt(d) * _U64 * amax * scale
    if margin is None:
        margin = max(8, k) if precision == "bf16" else 8
    p = min(k + margin, n - 1)
    n_pad = -(-n // _GROUP) * _GROUP
    return scale, to_scaled, delta, p, n_pad



def _tile_plan(n_pad: int, block: int):
    """The tiles ``(i0, i1, j0, j1)`` in scan order: diagonal blocks first (they
    seed every point's list and threshold), a large one as two diagonal tiles of its
    halves and the tile between them (a quarter fewer keys than its full square),
    then the tiles between blocks."""
    starts = list(range(0, n_pad, block))
    plan, halves = [], []
    for i0 in starts:
        i1 = min(i0 + block, n_pad)
        m = i0 + ((i1 - i0) // 2 // _GROUP) * _GROUP if i1 - i0 >= 2 * _SPLIT_MIN else i1
        plan += [(a0, a1, a0, a1) for a0, a1 in (((i0, m), (m, i1)) if m < i1 else ((i0, i1),))]
        if m < i1:
            halves.append((i0, m, m, i1))
    plan += halves
    for a, i0 in enumerate(starts):
        for j0 in starts[a + 1:]:
            plan.append((i0, min(i0 + block, n_pad), j0, min(j0 + block, n_pad)))
    return plan


def _candidates(tile_fn, tile_dtype, bounds, n, n_pad, p, k, delta, block):
    """Every point's ``p`` smallest keys among the points that pass the screens:
    (keys (n, p) float32 ascending per row, +inf past ``cnt``; idx (n, p) int64;
    cnt (n,) int32), numpy.

    Each ``block × block`` tile of keys is computed once (one matrix product) and
    serves its rows and, transposed, its columns. Every key is screened against its
    row's (and, off the diagonal, its column's) threshold ``tau``, in key units:
    a point whose key exceeds it is provably farther than the k-th neighbour. The
    thresholds come from the diagonal tiles and tighten as soon as a list changes."""
    keys = np.full((n, p), np.inf, dtype=np.float32)
    idx = np.zeros((n, p), dtype=np.int64)
    cnt = np.zeros(n, dtype=np.int32)
    tau = np.full(n, np.inf, dtype=np.float32)
    G = np.ascontiguousarray(bounds.G.numpy())
    u_o, sigma = float(bounds.u_o), float(bounds.sigma)
    is16 = tile_dtype == torch.bfloat16
    view = torch.int16 if is16 else torch.int32
    bs = min(block, n_pad)
    buf = torch.empty(bs * bs, dtype=tile_dtype)
    for i0, i1, j0, j1 in _tile_plan(n_pad, block):
        t = tile_fn(i0, i1, j0, j1, buf[: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0)).view(view).numpy()
        if i0 == j0:
            kt.tile_diag(t, i0, n, keys, idx, cnt, tau, G, u_o, sigma, delta, k, is16)
        else:
            kt.tile_off(t, i0, j0, n, keys, idx, cnt, tau, G, u_o, sigma, delta, k, is16)
    return keys, idx, cnt


def _prepare(xn, rows, k, margin, precision):
    """Centre, scale and round the points ``rows`` of ``xn`` in one pass: (plan,
    n̂, operand state, centre), or None when the data need rescaling first
    (coordinates beyond 2⁴⁰⁰ or all below 2⁻⁴⁰⁰), or the string "nonfinite".

    The centre is the mean of a sample of the points (any centre keeps the
    distances; this one is known before the pass, which also finds the largest
    magnitude and any NaN/inf). The power-of-two scaling is guessed from the sample
    and the pass redone in the rare case that the whole data call for another one."""
    u, d = rows.shape[0], xn.shape[1]
    centre, guess = kp.sample_centre(xn, rows, max(1, u // 512))
    if not (math.isfinite(guess) and np.isfinite(centre).all()):
        guess, centre = 1.0, np.zeros(d)  # NaN/inf in the sample: the pass finds it
    elif guess > 2.0 ** 400 or 0.0 < guess < 2.0 ** -400:
        return None
    cmax = float(np.abs(centre).max())
    redone = False
    while True:
        plan = _plan(u, d, k, margin, guess, cmax, precision) or _plan(u, d, k, margin, 1.0, 0.0, precision)
        nhat, abs_max, state = kb.prepare(xn, rows, centre, plan[0], precision, plan[4])
        if not np.isfinite(nhat).all():  # NaN/inf, or finite data so large that n̂ overflows
            return None if math.isfinite(abs_max) and abs_max > 2.0 ** 400 else "nonfinite"
        if abs_max > 2.0 ** 400 or 0.0 < abs_max < 2.0 ** -400:
            return None
        final = _plan(u, d, k, margin, abs_max, cmax, precision)  # distinct points: never all the origin
        if final[0] == plan[0] or redone:
            return final, nhat, state, centre
        redone, guess = True, abs_max  # the scaling differs: once more with the right one


def search(X, xn, rows, k, block, margin, precision):
    """Exact k-NN of the distinct points ``rows`` (u,) of ``xn`` (the numpy view of
    the contiguous CPU float32 or float64 tensor ``X``): (sq (u, k) float64
    ascending, nb (u, k) int64 indices into the u points, info dict), None when the
    data need rescaling first, or "nonfinite". Runs with ``embgeom._numba.LOCK``
    held."""
    u, d = rows.shape[0], xn.shape[1]
    choice = _knn_precision.choose(d, precision)
    prepared = _prepare(xn, rows, k, margin, choice["precision"])
    if prepared is None or isinstance(prepared, str):
        return prepared
    (scale, to_scaled, delta, p, n_pad), nhat, state, centre = prepared
    with ieee_fp32_matmul():
        tile_fn, tile_dtype, bounds = kb.operands(state, nhat, n_pad, d)
        del state
        keys, idx, cnt = _candidates(tile_fn, tile_dtype, bounds, u, n_pad, p, k, delta, block)
        del tile_fn
    out_sq = np.empty((u, k))
    out_nb = np.empty((u, k), dtype=np.int64)
    ok = np.empty(u, dtype=np.bool_)
    need = np.empty(u, dtype=np.int64)
    kp.resolve(xn, rows, keys, idx, cnt, k, to_scaled, float(bounds.u_o), float(bounds.sigma), delta,
               out_sq, out_nb, ok, need)
    bad = np.flatnonzero(~ok)
    info = dict(choice, n_distinct=u, k=k, p=p, fallback_rows=int(bad.size),
                evaluated_beyond_k=int(np.maximum(need - min(p, k), 0).sum()), most_needed=int(need.max()))
    out_sq, out_nb = torch.from_numpy(out_sq), torch.from_numpy(out_nb)
    if bad.size:
        _fallback(X, rows, centre, scale, to_scaled, delta, torch.from_numpy(bad), k, block, out_sq, out_nb)
    return out_sq, out_nb, info


def _fallback(X, rows, centre, scale, to_scaled, delta, bad, k, block, out_sq, out_nb):
    """Redo the rows ``bad`` with float64 keys (:func:`_threshold_rows`) on a float64
    copy of the distinct points: every point whose float64 key is at most the k-th
    exact distance found so far is evaluated, which is complete by construction."""
    Xd = X[torch.from_numpy(rows)].to(torch.float64)
    u, d = Xd.shape
    mean = torch.from_numpy(centre)
    sq_norm = torch.empty(u, dtype=torch.float64)
    for s, e in _row_chunks(u, d):  # squared norms of the centred, scaled points
        xs = torch.sub(Xd[s:e], mean)
        if scale != 1.0:
            xs.mul_(scale)
        torch.sum(xs.mul_(xs), dim=1, out=sq_norm[s:e])
    c64 = 2.0 * (_gamma(d + 2, _U64) + 8 * _U64)
    half64 = (1.0 - c64) * 0.5 * sq_norm
    tau = (torch.sqrt(out_sq[bad, -1] * to_scaled) + delta) ** 2 * (0.5 * (1 + 1e-12)) + 2.0 ** -1000
    out_sq[bad], out_nb[bad] = _threshold_rows(Xd, mean, scale, half64, bad, tau, k, block)
