"""Compiled CPU loops (numba) for the exact k-nearest-neighbour search.

:mod:`embgeom.metrics.neighbors` expresses every per-call pass of the search as torch
operations: the duplicate hash, the centring and rounding to bfloat16, the per-tile
top-p selection and screening, the merge of candidates and the exact float64
recomputation. Each is several whole-array operations with temporaries, and the
per-tile ones cost far more than the matrix product at small ``n``. These loops do the
same work in few passes:

* :func:`row_hash` / :func:`group_runs`: the duplicate hash of the rows that a cheap
  hash of a few columns could not separate, and the exact grouping;
* :func:`prep_bf16` / :func:`prep_fp32`: one pass over the distinct rows for the
  centred, scaled, rounded operands, the per-row sums that the key bound needs and
  the largest magnitude; :func:`finish_bf16` the per-point bound terms;
* :func:`tile_diag` / :func:`tile_off`: one read of a tile of keys, keeping every
  row's (and column's) ``p`` smallest keys in a sorted list and tightening its
  screening threshold as soon as candidates arrive;
* :func:`resolve`: the exact float64 distances of the candidates and the certificate;
  :func:`expand` the k-NN of the copies of duplicated points.

The arithmetic of the bounds is the torch path's, in float64, in the same order and
without fast-math (:mod:`embgeom.metrics.neighbors` documents the proofs); only the
sums that are not part of a bound proof re-associate (the hash, the centre, the squared
norms and residuals, whose error bounds are far wider than any summation order, and
the exact distances, whose order is as arbitrary as torch's vectorised sums). Keys of
a bfloat16 (float32) tile are read as int16 (int32) bit patterns: for a threshold
``T ≥ 0`` a key is ``≤ T`` exactly when its bits, read as a signed integer, are ``≤``
the bits of ``T`` rounded up, so the screen is an integer comparison (a negative
threshold is raised to +0 for the screen only, which merely lets more keys through to
the exact float comparison).

Only ever called with ``embgeom.stats._kernels.LOCK`` held (the parallel loops use
numba's workqueue layer, which does not nest).
"""
from __future__ import annotations

import numpy as np

# Imported first: it selects numba's threading layer before any parallel loop runs.
from ..stats._compiled import numba
from numba import prange  # noqa: E402

_FM = {"reassoc", "contract"}
_I32 = np.int32

# -----------------------------------------------------------------------
# per-call passes over the points
# -----------------------------------------------------------------------
@numba.njit(cache=True, nogil=True, fastmath=_FM)
def row_hash(x, rows, r, out):  # pragma: no cover - compiled
    """out[t] = Σ_j x[rows[t], j] r_j (float64): the duplicate hash of the rows (few:
    those that the hash of a few columns could not separate; serial)."""
    d = x.shape[1]
    for t in range(rows.shape[0]):
        i = rows[t]
        s = 0.0
        for j in range(d):
            s += np.float64(x[i, j]) * r[j]
        out[t] = s

@numba.njit(cache=True, nogil=True)
def group_runs(x, cand, key, rep):  # pragma: no cover - compiled
    """Among the rows ``cand`` (ascending), those with equal ``key`` are compared
    with the first (smallest) of them; ``rep[i]`` (preset to ``i``) becomes that
    first row for every exact copy of it. A row that merely shares a key stays
    on its own (NaN never equals anything)."""
    m = cand.shape[0]
    d = x.shape[1]
    order = np.argsort(key, kind="mergesort")  # stable: equal keys stay in row order
    a = 0
    while a < m:
        b = a + 1
        while b < m and key[order[b]] == key[order[a]]:
            b += 1
        f = cand[order[a]]
        for e in range(a + 1, b):
            i = cand[order[e]]
            same = True
            for j in range(d):
                if x[i, j] != x[f, j]:
                    same = False
                    break
            if same:
                rep[i] = f
        a = b

@numba.njit(cache=True, nogil=True)
def sample_centre(x, rows, step):  # pragma: no cover - compiled
    """float64 mean of the rows ``rows[::step]`` of ``x`` (a centre for the data)
    and their largest magnitude (a guess of the data's scale)."""
    d = x.shape[1]
    acc = np.zeros(d)
    mx = np.zeros(d)
    m = 0
    for t in range(0, rows.shape[0], step):
        i = rows[t]
        m += 1
        for j in range(d):
            v = np.float64(x[i, j])
            acc[j] += v
            av = abs(v)
            mx[j] = av if av > mx[j] else mx[j]
    big = 0.0
    for j in range(d):
        big = mx[j] if mx[j] > big else big
    return acc / max(m, 1), big

