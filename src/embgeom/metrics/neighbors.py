"""Exact k-nearest-neighbour distances (Euclidean), fast and memory-bounded.

The intrinsic-dimension estimators need, for every point, the distances to its ``k``
nearest *other* points, exactly as a float64 brute force gives them. A float64
brute force costs ``2 n² d`` float64 flops plus an ``n × n`` partial sort; this
module returns the same numbers from float32 matrix products:

1. **Duplicates.** Exactly equal rows are grouped first (a hash proposes, a
   comparison confirms); the k-NN is computed on the distinct points and expanded
   (a copy's other copies are neighbours at distance 0). Self-matches are excluded
   by index, never by distance.
2. **Candidates (float32, blocked, symmetric).** The points are centred (distances
   do not change) and scaled by a power of two (exact). For blocks ``I ≤ J`` of
   ``block_size`` points one float32 product gives the tile of keys
   ``s_ij = (1 − c)(‖x_i‖² + ‖x_j‖²)/2 − x_i·x_j``; a tile serves the rows of ``I``
   and, transposed, the rows of ``J``, which halves the flops. With
   ``c = 2(2u + γ_{d+2} + 8u)``, ``u = 2⁻²⁴`` and ``γ_m = m u/(1 − m u)`` (the
   worst-case error of a float32 dot product of length ``m`` in any summation order),
   every key is a proven *lower* bound of ``‖x_i − x_j‖²/2``, and key + ``1.5 c (‖x_i‖²
   + ‖x_j‖²)/2`` an upper bound. Diagonal tiles go first: each point's ``p = k +
   margin`` smallest keys within its own block give an upper bound ``τ_i`` of its
   k-th neighbour's distance; in every other tile a strided group minimum screens
   the entries, only those with a key ≤ ``τ_i`` are looked at, and ``τ_i``
   tightens as candidates accumulate. A point skipped by the screen is provably
   farther than the k-th neighbour. Memory: one ``block_size²`` float32 tile plus
   ``n × p`` candidates; never an ``n × n`` matrix (unless ``n ≤ block_size``).
3. **Exact distances (float64).** The ``k`` candidates with the smallest keys (all
   ``p`` for rows that need them) are recomputed from the original float64
   coordinates as sums of squared differences, and sorted.
4. **Certificate.** A row is exact when the smallest key among the points not
   evaluated exactly is at least half its k-th exact squared distance (with the
   centring rounding accounted for). Rows that fail (near ties that float32 cannot
   separate, tight clusters far from the centre) are redone with float64 keys:
   every point whose float64 key is at most the k-th exact distance found so far is
   evaluated exactly, which is complete by construction.

The result is the float64 brute-force answer (sums of squared differences, then the
square root), whatever the data: exact duplicates, ties, clusters far from the
origin. Data with extreme magnitudes (coordinates beyond 2⁴⁰⁰ or all below 2⁻⁴⁰⁰)
are rescaled by a power of two so that squared distances do not overflow.

Everything is torch: on a CUDA tensor the whole computation runs on the GPU. Float32
products are forced to IEEE precision for the duration of the call (TF32/bf16
"fast fp32" modes are switched off and restored afterwards; if one cannot be
switched off, the bound ``c`` is widened to bf16 input rounding instead).
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from .._validate import as_float_matrix
from ..errors import EmbgeomError

__all__ = ["knn", "knn_distances"]

_GROUP = 16  # columns per group in the two-level top-p selection

_U32 = 2.0 ** -24
_U64 = 2.0 ** -53


def _gamma(m: int, u: float) -> float:
    return m * u / (1.0 - m * u)


# ---------------------------------------------------------------------------
# float32 matmul precision guard
# ---------------------------------------------------------------------------
@contextmanager
def _ieee_fp32_matmul():
    """Force IEEE float32 matrix products (no TF32 / bf16 shortcuts) inside the block."""
    restore = []
    for backend in ("mkldnn", "cuda"):
        mod = getattr(getattr(torch.backends, backend, None), "matmul", None)
        if mod is not None and hasattr(mod, "fp32_precision"):
            try:
                old = mod.fp32_precision
                if old not in ("ieee",):
                    mod.fp32_precision = "ieee"
                    restore.append((mod, "fp32_precision", old))
            except Exception:  # pragma: no cover - backend-specific
                pass
    cuda_mm = getattr(getattr(torch.backends, "cuda", None), "matmul", None)
    if cuda_mm is not None and not hasattr(cuda_mm, "fp32_precision"):  # older torch
        try:
            if cuda_mm.allow_tf32:
                cuda_mm.allow_tf32 = False
                restore.append((cuda_mm, "allow_tf32", True))
        except Exception:  # pragma: no cover
            pass
        try:
            old = torch.get_float32_matmul_precision()
            if old != "highest":
                torch.set_float32_matmul_precision("highest")
                restore.append((None, "legacy", old))
        except Exception:  # pragma: no cover
            pass
    try:
        yield
    finally:
        for mod, attr, old in reversed(restore):
            try:
                if mod is None:
                    torch.set_float32_matmul_precision(old)
                else:
                    setattr(mod, attr, old)
            except Exception:  # pragma: no cover
                pass


def _fp32_input_roundoff(device) -> float:
    """Rounding of the inputs of a float32 matmul here: 2⁻²⁴ (IEEE), or 2⁻⁸ if some
    reduced-precision mode (TF32, bf16) could not be switched off; products and sums
    stay in float32 in those modes, so the key bound only needs the wider input
    rounding."""
    g = torch.Generator(device="cpu").manual_seed(12345)
    a = torch.randn(64, 256, generator=g, dtype=torch.float64)
    b = torch.randn(256, 64, generator=g, dtype=torch.float64)
    exact = a @ b
    approx = (a.float().to(device) @ b.float().to(device)).double().cpu()
    bound = _gamma(258, _U32) * (a.abs() @ b.abs())
    if bool(((approx - exact).abs() <= 4 * bound).all()):
        return _U32
    return 2.0 ** -8  # pragma: no cover - only with an unswitchable TF32/bf16 mode


# ---------------------------------------------------------------------------
# candidate pass: blocked float32 keys, filtered top-p per row
# ---------------------------------------------------------------------------
class _Running:
    """The ``p`` smallest keys seen so far for every row, and a filter threshold.

    ``tau[i]`` is a proven upper bound of the (scaled) half squared distance from
    point ``i`` to its ``k``-th nearest neighbour, so any point whose key (a lower
    bound of its half squared distance) exceeds ``tau[i]`` can never be among the
    ``k`` nearest and is not even looked at. It comes from the diagonal tiles and
    tightens as candidates accumulate.
    """

    def __init__(self, n_pad, p, k, half_sq, c, slack, delta, dev):
        self.keys = torch.full((n_pad, p), math.inf, dtype=torch.float32, device=dev)
        self.idx = torch.zeros((n_pad, p), dtype=torch.int64, device=dev)
        self.tau = torch.full((n_pad,), math.inf, dtype=torch.float32, device=dev)
        self.p, self.k, self.half_sq, self.c = p, k, half_sq, c
        self.slack, self.delta = slack, delta

    def upper(self, keys, rows, cols):
        """Upper bound (float64) of the half squared distance, from a float32 key.

        A key is within ``c (‖x_i‖² + ‖x_j‖²)/4`` of ``(1 − c)(‖x_i‖² + ‖x_j‖²)/2 − x_i·x_j``,
        so the half squared distance is at most key + ``1.5 c (‖x_i‖² + ‖x_j‖²)/2``.
        """
        return keys.double() + 2.0 * self.c * (self.half_sq[rows][:, None] + self.half_sq[cols]) + self.slack

    def threshold(self, ub):
        """Filter threshold (float32, rounded up) from an upper bound of the k-th
        neighbour's half squared distance, widened by the centring error ``delta``."""
        t = (torch.sqrt(2.0 * ub) + 2.0 * self.delta) ** 2 * 0.5
        t32 = t.float()
        return torch.where(t32.double() < t, torch.nextafter(t32, torch.full_like(t32, math.inf)), t32)

    def tighten(self, rows):
        """tau = bound from the k-th smallest upper bound among the current candidates."""
        keys = self.keys[rows]
        ub = self.upper(keys, rows, self.idx[rows])
        ub[~torch.isfinite(keys)] = math.inf
        kth = torch.kthvalue(ub, self.k, dim=1).values
        self.tau[rows] = torch.minimum(self.tau[rows], self.threshold(kth))

    def add(self, rows, r, col, val):
        """Merge new entries (local row ``r`` into ``rows``, global ``col``, key ``val``),
        given sorted by ``r``, into the running top-p of those rows."""
        if r.numel() == 0:
            return
        dev = r.device
        counts = torch.bincount(r, minlength=rows.shape[0])
        touched = torch.nonzero(counts).squeeze(1)
        nt = touched.numel()
        m = int(counts.max())
        first = torch.cumsum(counts, 0) - counts
        slot = torch.cumsum(counts > 0, 0) - 1  # compact row number of each touched row
        flat = slot[r] * m + (torch.arange(r.numel(), device=dev) - first[r])
        pad_v = torch.full((nt * m,), math.inf, dtype=torch.float32, device=dev)
        pad_i = torch.zeros((nt * m,), dtype=torch.int64, device=dev)
        pad_v.index_copy_(0, flat, val)
        pad_i.index_copy_(0, flat, col)
        g = rows[touched]
        v = torch.cat([self.keys.index_select(0, g), pad_v.view(nt, m)], dim=1)
        i = torch.cat([self.idx.index_select(0, g), pad_i.view(nt, m)], dim=1)
        v, j = torch.topk(v, self.p, dim=1, largest=False, sorted=False)
        self.keys.index_copy_(0, g, v)
        self.idx.index_copy_(0, g, torch.gather(i, 1, j))
        self.tighten(g)


