"""Compiled CPU loops (numba) of the exact k-NN's passes over the points.

* :func:`row_hash` / :func:`group_runs`: the duplicate hash of the rows that a cheap
  hash of a few columns could not separate, and the exact grouping;
* :func:`sample_centre`, :func:`prep_bf16` / :func:`prep_fp32`: one pass over the
  distinct rows for the centred, scaled, rounded operands, the per-row sums that the
  key bound needs and the largest magnitude;
* :func:`resolve`: the exact float64 distances of the candidates and the
  certificate; :func:`pair_sq` the same exact distances for any pairs.

The bound arithmetic is float64 without fast-math (:mod:`._knn_bounds` gives the
proofs); only sums that are not part of a bound proof re-associate (the hash, the
centre, the squared norms and residuals, whose error bounds are far wider than any
summation order, and the exact distances, whose order is as arbitrary as any
vectorised sum's). Parallel loops run only with ``embgeom._numba.LOCK`` held.
"""
from __future__ import annotations

import numpy as np

from .._numba import numba as _numba

numba = _numba()
prange = numba.prange

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
def merge_list(g, bv, bi, nb, keys, idx, cnt, lim, tv, ti):  # pragma: no cover - compiled
    """Merge the candidates bv[:nb] (float32 keys, unsorted; bi their points) whose
    key is ≤ ``lim`` into g's ascending list ``keys[g, :cnt[g]]`` of at most p keys,
    the list's entries first among equal keys (as inserting them one by one after
    any equal key would), keeping the p smallest; ``tv``/``ti`` scratch of p.
    Returns the first position a candidate landed at (p when none did). One merge
    per row and tile replaces a shift of the list for every accepted key."""
    p = keys.shape[1]
    m = 0
    for e in range(nb):  # keep the keys under the limit, in place
        if bv[e] <= lim:
            bv[m] = bv[e]
            bi[m] = bi[e]
            m += 1
    if m == 0:
        return p
    if m <= 16:
        for e in range(1, m):  # stable insertion sort: bv[e] into the sorted bv[:e]
            _insert_pair(bv, bi, e, m, bv[e], bi[e])
    else:
        order = np.argsort(bv[:m], kind="mergesort")
        sv = bv[:m][order]
        si = bi[:m][order]
        bv[:m] = sv
        bi[:m] = si
    c = cnt[g]
    a = 0
    b = 0
    o = 0
    first = p
    while o < p and (a < c or b < m):
        if b >= m or (a < c and keys[g, a] <= bv[b]):
            tv[o] = keys[g, a]
            ti[o] = idx[g, a]
            a += 1
        else:
            tv[o] = bv[b]
            ti[o] = bi[b]
            b += 1
            first = o if o < first else first
        o += 1
    for e in range(o):
        keys[g, e] = tv[e]
        idx[g, e] = ti[e]
    cnt[g] = o
    return first

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
    """Exact distances of the candidates and the certificate.

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