@numba.njit(cache=True, nogil=True, fastmath=_FM)
def prep_bf16_parts(x, rows, centre, scale, A, B, nhat, ne, parts, c0, c1, am):  # pragma: no cover
    """Parts ``c0 … c1 − 1`` of :func:`prep_bf16` (serial); writes their ``am``."""
    d = x.shape[1]
    mx = np.empty(d)
    for c in range(c0, c1):
        mx[:] = 0.0
        for i in range(parts[c], parts[c + 1]):
            src = rows[i]
            sn = 0.0
            se = 0.0
            for j in range(d):
                v = np.float64(x[src, j])
                av = abs(v)
                mx[j] = av if av > mx[j] else mx[j]
                xc = (v - centre[j]) * scale
                f = np.float32(xc)
                b = f.view(np.uint32)
                hb = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
                a16 = np.uint16(hb)
                A[i, j] = a16
                B[i, j] = a16 ^ np.uint16(0x8000)
                af = np.uint32(hb << np.uint32(16)).view(np.float32)
                e = np.float64(f) - np.float64(af)
                sn += xc * xc
                se += e * e
            nhat[i] = sn
            ne[i] = np.sqrt(se)
        m = 0.0
        for j in range(d):
            m = mx[j] if mx[j] > m else m
        am[c] = m

@numba.njit(cache=True, nogil=True, parallel=True)
def prep_bf16(x, rows, centre, scale, A, B, nhat, ne, parts):  # pragma: no cover - compiled
    """One pass over the distinct points ``i`` (row ``rows[i]`` of ``x``): the
    centred, scaled float64 coordinates ``xc = (x − centre)·scale``,
    ``x32 = float32(xc)`` and ``a = bf16(x32)`` (round to nearest even); writes the
    bits of ``a`` into ``A[i, :d]`` and of ``−a`` into ``B[i, :d]`` (uint16 views),
    ``nhat[i] = ‖xc‖²`` and ``ne[i] = ‖x32 − a‖`` (both float64; ``x32 − a`` is
    exact). Returns the largest ``|x|`` per part of points (``parts`` boundaries).
    A NaN or infinite coordinate makes ``nhat[i]`` non-finite."""
    P = parts.shape[0] - 1
    am = np.zeros(P)
    for c in prange(P):
        prep_bf16_parts(x, rows, centre, scale, A, B, nhat, ne, parts, c, c + 1, am)
    return am

@numba.njit(cache=True, nogil=True, parallel=True, fastmath=_FM)
def prep_fp32(x, rows, centre, scale, x32, nhat, parts):  # pragma: no cover - compiled
    """``x32[i] = float32((x[rows[i]] − centre)·scale)``, ``nhat[i] = ‖xc‖²``
    (float64, of the float64 centred coordinates); returns the largest ``|x|``
    per part, as :func:`prep_bf16`."""
    d = x.shape[1]
    P = parts.shape[0] - 1
    am = np.zeros(P)
    for c in prange(P):
        mx = np.zeros(d)
        for i in range(parts[c], parts[c + 1]):
            src = rows[i]
            sn = 0.0
            for j in range(d):
                v = np.float64(x[src, j])
                av = abs(v)
                mx[j] = av if av > mx[j] else mx[j]
                xc = (v - centre[j]) * scale
                x32[i, j] = np.float32(xc)
                sn += xc * xc
            nhat[i] = sn
        m = 0.0
        for j in range(d):
            m = mx[j] if mx[j] > m else m
        am[c] = m
    return am

@numba.njit(cache=True, nogil=True)
def _bf16_bits(x):  # pragma: no cover - compiled
    """bfloat16 bits of float64 ``x`` as torch converts it (to float32, then to
    bfloat16, both rounding to nearest even)."""
    b = np.float32(x).view(np.uint32)
    return np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))

@numba.njit(cache=True, nogil=True)
def _bf16_value(h16):  # pragma: no cover - compiled
    return np.float64(np.uint32(np.uint32(h16) << np.uint32(16)).view(np.float32))