def _topp_rows(t: torch.Tensor, p: int):
    """The ``p`` smallest entries of each row of a tile: (values, column indices).

    Two levels when the row is long: the minimum of each of ``w = cols/_GROUP``
    strided groups of columns (``g + s·w``) is taken, the ``p`` groups with the
    smallest minima are kept, and the top ``p`` of their members is exact (each of the
    ``p`` smallest entries lies in a group whose minimum is at most the ``p``-th
    smallest value; with ties, an equally small entry takes its place).
    """
    rows, cols = t.shape
    if cols % _GROUP or cols < 4 * _GROUP * p:
        return torch.topk(t, p, dim=1, largest=False, sorted=False)
    w = cols // _GROUP
    mins = t.view(rows, _GROUP, w).amin(dim=1)
    _, g = torch.topk(mins, p, dim=1, largest=False, sorted=False)
    members = (g.unsqueeze(-1) + torch.arange(_GROUP, device=t.device) * w).view(rows, -1)
    v, j = torch.topk(torch.gather(t, 1, members), p, dim=1, largest=False, sorted=False)
    return v, torch.gather(members, 1, j)


def _filter(t, flat_t, stride, tau, along_rows: bool):
    """Entries of the tile ``t`` (a view of ``flat_t`` with row stride ``stride``) that
    pass the filter of their row (``along_rows``: ``t[r, c] ≤ tau[r]``) or of their
    column (``t[r, c] ≤ tau[c]``). Returns (owner, other, value), sorted by owner
    (the row, or the column), with ``other`` the column, or the row.

    A minimum over strided groups of ``_GROUP`` entries screens the tile first, so
    only the few groups that can hold a passing entry are read again.
    """
    rows, cols = t.shape
    dev = t.device
    size = cols if along_rows else rows
    if size % _GROUP == 0 and size >= 4 * _GROUP:
        w = size // _GROUP
        if along_rows:
            mins = t.view(rows, _GROUP, w).amin(dim=1)  # (rows, w): columns g + s*w
        else:
            mins = t.view(_GROUP, w, cols).amin(dim=0).T  # (cols, w): rows g + s*w
        og = torch.nonzero(mins <= tau[:, None])
        if og.numel() == 0:
            return None
        owner = og[:, 0:1]
        other = og[:, 1:2] + torch.arange(_GROUP, device=dev) * w  # (P, G)
    else:
        tt = t if along_rows else t.T
        oo = torch.nonzero(tt <= tau[:, None])
        if oo.numel() == 0:
            return None
        owner, other = oo[:, 0:1], oo[:, 1:2]
    flat = owner * stride + other if along_rows else other * stride + owner
    v = flat_t.index_select(0, flat.reshape(-1)).view(flat.shape)
    lim = tau.index_select(0, owner.reshape(-1)).view(-1, 1)
    keep = torch.nonzero((v <= lim).reshape(-1)).squeeze(1)
    owner = owner.expand(flat.shape).reshape(-1).index_select(0, keep)
    other = other.expand(flat.shape).reshape(-1).index_select(0, keep)
    return owner, other, v.reshape(-1).index_select(0, keep)


