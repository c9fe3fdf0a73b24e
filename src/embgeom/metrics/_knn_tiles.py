"""Compiled CPU loops (numba) of the exact k-NN's candidate scan: one read of each
tile of keys, keeping every row's (and column's) ``p`` smallest keys in a sorted
list whose screening threshold tightens as candidates are merged in (a row's
candidates of a tile at once, a column's whenever its buffer fills and at the end:
one sort and merge per batch instead of a shift of the list per key).

Keys of a bfloat16 (float32) tile are read as int16 (int32) bit patterns: for a
threshold ``T ≥ 0`` a key is ``≤ T`` exactly when its bits, read as a signed
integer, are ``≤`` the bits of ``T`` rounded up, so the screen is an integer
comparison (a negative threshold is raised to +0 for the screen only, which merely
lets more keys through to the exact float comparison). Threshold arithmetic: that
of :class:`._knn_bounds.Bounds`, float64 without fast-math."""
from __future__ import annotations

import numpy as np

from ._knn_points import _insert_pair, merge_list, numba

prange = numba.prange
_I32 = np.int32


# running top-p lists (no fast-math: the bound arithmetic of Bounds)
@numba.njit(cache=True, nogil=True)
def _key_threshold(ub, delta, sigma, u_o):  # pragma: no cover - compiled
    """The screening threshold from an upper bound ``ub`` (float64) of the k-th
    neighbour's half squared distance: ``ub`` is widened by the centring error
    (``t = (√(2 ub) + 2δ)²/2``: a point beyond it is farther, on the original data,
    than that neighbour), then turned into the smallest float32 ``T`` such that
    every key ``r`` with ``lower(r) = r − u_o|r| − σ ≤ t`` has ``r ≤ T`` (the two
    float64 roundings covered by the ``2⁻⁴⁰`` and ``2⁻¹⁰⁰⁰`` terms)."""
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
def _tighten(g, keys, idx, cnt, tau, G, u_o, sigma, delta, k, scratch):  # pragma: no cover - compiled
    """tau[g] = min(tau[g], threshold of the k-th smallest upper bound among g's
    current candidates (upper bounds as in ``Bounds.upper``)."""
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
    # at least 4(p + 1) groups, so that a screen near the p-th key leaves most out
    gs = max(1, min(_GS, nc // (4 * (p + 1))))
    S = nc // gs
    rem = S * gs
    gm = np.empty(max(S, 1), dtype=t.dtype)
    mk = np.empty(nc, dtype=np.uint32)
    bv, bi = np.empty(nc, dtype=np.float32), np.empty(nc, dtype=np.int64)  # a row's candidates
    tv, ti = np.empty(p, dtype=np.float32), np.empty(p, dtype=np.int64)
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
            _group_mins(row, gm, S, gs)
            z = 0
            if _count_le(gm, S, thr) > 0:
                for q in range(S):
                    if _I32(gm[q]) <= thr:
                        for m in range(gs):
                            c = q + m * S
                            bv[z] = _as_key(row[c], is16)
                            bi[z] = j0 + c
                            z += _I32(row[c]) <= thr
            for c in range(rem, nc):
                if _I32(row[c]) <= thr:
                    bv[z] = _as_key(row[c], is16)
                    bi[z] = j0 + c
                    z += 1
            if z:
                _merge(g, bv, bi, z, keys, idx, cnt, tau, G, u_o, sigma, delta, k, tv, ti)
        h = 0
        for c in range(nc):
            hits[b, h] = c
            hmask[b, h] = mk[c]
            h += mk[c] != 0
        nh[b] = h

@numba.njit(cache=True, nogil=True)
def _off_cols(t, i0, j0, keys, idx, cnt, tau, G, u_o, sigma, delta, k, is16, hits, hmask, nh,
              c0, c1):  # pragma: no cover - compiled
    """Columns ``c0 … c1 − 1`` of the columns' side of :func:`tile_off` (serial): the
    marked rows, band by band, collected per column and merged into its list when
    the column's buffer fills and at the end."""
    p = keys.shape[1]
    cap = max(16, 2 * p)
    thr2 = np.empty(c1 - c0, dtype=np.int32)
    for c in range(c0, c1):
        thr2[c - c0] = _screen_bits(j0 + c, keys, cnt, tau, p, is16)
    bv = np.empty((c1 - c0, cap), dtype=np.float32)
    bi = np.empty((c1 - c0, cap), dtype=np.int64)
    z = np.zeros(c1 - c0, dtype=np.int64)
    tv, ti = np.empty(p, dtype=np.float32), np.empty(p, dtype=np.int64)
    for b in range(nh.shape[0]):
        hb = hits[b]
        lo = 0
        hi = nh[b]
        while lo < hi:  # the hits of a band ascend by column: find this range's start
            mid = (lo + hi) // 2
            if hb[mid] < c0:
                lo = mid + 1
            else:
                hi = mid
        for e in range(lo, nh[b]):
            c = hb[e]
            if c >= c1:
                break
            cc = c - c0
            mask = np.uint32(hmask[b, e])
            while mask != 0:
                low = np.uint32(mask & np.uint32(np.uint32(~mask) + np.uint32(1)))
                r = b * _GS + _ctz32(low)
                mask = np.uint32(mask ^ low)
                if _I32(t[r, c]) <= thr2[cc]:
                    q = z[cc]
                    bv[cc, q] = _as_key(t[r, c], is16)
                    bi[cc, q] = i0 + r
                    z[cc] = q + 1
                    if q + 1 == cap:  # full: merge now, and screen with the tighter list
                        _merge(j0 + c, bv[cc], bi[cc], cap, keys, idx, cnt, tau, G, u_o, sigma, delta, k, tv, ti)
                        z[cc] = 0
                        thr2[cc] = _screen_bits(j0 + c, keys, cnt, tau, p, is16)
    for cc in range(c1 - c0):
        if z[cc]:
            _merge(j0 + c0 + cc, bv[cc], bi[cc], z[cc], keys, idx, cnt, tau, G, u_o, sigma, delta, k, tv, ti)

@numba.njit(cache=True, nogil=True)
def _merge(g, bv, bi, z, keys, idx, cnt, tau, G, u_o, sigma, delta, k, tv, ti):  # pragma: no cover
    """Candidates bv[:z] (points bi) into g's list, then its threshold if the first k changed."""
    if merge_list(g, bv, bi, z, keys, idx, cnt, tau[g], tv, ti) < k:
        _tighten_first(g, keys, idx, cnt, tau, G, u_o, sigma, delta, k)  # only the first k make the bound

@numba.njit(cache=True, nogil=True, parallel=True)
def tile_off(t, i0, j0, n, keys, idx, cnt, tau, G, u_o, sigma, delta, k, is16):  # pragma: no cover
    """An off-diagonal tile ``t`` (bits of the keys of points ``i0 + r`` against
    ``j0 + c``): merge every key that passes its row's screen into the row's list,
    and every key that passes its column's screen into the column's list.

    One read of the tile, in bands of ``_GS`` rows (a task per run of bands): per
    row the minima of strided groups of columns (``q + m·S``, at least 4(p + 1)
    groups; only the groups whose minimum passes the row's screen are read again,
    and their passing keys merged into the row's list at once), and per column a bit
    mask of the band's rows whose key passes the column's screen as it was when
    the tile started (screens only tighten, so that is a superset). The marked
    entries are then collected by column tasks and merged into the columns'
    lists. Rows and columns ≥ ``n`` (padding) are skipped."""
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