@numba.njit(cache=True, nogil=True)
def finish_bf16(nhat, ne, eps_n, d, A, B, G, n, u32, u16, pad_bits, one_bits):  # pragma: no cover
    """``_bf16_finish`` of :mod:`embgeom.metrics.neighbors`, the same formulas in
    the same order (float64, no fast-math): from the squared norms ``nhat`` and
    residuals ``ne`` of the n points, writes the per-point widening ``G`` (n_pad,)
    (zero on padding), the columns ``d … d+3`` of ``A`` and ``B`` (uint16 views;
    ``[H, L, 1, 1]`` and ``[1, 1, H, L]``, padding rows ``[2¹⁰⁰, 0, 1, 1]`` and
    ``[1, 1, 2¹⁰⁰, 0]``) and zeroes the first d columns of the padding rows.
    ``t`` is the lower median of ``‖e‖/‖a‖``, as torch's median."""
    K = d + 4
    n_pad = A.shape[0]
    gd = d * u32 / (1.0 - d * u32)
    up = 1.0 + gd + 4 * u32
    gK = K * u32 / (1.0 - K * u32)
    c0 = np.sqrt(d) * 2.0 ** -63
    c1 = u32 * (1 + u32)
    ne2 = np.empty(n)
    na = np.empty(n)
    ratio = np.empty(n)
    npos = 0
    for i in range(n):
        nx = np.sqrt(nhat[i] * (1 + eps_n))
        y = ne[i] * up
        y = y + c0 + c1 * np.sqrt(nhat[i] * (1 + eps_n))
        e2 = y * y
        ne2[i] = e2
        z = nx + np.sqrt(e2)
        na[i] = z * z
        if nx > 0:
            ratio[npos] = np.sqrt(e2 / na[i])
            npos += 1
    t = 1.0
    if npos > 0:
        srt = np.sort(ratio[:npos])
        t = srt[(npos - 1) // 2]
    if not (t > 0):
        t = 1.0
    cv = 1.02 * u16 * u16
    for i in range(n):
        g = (t * na[i] + ne2[i] / t + ne2[i]) * 0.5 * (1 + 2.0 ** -40)
        w = gK * (1.02 * (0.5 * nhat[i] + g) + 0.5 * na[i])
        v = cv * (0.5 * nhat[i] + g + w) + 2.0 ** -125
        h = (1.0 - eps_n) * 0.5 * nhat[i] - g - w - v - nhat[i] * 2.0 ** -48
        H = _bf16_bits(h)
        L = _bf16_bits(h - _bf16_value(H))
        G[i] = (eps_n * nhat[i] + 2.0 * (g + w + v) + nhat[i] * 2.0 ** -46) * (1 + 2.0 ** -40) + 2.0 ** -1000
        A[i, d] = H
        A[i, d + 1] = L
        A[i, d + 2] = one_bits
        A[i, d + 3] = one_bits
        B[i, d] = one_bits
        B[i, d + 1] = one_bits
        B[i, d + 2] = H
        B[i, d + 3] = L
    for i in range(n, n_pad):
        G[i] = 0.0
        for j in range(d):
            A[i, j] = 0
            B[i, j] = 0
        A[i, d] = pad_bits
        A[i, d + 1] = 0
        A[i, d + 2] = one_bits
        A[i, d + 3] = one_bits
        B[i, d] = one_bits
        B[i, d + 1] = one_bits
        B[i, d + 2] = pad_bits
        B[i, d + 3] = 0

@numba.njit(cache=True, nogil=True, parallel=True)
def expand(sq_u, nb_u, group, counts, k, out_sq, out_nb):  # pragma: no cover - compiled
    """``_expand`` of :mod:`embgeom.metrics.neighbors`: the k-NN of a multiset from
    that of its distinct points (a copy's other copies first, at distance 0, then
    the copies of its distinct neighbours in order, each as often as it occurs)."""
    n = group.shape[0]
    nu = counts.shape[0]
    ku = sq_u.shape[1]
    order = np.argsort(group, kind="mergesort")
    starts = np.empty(nu, dtype=np.int64)
    acc = 0
    for g in range(nu):
        starts[g] = acc
        acc += counts[g]
    rank = np.empty(n, dtype=np.int64)
    for e in range(n):
        rank[order[e]] = e - starts[group[order[e]]]
    cum = np.empty((nu, ku), dtype=np.int64)
    for g in prange(nu):
        a = 0
        for j in range(ku):
            a += counts[nb_u[g, j]]
            cum[g, j] = a
    for i in prange(n):
        g = group[i]
        m = counts[g]
        for t in range(k):
            if t < m - 1:  # the c-th other copy of the same point
                c = t + (1 if t >= rank[i] else 0)
                c = min(c, m - 1)
                out_nb[i, t] = order[min(starts[g] + c, n - 1)]
                out_sq[i, t] = 0.0
            else:
                tt = t - (m - 1)
                j = 0
                while j < ku and cum[g, j] <= tt:
                    j += 1
                j = min(j, ku - 1)
                prev = cum[g, j - 1] if j > 0 else 0
                v = nb_u[g, j]
                out_nb[i, t] = order[min(starts[v] + (tt - prev), n - 1)]
                out_sq[i, t] = sq_u[g, j]

# -----------------------------------------------------------------------
# running top-p lists (no fast-math: the bound arithmetic of _Bounds)
# -----------------------------------------------------------------------
@numba.njit(cache=True, nogil=True)
def _key_threshold(ub, delta, sigma, u_o):  # pragma: no cover - compiled
    """_Running.threshold then _Bounds.key_threshold for one upper bound ``ub``
    (float64) of the k-th neighbour's half squared distance: the smallest float32
    ``T`` such that every key whose lower bound is ≤ the widened ``ub`` is ≤ T."""
    if ub < 0.0:
        ub = 0.0
    y = np.sqrt(2.0 * ub) + 2.0 * delta
    t = y * y * 0.5
    t = t + sigma
    if t >= 0:
        x = t / (1.0 - u_o)
    else:
        x = t / (1.0 + u_o)
    x = x + abs(x) * 2.0 ** -40 + 2.0 ** -1000
    x32 = np.float32(x)
    if np.float64(x32) < x:
        x32 = np.nextafter(x32, np.float32(np.inf))
    return x32

@numba.njit(cache=True, nogil=True)
def _insert_pair(vals, ids, m, cap, v, j):  # pragma: no cover - compiled
    """Insert value v with its index j into the ascending list vals[:m] (ids[:m]
    alongside), after any equal values (stable), keeping at most `cap` entries.
    Returns the new length; the list is unchanged when full and v ≥ its last."""
    if m < cap:
        pos = m
        m += 1
    elif v >= vals[cap - 1]:
        return m
    else:
        pos = cap - 1
    while pos > 0 and vals[pos - 1] > v:
        vals[pos] = vals[pos - 1]
        ids[pos] = ids[pos - 1]
        pos -= 1
    vals[pos] = v
    ids[pos] = j
    return m

@numba.njit(cache=True, nogil=True)
def _tighten(g, keys, idx, cnt, tau, G, u_o, sigma, delta, k, scratch):  # pragma: no cover - compiled
    """tau[g] = min(tau[g], threshold of the k-th smallest upper bound among g's
    current candidates) (_Running.tighten)."""
    c = cnt[g]
    if c < k:
        return
    m = 0
    for t in range(c):
        r = np.float64(keys[g, t])
        sg = 1.0 if r > 0 else (-1.0 if r < 0 else 0.0)
        ub = r * (1.0 + u_o * sg) + sigma + G[g] + G[idx[g, t]]
        if m < k:
            pos = m
            m += 1
        elif ub >= scratch[k - 1]:
            continue
        else:
            pos = k - 1
        while pos > 0 and scratch[pos - 1] > ub:
            scratch[pos] = scratch[pos - 1]
            pos -= 1
        scratch[pos] = ub
    th = _key_threshold(scratch[k - 1], delta, sigma, u_o)
    if th < tau[g]:
        tau[g] = th

@numba.njit(cache=True, nogil=True)
def _offer(g, v, col, keys, idx, cnt, tau, p):  # pragma: no cover - compiled
    """Insert key ``v`` (float32) of point ``col`` into g's sorted list of the p
    smallest keys, unless the filter (``v > tau[g]``: provably farther than the
    k-th neighbour) or the list (full, ``v ≥`` its p-th key: pushed out) rejects
    it. Returns the position it was inserted at, or −1."""
    if not (v <= tau[g]):
        return -1
    c = cnt[g]
    if c == p:
        if v >= keys[g, p - 1]:
            return -1
        pos = p - 1
    else:
        pos = c
        cnt[g] = c + 1
    while pos > 0 and keys[g, pos - 1] > v:
        keys[g, pos] = keys[g, pos - 1]
        idx[g, pos] = idx[g, pos - 1]
        pos -= 1
    keys[g, pos] = v
    idx[g, pos] = col
    return pos

@numba.njit(cache=True, nogil=True)
def _tighten_first(g, keys, idx, cnt, tau, G, u_o, sigma, delta, k):  # pragma: no cover - compiled
    """tau[g] = min(tau[g], threshold of the largest upper bound among g's k
    smallest keys): those k distinct points are all within it, so it bounds the k-th
    neighbour too (a little above the k-th smallest upper bound that
    :func:`_tighten` selects, at O(k) instead of O(p·k) per inserted key)."""
    if cnt[g] < k:
        return
    m = -np.inf
    for t in range(k):
        r = np.float64(keys[g, t])
        sg = 1.0 if r > 0 else (-1.0 if r < 0 else 0.0)
        ub = r * (1.0 + u_o * sg) + sigma + G[g] + G[idx[g, t]]
        m = ub if ub > m else m
    th = _key_threshold(m, delta, sigma, u_o)
    if th < tau[g]:
        tau[g] = th

@numba.njit(cache=True, nogil=True)
def _screen_bits(g, keys, cnt, tau, p, is16):  # pragma: no cover - compiled
    """Integer screen for g: keys whose bits (signed) are ≤ the result include
    every key ≤ min(tau[g], p-th key when the list is full)."""
    lim = tau[g]
    if cnt[g] == p and keys[g, p - 1] < lim:
        lim = keys[g, p - 1]
    if not (lim > 0):
        return _I32(0)
    b = np.float32(lim).view(np.uint32)
    if is16:
        hb = _I32(b >> np.uint32(16))
        if (b & np.uint32(0xFFFF)) != 0:
            hb += 1  # round up to the next bfloat16
        return _I32(hb)
    return _I32(b)

@numba.njit(cache=True, nogil=True)
def _as_key(s, is16):  # pragma: no cover - compiled
    """float32 value of the key with bits ``s`` (int16: bfloat16; int32: float32)."""
    if is16:
        return np.uint32(np.uint32(np.uint16(s)) << np.uint32(16)).view(np.float32)
    return np.uint32(s).view(np.float32)

_GS = 32  # members of a strided group (rows' side) and rows of a band (columns' side)

@numba.njit(cache=True, nogil=True)
def _group_mins(row, gm, S, gs):  # pragma: no cover - compiled
    """gm[q] = min of the strided group ``row[q + m·S]``, m = 0 … gs − 1 (one
    vectorised pass over the row)."""
    for q in range(S):
        gm[q] = row[q]
    for m in range(1, gs):
        # a slice indexed by the loop counter: ``row[m*S + q]`` would need numba's
        # negative-index wraparound, which keeps LLVM from vectorising (~10x slower)
        seg = row[m * S : (m + 1) * S]
        for q in range(S):
            v = seg[q]
            gm[q] = v if v < gm[q] else gm[q]

@numba.njit(cache=True, nogil=True)
def _count_le(gm, S, thr):  # pragma: no cover - compiled
    z = 0
    for q in range(S):
        z += _I32(gm[q]) <= thr
    return z

_GD = 16  # most members of a strided group on diagonal tiles

@numba.njit(cache=True, nogil=True)
def _diag_rows(t, i0, n, keys, idx, cnt, tau, G, u_o, sigma, delta, k, is16, r0, r1):  # pragma: no cover
    """Rows ``r0 … r1 − 1`` of :func:`tile_diag` (serial)."""
    nc = min(t.shape[1], n - i0)
    p = keys.shape[1]
    # at least 4(p + 1) groups, so that the p + 1 smallest minima leave most groups
    # out (with too few groups, large p would collect and sort most of the row)
    gd = max(1, min(_GD, nc // (4 * (p + 1))))
    S = nc // gd
    rem = S * gd
    big = _I32(2147483647)
    scratch = np.empty(k)
    gm = np.empty(max(S, 1), dtype=t.dtype)
    cand = np.empty(nc, dtype=np.int64)
    gl = np.empty(max(S, 1), dtype=np.int64)
    lv = np.empty(p, dtype=np.float32)
    li = np.empty(p, dtype=np.int64)
    for r in range(r0, r1):
        g = i0 + r
        row = t[r]
        z = 0
        if S < p + 1:  # a narrow tile: every key is a candidate
            for c in range(nc):
                cand[z] = c
                z += 1
        else:
            _group_mins(row, gm, S, gd)
            hi = _I32(gm[0])
            lo = big  # smallest non-negative group minimum
            for q in range(S):
                v = _I32(gm[q])
                hi = v if v > hi else hi
                vp = v if v >= 0 else big
                lo = vp if vp < lo else lo
            if _count_le(gm, S, _I32(0)) >= p + 1:  # T is raised to +0 anyway
                lo = _I32(0)
                hi = lo
            while lo < hi:  # smallest T with at least p + 1 group minima ≤ T
                mid = lo + (hi - lo) // 2
                if _count_le(gm, S, mid) >= p + 1:
                    hi = mid
                else:
                    lo = mid + 1
            T = max(lo, _I32(0))
            ng = 0
            for q in range(S):  # the groups that can hold a candidate
                gl[ng] = q
                ng += _I32(gm[q]) <= T
            for e in range(ng):
                q = gl[e]
                for m in range(gd):
                    c = q + m * S
                    cand[z] = c
                    z += _I32(row[c]) <= T
            for c in range(rem, nc):
                cand[z] = c
                z += _I32(row[c]) <= T
        # the p smallest candidates, sorted (a point's own key is skipped)
        m_ = 0
        for e in range(z):
            c = cand[e]
            if i0 + c == g:
                continue
            m_ = _insert_pair(lv, li, m_, p, _as_key(row[c], is16), i0 + c)
        for e in range(m_):
            keys[g, e] = lv[e]
            idx[g, e] = li[e]
        cnt[g] = m_
        _tighten(g, keys, idx, cnt, tau, G, u_o, sigma, delta, k, scratch)

@numba.njit(cache=True, nogil=True, parallel=True)
def tile_diag(t, i0, n, keys, idx, cnt, tau, G, u_o, sigma, delta, k, is16):  # pragma: no cover
    """A diagonal tile ``t`` (bits of the keys of points ``i0 + r`` against
    ``i0 + c``), whose rows' lists are still empty: each row's p smallest keys of
    other points, then its threshold.

    The minima of strided groups of ``gd ≤ _GD`` columns (``q + m·S``) are taken in one
    vectorised pass; ``p + 1`` groups whose minima are at most ``T`` hold at least
    ``p`` keys of other points that are at most ``T`` (one may be the point
    itself), so with ``T`` the (p+1)-th smallest group minimum (found by bisection
    on the integer screen, and raised to +0, which only widens it) only the groups
    whose minimum is ≤ T can hold any of the p smallest; their members ≤ T are
    collected without branches and sorted into the list. Rows and columns ≥ ``n``
    (padding) are skipped. Rows are independent: chunks of them run in parallel."""
    nr = min(t.shape[0], n - i0)
    nchunk = min(nr, 64)
    for ch in prange(nchunk):
        _diag_rows(t, i0, n, keys, idx, cnt, tau, G, u_o, sigma, delta, k, is16,
                   ch * nr // nchunk, (ch + 1) * nr // nchunk)

@numba.njit(cache=True, nogil=True)
def tile_diag1(t, i0, n, keys, idx, cnt, tau, G, u_o, sigma, delta, k, is16):  # pragma: no cover
    """:func:`tile_diag` on the calling thread alone (no hand-over to numba's thread
    pool, whose wake-ups stall when the other cores are busy)."""
    _diag_rows(t, i0, n, keys, idx, cnt, tau, G, u_o, sigma, delta, k, is16, 0, min(t.shape[0], n - i0))

_CW = 256  # columns per task of the columns' side of tile_off

@numba.njit(cache=True, nogil=True)
def _off_setup(t, i0, j0, n, keys, cnt, tau, is16):  # pragma: no cover - compiled
    """The columns' screens as the tile starts, and the band arrays of :func:`tile_off`."""
    nr = min(t.shape[0], n - i0)
    nc = min(t.shape[1], n - j0)
    p = keys.shape[1]
    nb = (nr + _GS - 1) // _GS
    thrc = np.empty(nc, dtype=t.dtype)
    for c in range(nc):  # the screens fit the tile's integer type
        thrc[c] = _screen_bits(j0 + c, keys, cnt, tau, p, is16)
    hits = np.empty((nb, nc), dtype=np.int32)
    hmask = np.empty((nb, nc), dtype=np.uint32)
    nh = np.zeros(nb, dtype=np.int64)
    return thrc, hits, hmask, nh

@numba.njit(cache=True, nogil=True)
def _off_bands(t, i0, j0, n, keys, idx, cnt, tau, G, u_o, sigma, delta, k, is16, thrc, hits, hmask, nh,
               ba, bb):  # pragma: no cover - compiled
    """Bands ``ba … bb − 1`` of the rows' side of :func:`tile_off` (serial)."""
    nr = min(t.shape[0], n - i0)
    nc = thrc.shape[0]
    p = keys.shape[1]
    S = nc // _GS
    rem = S * _GS
    gm = np.empty(max(S, 1), dtype=t.dtype)
    mk = np.empty(nc, dtype=np.uint32)
    for b in range(ba, bb):
        ra = b * _GS
        rb = min(ra + _GS, nr)
        for c in range(nc):
            mk[c] = 0
        for r in range(ra, rb):
            row = t[r]
            bit = np.uint32(1) << np.uint32(r - ra)
            for c in range(nc):
                mk[c] |= bit if row[c] <= thrc[c] else np.uint32(0)
            g = i0 + r
            thr = _screen_bits(g, keys, cnt, tau, p, is16)
            _group_mins(row, gm, S, _GS)
            if _count_le(gm, S, thr) > 0:
                for q in range(S):
                    if _I32(gm[q]) <= thr:
                        for m in range(_GS):
                            c = q + m * S
                            if _I32(row[c]) <= thr:
                                pos = _offer(g, _as_key(row[c], is16), j0 + c, keys, idx, cnt, tau, p)
                                if pos >= 0:
                                    if pos < k:  # the first k changed (only they make the bound)
                                        _tighten_first(g, keys, idx, cnt, tau, G, u_o, sigma, delta, k)
                                    thr = _screen_bits(g, keys, cnt, tau, p, is16)
            for c in range(rem, nc):
                if _I32(row[c]) <= thr:
                    pos = _offer(g, _as_key(row[c], is16), j0 + c, keys, idx, cnt, tau, p)
                    if pos >= 0:
                        if pos < k:  # the first k changed (only they make the bound)
                            _tighten_first(g, keys, idx, cnt, tau, G, u_o, sigma, delta, k)
                        thr = _screen_bits(g, keys, cnt, tau, p, is16)
        h = 0
        for c in range(nc):
            hits[b, h] = c
            hmask[b, h] = mk[c]
            h += mk[c] != 0
        nh[b] = h

@numba.njit(cache=True, nogil=True)
def _off_cols(t, i0, j0, keys, idx, cnt, tau, G, u_o, sigma, delta, k, is16, hits, hmask, nh,
              c0, c1):  # pragma: no cover - compiled
    """Columns ``c0 … c1 − 1`` of the columns' side of :func:`tile_off` (serial)."""
    p = keys.shape[1]
    thr2 = np.empty(c1 - c0, dtype=np.int32)
    for c in range(c0, c1):
        thr2[c - c0] = _screen_bits(j0 + c, keys, cnt, tau, p, is16)
    for b in range(nh.shape[0]):
        ra = b * _GS
        hb = hits[b]
        # the hits of a band ascend by column: find this range's start
        lo = 0
        hi = nh[b]
        while lo < hi:
            mid = (lo + hi) // 2
            if hb[mid] < c0:
                lo = mid + 1
            else:
                hi = mid
        for e in range(lo, nh[b]):
            c = hb[e]
            if c >= c1:
                break
            g = j0 + c
            mask = np.uint32(hmask[b, e])
            while mask != 0:
                low = np.uint32(mask & np.uint32(np.uint32(~mask) + np.uint32(1)))
                r = ra + _ctz32(low)
                mask = np.uint32(mask ^ low)
                if _I32(t[r, c]) <= thr2[c - c0]:
                    pos = _offer(g, _as_key(t[r, c], is16), i0 + r, keys, idx, cnt, tau, p)
                    if pos >= 0:
                        if pos < k:  # the first k changed (only they make the bound)
                            _tighten_first(g, keys, idx, cnt, tau, G, u_o, sigma, delta, k)
                        thr2[c - c0] = _screen_bits(g, keys, cnt, tau, p, is16)

@numba.njit(cache=True, nogil=True, parallel=True)
def tile_off(t, i0, j0, n, keys, idx, cnt, tau, G, u_o, sigma, delta, k, is16):  # pragma: no cover
    """An off-diagonal tile ``t`` (bits of the keys of points ``i0 + r`` against
    ``j0 + c``): offer every key that passes its row's screen to the row's list,
    and every key that passes its column's screen to the column's list; a list's
    threshold tightens as soon as it changes.

    One read of the tile, in bands of ``_GS`` rows (a task per run of bands): per
    row the minima of strided groups of ``_GS`` columns (``q + m·S``; only the groups
    whose minimum passes the row's screen are read again), and per column a bit
    mask of the band's rows whose key passes the column's screen as it was when
    the tile started (screens only tighten, so that is a superset). The marked
    entries are then offered by column tasks, against the columns' current
    screens. Rows and columns ≥ ``n`` (padding) are skipped."""
    thrc, hits, hmask, nh = _off_setup(t, i0, j0, n, keys, cnt, tau, is16)
    nb = nh.shape[0]
    nc = thrc.shape[0]
    nchunk = min(nb, 64)
    for ch in prange(nchunk):
        _off_bands(t, i0, j0, n, keys, idx, cnt, tau, G, u_o, sigma, delta, k, is16, thrc, hits, hmask, nh,
                   ch * nb // nchunk, (ch + 1) * nb // nchunk)
    ntask = (nc + _CW - 1) // _CW
    for task in prange(ntask):
        _off_cols(t, i0, j0, keys, idx, cnt, tau, G, u_o, sigma, delta, k, is16, hits, hmask, nh,
                  task * _CW, min(task * _CW + _CW, nc))

@numba.njit(cache=True, nogil=True)
def tile_off1(t, i0, j0, n, keys, idx, cnt, tau, G, u_o, sigma, delta, k, is16):  # pragma: no cover
    """:func:`tile_off` on the calling thread alone (see :func:`tile_diag1`)."""
    thrc, hits, hmask, nh = _off_setup(t, i0, j0, n, keys, cnt, tau, is16)
    _off_bands(t, i0, j0, n, keys, idx, cnt, tau, G, u_o, sigma, delta, k, is16, thrc, hits, hmask, nh,
               0, nh.shape[0])
    _off_cols(t, i0, j0, keys, idx, cnt, tau, G, u_o, sigma, delta, k, is16, hits, hmask, nh,
              0, thrc.shape[0])

@numba.njit(cache=True, nogil=True)
def _ctz32(x):  # pragma: no cover - compiled
    """Index of the single set bit of ``x`` (a power of two, uint32)."""
    r = 0
    if (x & np.uint32(0xFFFF)) == 0:
        r += 16
        x >>= np.uint32(16)
    if (x & np.uint32(0xFF)) == 0:
        r += 8
        x >>= np.uint32(8)
    if (x & np.uint32(0xF)) == 0:
        r += 4
        x >>= np.uint32(4)
    if (x & np.uint32(0x3)) == 0:
        r += 2
        x >>= np.uint32(2)
    if (x & np.uint32(0x1)) == 0:
        r += 1
    return r

# -----------------------------------------------------------------------
# exact distances and the certificate
# -----------------------------------------------------------------------
@numba.njit(cache=True, nogil=True, fastmath=_FM)
def _sqd(x, a, b):  # pragma: no cover - compiled
    """float64 ‖x[a] − x[b]‖² as a sum of squared differences."""
    s = 0.0
    for j in range(x.shape[1]):
        e = np.float64(x[a, j]) - np.float64(x[b, j])
        s += e * e
    return s

@numba.njit(cache=True, nogil=True, parallel=True)
def pair_sq(x, a, b, out):  # pragma: no cover - compiled
    """out[t] = ‖x[a[t]] − x[b[t]]‖² (float64, as in :func:`resolve`)."""
    for t in prange(a.shape[0]):
        out[t] = _sqd(x, a[t], b[t])

@numba.njit(cache=True, nogil=True)
def _low(kk, u_o, sigma, delta):  # pragma: no cover - compiled
    """Smallest possible (scaled) distance of a point with key ``kk`` (float32)."""
    r = np.float64(kk)
    sg = 1.0 if r > 0 else (-1.0 if r < 0 else 0.0)
    lo = r * (1.0 - u_o * sg) - sigma
    if lo < 0.0:
        lo = 0.0
    return np.sqrt(2.0 * lo) - delta

@numba.njit(cache=True, nogil=True)
def resolve_rows(x, rows, keys, idx, cnt, k, to_scaled, u_o, sigma, delta, out_sq, out_nb, ok, need,
                 i0, i1):  # pragma: no cover - compiled
    """Points ``i0 … i1 − 1`` of :func:`resolve` (serial)."""
    p = keys.shape[1]
    q = min(p, k)
    s = np.empty(p)
    nb = np.empty(p, dtype=np.int64)
    for i in range(i0, i1):
        c = cnt[i]
        a = rows[i]
        ev = min(q, c)
        for t in range(ev):
            # insertion by exact distance (stable: ties keep the key order)
            _insert_pair(s, nb, t, p, _sqd(x, a, rows[idx[i, t]]), idx[i, t])
        for t in range(ev, q):
            s[t] = np.inf
            nb[t] = 0
        kth = np.sqrt(s[k - 1] * to_scaled) if k <= q else np.inf
        m = 0
        for t in range(c):
            if _low(keys[i, t], u_o, sigma, delta) < kth:
                m += 1
            else:
                break  # keys ascend, so do their lower bounds
        need[i] = m
        good = np.isfinite(s[k - 1]) if k <= q else False
        if q == p:
            good = good and _low(keys[i, p - 1], u_o, sigma, delta) >= kth
        elif m > q:
            for t in range(q, m):
                _insert_pair(s, nb, t, p, _sqd(x, a, rows[idx[i, t]]), idx[i, t])
            new_kth = np.sqrt(s[k - 1] * to_scaled)
            good = np.isfinite(s[k - 1]) and (m < p or _low(keys[i, p - 1], u_o, sigma, delta) >= new_kth)
        ok[i] = good
        for t in range(k):
            out_sq[i, t] = s[t]
            out_nb[i, t] = nb[t]

@numba.njit(cache=True, nogil=True, parallel=True)
def resolve(x, rows, keys, idx, cnt, k, to_scaled, u_o, sigma, delta, out_sq, out_nb, ok, need):  # pragma: no cover
    """Exact distances of the candidates and the certificate (as ``_resolve``).

    ``keys``/``idx`` (u, p) are each point's sorted candidate list (``cnt`` valid
    entries, the others +inf); point ``i`` is row ``rows[i]`` of ``x``. The first
    ``q = min(p, k)`` candidates are evaluated exactly; then every further one
    whose lower bound does not exclude it (``need[i]`` = their number, counted
    among all ``p``). ``ok[i]``: every point not evaluated is provably no closer
    than the k-th exact neighbour. Writes ``out_sq`` (u, k) ascending and
    ``out_nb`` (u, k) (indices into the u points)."""
    u = keys.shape[0]
    nchunk = min(u, 256)
    for ch in prange(nchunk):
        resolve_rows(x, rows, keys, idx, cnt, k, to_scaled, u_o, sigma, delta, out_sq, out_nb, ok, need,
                     ch * u // nchunk, (ch + 1) * u // nchunk)