def _candidates(Xf, half, n, p, k, half_sq, c, slack, delta, block):
    """All-pairs candidate pass over the padded float32 matrix ``Xf`` (n_pad rows).

    ``half`` (n_pad,) float32 holds ``(1 − c)‖x‖²/2`` (``+inf`` for padding rows), so
    the key ``half_i + half_j − x_i·x_j`` is a lower bound of ``‖x_i − x_j‖²/2``.
    Each tile of ``block × block`` keys is symmetric and serves both its row block
    and its column block. Returns keys (n, p) float32 and indices (n, p) int64: the
    ``p`` smallest keys among the points that pass the filter (see :class:`_Running`).
    """
    n_pad = Xf.shape[0]
    dev = Xf.device
    run = _Running(n_pad, p, k, half_sq, c, slack, delta, dev)
    run.tau[n:] = -math.inf  # padding rows take no candidates
    buf = torch.empty((min(block, n_pad), min(block, n_pad)), dtype=torch.float32, device=dev)
    flat_buf, stride = buf.view(-1), buf.shape[1]
    starts = list(range(0, n_pad, block))

    def tile(i0, i1, j0, j1):
        t = buf[: i1 - i0, : j1 - j0]
        torch.add(half[i0:i1, None], half[None, j0:j1], out=t)
        t.addmm_(Xf[i0:i1], Xf[j0:j1].T, alpha=-1.0)
        return t

    # Diagonal tiles first: the exact top-p of each row within its own block seeds the
    # candidates and the filter thresholds, so that the other tiles pass few entries.
    for i0 in starts:
        i1 = min(i0 + block, n_pad)
        t = tile(i0, i1, i0, i1)
        t.fill_diagonal_(math.inf)
        v, c_ = _topp_rows(t, min(p, i1 - i0))
        run.keys[i0:i1, : v.shape[1]] = v
        run.idx[i0:i1, : v.shape[1]] = c_ + i0
        run.tighten(torch.arange(i0, i1, device=dev))
    for a, i0 in enumerate(starts):
        i1 = min(i0 + block, n_pad)
        rows_i = torch.arange(i0, i1, device=dev)
        for j0 in starts[a + 1 :]:
            j1 = min(j0 + block, n_pad)
            t = tile(i0, i1, j0, j1)
            got = _filter(t, flat_buf, stride, run.tau[i0:i1], True)
            if got is not None:
                r, cc, v = got
                run.add(rows_i, r, cc + j0, v)
            got = _filter(t, flat_buf, stride, run.tau[j0:j1], False)
            if got is not None:
                cc, r, v = got
                run.add(torch.arange(j0, j1, device=dev), cc, r + i0, v)
    return run.keys[:n], run.idx[:n]


def _exact_sq(X64: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, chunk_elems: int = 1 << 19):
    """Exact float64 squared distances ``‖x[rows[r]] − x[cols[r, j]]‖²`` by differences
    (in cache-sized chunks, into a reused buffer)."""
    m, q = cols.shape
    d = X64.shape[1]
    out = torch.empty((m, q), dtype=torch.float64, device=X64.device)
    if m == 0 or q == 0:
        return out
    step = max(1, chunk_elems // max(1, q * d))
    buf = torch.empty((min(step, m) * q, d), dtype=torch.float64, device=X64.device)
    for s in range(0, m, step):
        e = min(s + step, m)
        g = buf[: (e - s) * q]
        torch.index_select(X64, 0, cols[s:e].reshape(-1), out=g)
        g3 = g.view(e - s, q, d)
        g3.sub_(X64[rows[s:e]].unsqueeze(1))
        g3.mul_(g3)
        torch.sum(g3, dim=2, out=out[s:e])
    return out


def _exact_sq_pairs(X64: torch.Tensor, a: torch.Tensor, b: torch.Tensor, chunk_elems: int = 1 << 19):
    """Exact float64 squared distances of the pairs ``(a[t], b[t])`` by differences."""
    return _exact_sq(X64, a, b[:, None], chunk_elems)[:, 0]


def _resolve(X64, keys, idx, k, to_scaled, slack, delta):
    """Exact distances of the candidates, and the certificate.

    ``keys``/``idx`` (n, p): candidate keys (any order) of every point; a key is a lower
    bound of ``‖xs_i − xs_j‖²/2`` in the centred, scaled coordinates ``xs``, which differ
    from the exact ones by at most ``delta`` in distance. Returns (sq (n, k) float64
    ascending, nb (n, k) int64, ok (n,) bool): a row is certified when every point not
    evaluated exactly is provably no closer than its k-th exact neighbour.
    """
    n, p = keys.shape
    dev = X64.device
    order = torch.argsort(keys, dim=1)
    keys = torch.gather(keys, 1, order).double()
    idx = torch.gather(idx, 1, order)
    rows = torch.arange(n, device=dev)
    out_sq = torch.empty((n, k), dtype=torch.float64, device=dev)
    out_nb = torch.empty((n, k), dtype=torch.int64, device=dev)
    ok = torch.empty(n, dtype=torch.bool, device=dev)

    def take(sel, sqs, nbs, bound_key):
        s, j = torch.sort(sqs, dim=1, stable=True)
        s, j = s[:, :k], j[:, :k]
        out_sq[sel] = s
        out_nb[sel] = torch.gather(nbs, 1, j)
        # smallest possible distance (scaled) of any point not evaluated exactly
        lower = torch.sqrt(2.0 * (bound_key - slack).clamp_min(0.0)) - delta
        ok[sel] = (lower >= torch.sqrt(s[:, -1] * to_scaled)) & torch.isfinite(s[:, -1])

    # Points that never passed the filter are provably farther than the k-th neighbour.
    # Among the others, the (q+1)-th smallest candidate key bounds every point not
    # evaluated exactly: candidates beyond q, and points pushed out of the p kept ones
    # (their keys are ≥ the p-th kept key). Empty slots (key +inf) are no points.
    def exact(sel, cols, ks):
        sq = _exact_sq(X64, sel, cols)
        return sq.masked_fill_(torch.isinf(ks), math.inf)

    q = min(p, k)
    take(rows, exact(rows, idx[:, :q], keys[:, :q]), idx[:, :q], keys[:, min(q, p - 1)])
    if q < p:
        bad = torch.nonzero(~ok).squeeze(1)
        if bad.numel():
            take(bad, exact(bad, idx[bad], keys[bad]), idx[bad], keys[bad, p - 1])
    return out_sq, out_nb, ok


def _threshold_rows(X64, Xs, half64, rows, tau, k, block):
    """Exact k-NN of the points ``rows`` by collecting *every* point whose float64 key is
    at most ``tau`` (a key is a lower bound of the scaled half squared distance, and
    ``tau`` an upper bound of the k-th neighbour's), then evaluating those exactly."""
    m = rows.shape[0]
    n = Xs.shape[0]
    dev = X64.device
    out_sq = torch.empty((m, k), dtype=torch.float64, device=dev)
    out_nb = torch.empty((m, k), dtype=torch.int64, device=dev)
    rb = max(1, min(256, m))
    for i0 in range(0, m, rb):
        i1 = min(i0 + rb, m)
        ri = rows[i0:i1]
        pr, pc = [], []
        for j0 in range(0, n, block):
            j1 = min(j0 + block, n)
            t = half64[ri, None] + half64[None, j0:j1]
            t.addmm_(Xs[ri], Xs[j0:j1].T, alpha=-1.0)
            inside = (ri >= j0) & (ri < j1)
            if bool(inside.any()):
                r = torch.nonzero(inside).squeeze(1)
                t[r, ri[r] - j0] = math.inf
            nz = torch.nonzero(t <= tau[i0:i1, None])
            pr.append(nz[:, 0])
            pc.append(nz[:, 1] + j0)
        pr = torch.cat(pr)
        pc = torch.cat(pc)
        s = _exact_sq_pairs(X64, ri[pr], pc)
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


def _knn_core(X64: torch.Tensor, k: int, block: int, margin: int, abs_max: float):
    """Exact k-NN (squared distances, indices) of the rows of ``X64``, ``n ≥ k + 1``;
    ``abs_max`` is an upper bound of ``max |X64|``."""
    n, d = X64.shape
    dev = X64.device
    p = min(k + margin, n - 1)
    # Centre, then scale by a power of two so that every coordinate is below 1 in
    # magnitude (neither changes the neighbours; the scaling is exact).
    mean = X64.mean(dim=0)
    amax = (abs_max + float(mean.abs().max())) * (1 + 1e-12)
    if amax == 0.0:  # all points are the origin
        nb = (torch.arange(n, device=dev)[:, None] + torch.arange(1, k + 1, device=dev)[None, :]) % n
        return torch.zeros((n, k), dtype=torch.float64, device=dev), nb
    e = math.frexp(amax)[1]
    Xs = torch.sub(X64, mean).mul_(2.0 ** -e)
    to_scaled = 2.0 ** (-2 * e)  # scaled squared distance = to_scaled × true squared distance
    sq_norm = (Xs * Xs).sum(dim=1)
    # |‖xs_i − xs_j‖ − ‖x_i − x_j‖·2⁻ᵉ| ≤ delta: rounding of the centring
    delta = 2.1 * math.sqrt(d) * _U64

    with _ieee_fp32_matmul():
        u_in = _fp32_input_roundoff(dev)
        c32 = 2.0 * (2.0 * u_in + u_in * u_in + _gamma(d + 2, _U32) + 8 * _U32)
        slack32 = (d + 8) * 2.0 ** -120  # float32 underflow
        n_pad = -(-n // _GROUP) * _GROUP
        Xf = torch.empty((n_pad, d), dtype=torch.float32, device=dev)
        Xf[:n] = Xs
        Xf[n:] = 0.0
        half = torch.full((n_pad,), math.inf, dtype=torch.float32, device=dev)
        half[:n] = ((1.0 - c32) * 0.5 * sq_norm).to(torch.float32)
        sqp = torch.zeros(n_pad, dtype=torch.float64, device=dev)
        sqp[:n] = 0.5 * sq_norm
        keys, idx = _candidates(Xf, half, n, p, k, sqp, c32, slack32, delta, block)
        del Xf, half

    out_sq, out_nb, ok = _resolve(X64, keys, idx, k, to_scaled, slack32, delta)
    bad = torch.nonzero(~ok).squeeze(1)
    if bad.numel():
        c64 = 2.0 * (_gamma(d + 2, _U64) + 8 * _U64)
        half64 = (1.0 - c64) * 0.5 * sq_norm
        tau = (torch.sqrt(out_sq[bad, -1] * to_scaled) + delta) ** 2 * (0.5 * (1 + 1e-12)) + 2.0 ** -1000
        sq2, nb2 = _threshold_rows(X64, Xs, half64, bad, tau, k, block)
        out_sq[bad] = sq2
        out_nb[bad] = nb2
    return out_sq, out_nb


def _dedupe(X64: torch.Tensor, name: str = "X"):
    """Groups of exactly equal rows: None when all rows differ, else (representative
    rows (u,), group of each row (n,)).

    A float64 hash (a fixed random projection) proposes groups and every row of a
    proposed group is compared with the group's first row, so the grouping is exact:
    a row that merely shares a hash value stays on its own. (Equal rows whose hash
    happened to differ in the last bit are merely not grouped; the k-NN is exact
    either way, grouping only makes many duplicates cheap.) Also rejects NaN/inf."""
    n, d = X64.shape
    dev = X64.device
    g = torch.Generator(device="cpu").manual_seed(0x5EED)
    r = (torch.rand(d, generator=g, dtype=torch.float64) + 0.5).to(dev)
    h = X64 @ r
    # NaN or ±inf anywhere makes the projection non-finite (the weights are > 0)
    if not bool(torch.isfinite(h).all()) and not bool(torch.isfinite(X64).all()):
        raise EmbgeomError(f"{name} contains NaN or infinite values; remove or fix those rows first")
    _, inv, counts = torch.unique(h, return_inverse=True, return_counts=True)
    if counts.numel() == n:
        return None
    first = torch.full((counts.numel(),), n, dtype=torch.int64, device=dev)
    first.scatter_reduce_(0, inv, torch.arange(n, device=dev), reduce="amin")
    rep = first[inv]
    multi = torch.nonzero(counts[inv] > 1).squeeze(1)
    same = (X64[multi] == X64[rep[multi]]).all(dim=1)
    rep[multi[~same]] = multi[~same]
    reps, group = torch.unique(rep, return_inverse=True)
    if reps.numel() == n:
        return None
    return reps, group


def _expand(sq_u, nb_u, group, counts, k):
    """k-NN of a multiset from the k-NN of its distinct points.

    A copy of point u has its other ``m_u − 1`` copies at distance 0, then the copies
    of u's distinct neighbours in order, each repeated by its multiplicity."""
    n = group.shape[0]
    dev = group.device
    ku = sq_u.shape[1]
    order = torch.argsort(group, stable=True)  # copies of each group, by original index
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.int64, device=dev)
    rank[order] = torch.arange(n, device=dev) - starts[group[order]]
    m = counts[group]  # (n,)
    t = torch.arange(k, device=dev)[None, :].expand(n, k)
    zero = t < (m - 1)[:, None]
    # zero-distance part: the c-th other copy of the same group (skipping itself)
    c = t + (t >= rank[:, None]).long()
    c = torch.minimum(c, (m - 1)[:, None])
    same_idx = order[(starts[group][:, None] + c).clamp_max(n - 1)]
    # the rest: walk the distinct neighbours of the group, each repeated m_v times
    mv = counts[nb_u]  # (u, ku)
    cum = torch.cumsum(mv, 1)  # (u, ku)
    tt = (t - (m - 1)[:, None]).clamp_min(0)  # (n, k)
    cum_n = cum[group]  # (n, ku)
    j = torch.searchsorted(cum_n, tt, right=True).clamp_max(ku - 1)
    prev = torch.where(j > 0, torch.gather(cum_n, 1, (j - 1).clamp_min(0)), torch.zeros_like(j))
    v = torch.gather(nb_u[group], 1, j)
    other_idx = order[(starts[v] + (tt - prev)).clamp_max(n - 1)]
    dist = torch.where(zero, torch.zeros((), dtype=sq_u.dtype, device=dev), torch.gather(sq_u[group], 1, j))
    idx = torch.where(zero, same_idx, other_idx)
    return dist, idx


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------
def _check_k(k, n: int) -> int:
    if isinstance(k, bool) or isinstance(k, float) or not hasattr(k, "__index__"):
        raise EmbgeomError(f"k must be a positive integer, got {k!r}")
    k = int(k.__index__())
    if k < 1:
        raise EmbgeomError(f"k must be a positive integer, got {k}")
    if n < k + 1:
        raise EmbgeomError(
            f"k = {k} nearest neighbours need at least {k + 1} points, but X has {n}; "
            f"give more points or a smaller k"
        )
    return k


def knn(X, k: int, *, block_size: int = 2048, margin: int = 8, name: str = "X"):
    """Exact Euclidean ``k``-nearest-neighbour distances and indices of every point.

    Parameters
    ----------
    X : (n, d) numpy array or torch tensor, any real dtype; CPU or CUDA.
    k : number of neighbours, ``1 ≤ k ≤ n − 1``. The point itself is never its own
        neighbour (excluded by index); exact duplicates are neighbours at distance 0.
    block_size : rows (and columns) per float32 tile. Memory: one ``block_size²``
        float32 tile (plus screening buffers of a fraction of it), ``n · (k + margin)
        · 12`` bytes of candidates, and copies of X (two float64, one float32).
    margin : extra float32 candidates per point beyond ``k``; only speed depends on it,
        the result is exact in any case (see the module docstring).

    Returns
    -------
    (distances, indices): torch tensors of shape (n, k) on ``X``'s device,
    float64 distances in ascending order per row and int64 indices of the
    neighbours. Among exactly tied distances the order of indices is arbitrary.
    """
    X = as_float_matrix(X, name=name)
    n, d = X.shape
    k = _check_k(k, n)
    if not isinstance(block_size, int) or block_size < _GROUP:
        raise EmbgeomError(f"block_size must be an integer ≥ {_GROUP}, got {block_size!r}")
    if not isinstance(margin, int) or margin < 0:
        raise EmbgeomError(f"margin must be a non-negative integer, got {margin!r}")
    X64 = X.to(torch.float64)
    block = max(_GROUP, (block_size // _GROUP) * _GROUP)
    groups = _dedupe(X64, name)
    # Squared distances must neither overflow nor underflow in float64: rescale
    # extreme data by a power of two (exact) and undo it on the distances.
    e0 = 0
    lo, hi = torch.aminmax(X64)
    amax = max(abs(float(lo)), abs(float(hi)))
    if amax > 2.0 ** 400 or 0.0 < amax < 2.0 ** -400:
        e0 = math.frexp(amax)[1]
        X64 = X64 * (2.0 ** (-e0 // 2)) * (2.0 ** (-e0 - (-e0 // 2)))
        amax = amax * (2.0 ** (-e0 // 2)) * (2.0 ** (-e0 - (-e0 // 2)))
    if groups is None:
        sq, nb = _knn_core(X64, k, block, margin, amax)
    else:
        reps, group = groups
        nu = reps.shape[0]
        counts = torch.bincount(group, minlength=nu)
        ku = min(k, nu - 1)
        if ku == 0:  # every point is the same
            sq_u = torch.zeros((1, 1), dtype=torch.float64, device=X64.device)
            nb_u = torch.zeros((1, 1), dtype=torch.int64, device=X64.device)
        else:
            sq_u, nb_u = _knn_core(X64[reps], ku, block, margin, amax)
        sq, nb = _expand(sq_u, nb_u, group, counts, k)
    dist = sq.sqrt_()
    if e0:
        dist.mul_(2.0 ** (e0 // 2)).mul_(2.0 ** (e0 - e0 // 2))
    return dist, nb


def knn_distances(X, k: int, *, block_size: int = 2048, margin: int = 8, name: str = "X") -> torch.Tensor:
    """Exact distances to the ``k`` nearest other points: (n, k) float64 torch tensor,
    ascending per row, on ``X``'s device. See :func:`knn`."""
    return knn(X, k, block_size=block_size, margin=margin, name=name)[0]
