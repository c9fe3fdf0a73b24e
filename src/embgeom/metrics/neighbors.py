"""Exact k-nearest-neighbour distances (Euclidean), fast and memory-bounded.

The intrinsic-dimension estimators need, for every point, the distances to its ``k``
nearest *other* points, exactly as a float64 brute force gives them. A float64
brute force costs ``2 n² d`` float64 flops plus an ``n × n`` partial sort; this
module returns the same numbers from low-precision matrix products that only *propose*
candidates, with a proven error bound deciding what must be checked in float64:

1. **Duplicates.** Exactly equal rows are grouped first (a hash proposes, a
   comparison confirms); the k-NN is computed on the distinct points and expanded
   (a copy's other copies are neighbours at distance 0). Self-matches are excluded
   by index, never by distance.
2. **Candidates (bfloat16 or float32, blocked, symmetric).** The points are centred
   (distances do not change; it shrinks the norms, to which the error bound is
   proportional). For blocks ``I ≤ J`` of ``block_size`` points one matrix product
   gives the tile of *keys* ``r_ij ≈ D_ij = ‖x_i − x_j‖²/2``; a tile serves the rows of
   ``I`` and, transposed, the rows of ``J``, which halves the flops. Every key comes
   with a proven interval ``lower(r) ≤ D_ij ≤ upper(r)`` (:class:`_Bounds`):

   * **bfloat16** (default on CPUs whose bf16 products pass a check: AMX / AVX512-BF16
     run them 2–4× faster than float32): rows ``[a_i, H_i, L_i, 1, 1]`` times columns
     ``[−a_j, 1, 1, H_j, L_j]``, ``a = bf16(x)``, ``H + L`` a lowered half norm, so the
     bf16 output rounding is relative to the key. The bound, derived in
     :func:`_bf16_operands`, uses the bf16 unit roundoff ``u = 2⁻⁸`` (8 significant
     bits) through the *measured* residual norms ``‖x − a‖`` (Cauchy–Schwarz), float32
     accumulation inside the matmul (``γ_{d+4}``), and the output rounding; its width
     is about ``0.35 %`` of ``‖x_i‖² + ‖x_j‖²`` on real hidden states.
   * **float32** (CUDA, or where the bf16 check fails; :func:`_fp32_operands`): keys
     ``(1 − c)(n_i + n_j)/2 − x_i·x_j`` with ``c = 2(2u + γ_{d+2} + …)``, ``u = 2⁻²⁴``.

   Diagonal tiles go first: each point's ``p = k + margin`` smallest keys within its
   own block give an upper bound ``τ_i`` of its k-th neighbour's distance; in every
   other tile a strided group minimum screens the entries, only those whose lower
   bound is ≤ ``τ_i`` are looked at, and ``τ_i`` tightens as candidates accumulate. A
   point skipped by the screen is provably farther than the k-th neighbour. Memory:
   one ``block_size²`` tile (on the compiled path's two lanes, two tiles of at most
   ``1024²``) plus ``n × p`` candidates and the two bf16 operands (or
   one float32 copy); never an ``n × n`` matrix, and no n × d float64 temporary (the
   centring, rounding and the fallback's keys work on chunks of rows; the screen
   expands the groups that pass a slice at a time).
3. **Exact distances (float64).** The ``k`` candidates with the smallest keys are
   recomputed from the original float64 coordinates as sums of squared differences;
   then, per row, every further kept candidate whose lower bound does not exclude it.
4. **Certificate.** A row is exact when every point not evaluated exactly is provably
   no closer than its k-th exact neighbour (with the centring rounding accounted
   for). Rows that fail (near ties the keys cannot separate, tight clusters far from
   the centre, more than ``p`` candidates within the bound) are redone with float64
   keys: every point whose float64 key is at most the k-th exact distance found so
   far is evaluated exactly, which is complete by construction.

The result is the float64 brute-force answer (sums of squared differences, then the
square root), whatever the data: exact duplicates, ties, clusters far from the
origin. Data with extreme magnitudes (coordinates beyond 2⁴⁰⁰ or all below 2⁻⁴⁰⁰)
are rescaled by a power of two so that squared distances do not overflow.

On the CPU, with numba available (``embgeom.stats._kernels.use_kernels``), the steps
around the matrix products are compiled loops (:mod:`._neighbor_kernels`): a hash of a
few columns proposes duplicates (the full hash and a comparison decide among the rows
it cannot separate); one pass over the distinct rows centres them (on the mean of a
sample of them: any centre keeps the distances), rounds them to the operands and
finds the largest magnitude and any NaN/inf; each tile is read once, every row's (and
column's) candidates kept in a sorted list whose threshold tightens at once (on two
threads, two lanes each compute a tile's product and scan it, one core each, and the
scans of tiles that share no points overlap); the exact distances and the certificate are one loop per row. float32 input is read as it is
(its exact distances are those of its float64 values; no float64 copy). The bounds
and the certificate are the same; only speed differs. Elsewhere (CUDA, or without
numba) everything is torch: on a CUDA tensor the whole computation runs on the GPU, with
float32 candidates by default (``precision="bf16"`` opts in to bf16 there, subject to
the same check). Float32 products are forced to IEEE precision for the duration of the
call (TF32/bf16 "fast fp32" modes are switched off and restored afterwards; if one
cannot be switched off, the bound ``c`` is widened to bf16 input rounding instead).
"""
from __future__ import annotations

import math
import os
import queue
import threading
from contextlib import contextmanager

import numpy as np
import torch

from .._validate import as_float_matrix
from ..errors import EmbgeomError
from ..stats import _kernels

# The compiled loops (._neighbor_kernels), imported by the first compiled call:
# importing numba costs about a second per process.
_nk = None

# From this many points on, a kNN alone repays loading the compiled loops (in the
# default "auto" mode of embgeom.stats._kernels): ID estimation on thousands of sampled
# positions calls it once per layer.
COMPILED_MIN_POINTS = 4096


def _compiled_loops():
    global _nk
    if _nk is None:
        from . import _neighbor_kernels as module

        _nk = module
    return _nk

__all__ = ["knn", "knn_distances"]

_GROUP = 16  # columns per group in the two-level top-p selection
_FILTER_ELEMS = 1 << 17  # tile entries re-read per slice in _filter (bounds its index arrays)

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
# key bounds
# ---------------------------------------------------------------------------
class _Bounds:
    """What a candidate key ``r`` proves about the (scaled, centred) half squared
    distance ``D_ij = ‖x_i − x_j‖²/2``:

        r − u_o|r| − σ  ≤  D_ij  ≤  r + u_o|r| + σ + G_i + G_j.

    ``u_o`` is the relative rounding of the stored key (bf16 output; 0 for float32),
    ``σ`` an absolute slack for underflow, ``G`` (n_pad,) float64 a per-point widening.
    See :func:`_bf16_operands` and :func:`_fp32_operands` for the derivations.
    """

    def __init__(self, u_o: float, sigma: float, G: torch.Tensor):
        self.u_o, self.sigma, self.G = u_o, sigma, G

    def lower(self, r: torch.Tensor) -> torch.Tensor:
        r = r.double()  # r (1 − u_o sign r) = r − u_o|r|, and +inf stays +inf
        return r * (1.0 - self.u_o * torch.sign(r)) - self.sigma

    def upper(self, r: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        r = r.double()
        return r * (1.0 + self.u_o * torch.sign(r)) + self.sigma + self.G[rows][:, None] + self.G[cols]

    def key_threshold(self, t: torch.Tensor) -> torch.Tensor:
        """Smallest float32 value ``T`` such that every key ``r`` with ``lower(r) ≤ t``
        has ``r ≤ T`` (``t`` float64)."""
        t = t + self.sigma
        x = torch.where(t >= 0, t / (1.0 - self.u_o), t / (1.0 + self.u_o))
        x = x + x.abs() * 2.0 ** -40 + 2.0 ** -1000  # fp64 rounding of the two lines above
        x32 = x.float()
        return torch.where(x32.double() < x, torch.nextafter(x32, torch.full_like(x32, math.inf)), x32)


def _round_up_to(t32: torch.Tensor, dtype) -> torch.Tensor:
    """``t32`` in ``dtype``, rounded up (so that ``r ≤ t32`` implies ``r ≤ result``)."""
    if dtype == torch.float32:
        return t32
    t = t32.to(dtype)
    return torch.where(t.float() < t32, torch.nextafter(t, torch.full_like(t, math.inf)), t)


def _fp32_operands(x32, nhat, eps_n, n_pad, d, dev):
    """float32 keys ``(1 − c) n̂_i/2 + (1 − c) n̂_j/2 − x_i·x_j``: one ``addmm`` per tile.

    ``x32`` (n_pad, d) is the float32 rounding of the centred coordinates ``x`` (zero
    padding rows), ``n̂`` their squared norms with ``|n̂ − ‖x‖²| ≤ eps_n n̂``. The inputs
    are rounded to float32 (``u_in``), the products and sums are float32 (``γ_{d+2}``
    for the length-d dot product plus the two additions of the half norms), the half
    norms carry a few float32 roundings (``8 u32``) and ``eps_n``. The total error is
    at most ``c (n̂_i + n̂_j)/4`` with ``c = 2(2u_in + u_in² + γ_{d+2} + eps_n + 8u32)``,
    so the key is a lower bound of ``D_ij`` (``σ`` covers float32 underflow) and
    ``key + c (n̂_i + n̂_j)`` an upper bound.
    """
    n = nhat.shape[0]
    u_in = _fp32_input_roundoff(dev)
    c = 2.0 * (2.0 * u_in + u_in * u_in + _gamma(d + 2, _U32) + eps_n + 8 * _U32)
    sigma = (d + 8) * 2.0 ** -120
    half = torch.full((n_pad,), math.inf, dtype=torch.float32, device=dev)
    half[:n] = ((1.0 - c) * 0.5 * nhat).to(torch.float32)
    G = torch.zeros(n_pad, dtype=torch.float64, device=dev)
    G[:n] = c * nhat

    def tile(i0, i1, j0, j1, out):
        torch.add(half[i0:i1, None], half[None, j0:j1], out=out)
        out.addmm_(x32[i0:i1], x32[j0:j1].T, alpha=-1.0)
        return out

    return tile, torch.float32, _Bounds(0.0, sigma, G)


_U16 = 2.0 ** -8  # bfloat16 unit roundoff (8 significant bits: 7 stored + 1 implicit)
_PAD_KEY = 2.0 ** 100


def _bf16_operands(x32, nhat, eps_n, n_pad, d, dev):
    """bfloat16 keys, ``K = d + 4`` columns, one bf16 matrix product per tile.

    Rows are ``A_i = [a_i, H_i, L_i, 1, 1]`` and columns ``B_j = [−a_j, 1, 1, H_j, L_j]``
    with ``a = bf16(x32)`` and ``H + L`` a two-term bf16 split of a lowered half norm
    ``h``, so the product is the key ``r ≈ h_i + h_j − a_i·a_j`` and its bf16 output
    rounding is relative to the *key* (about ``D``), not to the norms.

    Bound (all quantities exact reals; ``x`` = the float64 centred coordinates, ``x32``
    their float32 rounding, ``|x32 − x| ≤ u32|x|`` per coordinate, ``n = ‖x‖²``,
    ``|n̂ − n| ≤ eps_n n̂``):

    * input rounding: ``a = bf16(x32)`` (round to nearest, unit roundoff ``u = 2⁻⁸``);
      ``e = x − a``. ``x32 − a`` is exact in float32, so ``‖e‖ ≤ ‖x32 − a‖ + u32‖x‖``
      is computed rigorously (sums rounded up). Then
      ``x_i·x_j − a_i·a_j = a_i·e_j + e_i·a_j + e_i·e_j`` and, by Cauchy–Schwarz and
      ``ab ≤ (t a² + b²/t)/2`` for any ``t > 0``, ``|x_i·x_j − a_i·a_j| ≤ g_i + g_j``,
      ``g = (t‖a‖² + ‖e‖²/t + ‖e‖²)/2``. With the measured residuals ``‖e‖ ≈ 0.4 u‖x‖``
      this is 2–3× tighter than the worst case ``2u‖x_i‖‖x_j‖``; ``t`` = median of
      ``‖e‖/‖a‖``, ``‖a‖ ≤ ‖x‖ + ‖e‖``.
    * float32 accumulation inside the matmul (any order): the K products are exact in
      float32 (8 × 8 significant bits), the sum errs by at most
      ``γ_K Σ|terms| ≤ w_i + w_j``, ``w = γ_K (|H| + |L| + ‖a‖²/2)``,
      ``γ_K = K u32/(1 − K u32)``.
    * the split: ``|H + L − h| ≤ 1.01 u²|h| + 2⁻¹²⁵ =: v``.
    * ``h = (1 − eps_n) n̂/2 − g − w − v``; then the float32 sum ``ŝ`` satisfies
      ``ŝ ≤ D_ij`` and ``ŝ ≥ D_ij − (G_i + G_j)``, ``G = eps_n n̂ + 2(g + w + v)``
      (both widened a little for the float64 rounding of these formulas).
    * output rounding to bf16 (round to nearest): ``|r − ŝ| ≤ u_o|r|``,
      ``u_o = u/(1 − u)``.
    * underflow (denormals are flushed by AMX/oneDNN on input, product, sum and
      output): at most ``2⁻¹²⁶`` per term and step, ``σ = (4K + 8) 2⁻¹²⁶``.

    Hence ``r − u_o|r| − σ ≤ D_ij ≤ r + u_o|r| + σ + G_i + G_j``. Float32 accumulation
    with a single final rounding is the one assumption about the hardware (it is how
    AMX ``TDPBF16PS``, AVX512-BF16 ``VDPBF16PS`` and oneDNN's bf16 GEMM work);
    :func:`_bf16_usable` checks the bound on a hard case before the path is used.
    """
    if isinstance(x32, torch.Tensor):
        n = nhat.shape[0]
        pieces = ((s, e, x32[s:e]) for s, e in _row_chunks(n, d))
    else:  # (start, end, float32 rows) pieces from _centred_pieces; n̂ is computed here
        n, pieces = x32
        nhat = torch.empty(n, dtype=torch.float64, device=dev)
        eps_n = _EPS_N(d)
    K = d + 4
    A = torch.empty((n_pad, K), dtype=torch.bfloat16, device=dev)
    B = torch.empty((n_pad, K), dtype=torch.bfloat16, device=dev)
    a = A[:n, :d]
    ne = torch.empty(n, dtype=torch.float32, device=dev)
    for s, e, xs in pieces:  # a chunk of rows at a time: no n × d temporaries
        a[s:e] = xs
        if not isinstance(x32, torch.Tensor):
            nhat[s:e] = torch.linalg.vector_norm(xs, dim=1).double() ** 2  # as in _centred32
        torch.linalg.vector_norm(torch.sub(xs, a[s:e]), dim=1, out=ne[s:e])  # ‖x32 − a‖
    return _bf16_finish(A, B, nhat, ne.double(), eps_n, n, n_pad, d, dev, prepared_b=False)


def _bf16_finish(A, B, nhat, ne, eps_n, n, n_pad, d, dev, prepared_b: bool):
    """The rest of :func:`_bf16_operands` once ``A[:n, :d] = a`` holds the bf16
    coordinates: ``nhat`` (n,) float64 squared norms (``|n̂ − ‖x‖²| ≤ eps_n n̂``) and
    ``ne`` (n,) float64 ``‖x32 − a‖`` up to a float32 sum of squares (a float64 sum is
    more accurate, so the same rounding-up covers it). Fills ``B[:n, :d] = −a`` (unless
    ``prepared_b``: already there), the norm columns and the padding rows; returns
    (tile, dtype, bounds)."""
    K = d + 4
    A[n:] = 0.0
    B[n:] = 0.0
    a = A[:n, :d]
    gd = _gamma(d, _U32)
    up = 1.0 + gd + 4 * _U32  # rounds a float32 sum of d squares up
    ne = ne * up
    # ‖e‖ ≤ ‖x32 − a‖ (rounded up; + √d 2⁻⁶³ for squares lost to underflow) + u32‖x‖
    ne = (ne + math.sqrt(d) * 2.0 ** -63 + _U32 * (1 + _U32) * torch.sqrt(nhat * (1 + eps_n))) ** 2
    nx = torch.sqrt(nhat * (1 + eps_n))
    na = (nx + torch.sqrt(ne)) ** 2  # ‖a‖² ≤ (‖x‖ + ‖e‖)²
    pos = nx > 0
    t = float(torch.sqrt(ne[pos] / na[pos]).median()) if bool(pos.any()) else 1.0
    t = t if t > 0 else 1.0
    g = (t * na + ne / t + ne) * 0.5 * (1 + 2.0 ** -40)
    gK = _gamma(K, _U32)
    w = gK * (1.02 * (0.5 * nhat + g) + 0.5 * na)
    v = 1.02 * _U16 * _U16 * (0.5 * nhat + g + w) + 2.0 ** -125
    # (the terms 2⁻⁴⁸ n̂ and 2⁻⁴⁰ cover the float64 rounding of these lines)
    h = (1.0 - eps_n) * 0.5 * nhat - g - w - v - nhat * 2.0 ** -48
    H = h.to(torch.bfloat16)
    L = (h - H.double()).to(torch.bfloat16)
    G = torch.zeros(n_pad, dtype=torch.float64, device=dev)
    G[:n] = (eps_n * nhat + 2.0 * (g + w + v) + nhat * 2.0 ** -46) * (1 + 2.0 ** -40) + 2.0 ** -1000
    if not prepared_b:
        torch.neg(a, out=B[:n, :d])
    A[:n, d] = H
    A[:n, d + 1] = L
    A[n:, d] = _PAD_KEY  # padding rows and columns get keys of about 2^100
    A[:, d + 2] = 1.0
    A[:, d + 3] = 1.0
    B[:, d] = 1.0
    B[:, d + 1] = 1.0
    B[:n, d + 2] = H
    B[:n, d + 3] = L
    B[n:, d + 2] = _PAD_KEY

    def tile(i0, i1, j0, j1, out):
        return torch.mm(A[i0:i1], B[j0:j1].T, out=out)

    u_o = _U16 / (1.0 - _U16)
    sigma = (5 * K + 16) * 2.0 ** -126  # underflow here, and in n̂ (≤ (d + 8) 2⁻¹²⁶)
    return tile, torch.bfloat16, _Bounds(u_o, sigma, G)


_CHUNK_ELEMS = 1 << 17  # elements per row chunk of the n × d elementwise passes (1 MiB of float64)


def _row_chunks(n: int, d: int, elems: int = _CHUNK_ELEMS):
    """``(start, end)`` row ranges covering ``0:n`` for passes over an ``n × d`` matrix
    in cache-sized pieces of about ``elems`` elements (the last piece absorbs a short
    remainder). Row-wise results (elementwise ops, reductions along a row) are the
    same bits as on the whole matrix."""
    step = max(1, elems // max(1, d))
    starts = list(range(0, n, step))
    if len(starts) > 1 and n - starts[-1] < step // 2:
        starts.pop()
    return [(s, starts[i + 1] if i + 1 < len(starts) else n) for i, s in enumerate(starts)]


def _EPS_N(d: int) -> float:
    """Relative error bound of the float32 squared norms ``n̂``: the float32 sum of
    squares (γ_d), the sqrt and square (a few u32), and x32 vs x (≤ 3u32); squares lost
    to underflow (≤ (d + 8) 2⁻¹²⁶ absolute) are in the σ of the key bounds."""
    return _gamma(d, _U32) + 8 * _U32


def _centred_pieces(X64, mean, scale):
    """``(start, end, rows)``: the float32 rounding of the centred (and scaled)
    coordinates, a cache-sized chunk of rows at a time (float64 centring, then one
    rounding), so that no n × d float64 temporary is made."""
    n, d = X64.shape
    for s, e in _row_chunks(n, d):
        xc = torch.sub(X64[s:e], mean)
        if scale != 1.0:
            xc.mul_(scale)
        yield s, e, xc.to(torch.float32)


def _centred32(X64, mean, scale, n_pad):
    """float32 rounding of the centred (and scaled) coordinates, zero padding rows, and
    their squared norms ``n̂`` (float64) with the relative error bound ``eps_n``."""
    n, d = X64.shape
    x32 = torch.empty((n_pad, d), dtype=torch.float32, device=X64.device)
    x32[n:] = 0.0
    for s, e, xs in _centred_pieces(X64, mean, scale):
        x32[s:e] = xs
    nhat = torch.linalg.vector_norm(x32[:n], dim=1).double() ** 2
    return x32, nhat, _EPS_N(d)


_BF16_OK: dict = {}


def _bf16_usable(dev, d: int) -> bool:
    """Whether bf16 products here keep the bound of :func:`_bf16_operands`: checked
    once per (device, width) on near-duplicate pairs far from the origin, where any
    accumulation in reduced precision would break it."""
    key = (str(dev), d)
    if key not in _BF16_OK:
        ok = False
        try:
            g = torch.Generator(device="cpu").manual_seed(2024)
            m = 96
            base = torch.randn(m, d, generator=g, dtype=torch.float64) * 50
            pts = torch.cat([base, base + 1e-2 * torch.randn(m, d, generator=g, dtype=torch.float64),
                             torch.randn(m, d, generator=g, dtype=torch.float64) * 1e-2])
            n = pts.shape[0]
            n_pad = -(-n // _GROUP) * _GROUP
            x32, nhat, eps_n = _centred32(pts.to(dev), torch.zeros(d, dtype=torch.float64, device=dev), 1.0, n_pad)
            tile, dt, b = _bf16_operands(x32, nhat, eps_n, n_pad, d, dev)
            r = tile(0, n, 0, n, torch.empty((n, n), dtype=dt, device=dev)).double().cpu()
            idx = torch.arange(n)
            # exact half squared distances, in chunks (not an n × n × d array)
            D = 0.5 * _exact_sq(pts, idx, idx.expand(n, n))
            bc = _Bounds(b.u_o, b.sigma, b.G.cpu())
            ok = bool((bc.lower(r) <= D).all()) and bool((D <= bc.upper(r, idx, idx)).all())
        except Exception:  # pragma: no cover - no bf16 matmul on this device
            ok = False
        _BF16_OK[key] = ok
    return _BF16_OK[key]


# ---------------------------------------------------------------------------
# candidate pass: blocked keys, filtered top-p per row
# ---------------------------------------------------------------------------
class _Running:
    """The ``p`` smallest keys seen so far for every row, and a filter threshold.

    ``tau[i]`` (in key units, float32) is such that any point whose key exceeds it is
    provably farther from point ``i`` than its ``k``-th nearest neighbour, so it is not
    even looked at. It comes from the diagonal tiles and tightens as candidates
    accumulate.
    """

    def __init__(self, n_pad, p, k, bounds, delta, dev):
        self.keys = torch.full((n_pad, p), math.inf, dtype=torch.float32, device=dev)
        self.idx = torch.zeros((n_pad, p), dtype=torch.int64, device=dev)
        self.tau = torch.full((n_pad,), math.inf, dtype=torch.float32, device=dev)
        self.p, self.k, self.b, self.delta = p, k, bounds, delta

    def threshold(self, ub):
        """Key threshold from an upper bound ``ub`` (float64) of the k-th neighbour's
        half squared distance, widened by the centring error ``delta``: a point beyond
        it is farther (in exact arithmetic on the original data) than that neighbour."""
        t = (torch.sqrt(2.0 * ub.clamp_min(0.0)) + 2.0 * self.delta) ** 2 * 0.5
        return self.b.key_threshold(t)

    def tighten(self, rows):
        """tau = bound from the k-th smallest upper bound among the current candidates."""
        keys = self.keys[rows]
        ub = self.b.upper(keys, rows, self.idx[rows])
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
        pad_v.index_copy_(0, flat, val.float())
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
        offs = torch.arange(_GROUP, device=dev) * w
    else:
        tt = t if along_rows else t.T
        og = torch.nonzero(tt <= tau[:, None])
        if og.numel() == 0:
            return None
        offs = None
    # The passing groups are expanded to their members a slice at a time: with a loose
    # threshold most groups of a tile pass, and (P, _GROUP) int64 index arrays for all
    # of them at once would take several times the tile's own memory.
    out_o, out_x, out_v = [], [], []
    step = max(1, _FILTER_ELEMS // _GROUP) if offs is not None else _FILTER_ELEMS
    for s in range(0, og.shape[0], step):
        part = og[s : s + step]
        owner = part[:, 0:1]
        other = part[:, 1:2] + offs if offs is not None else part[:, 1:2]  # (P, G) or (P, 1)
        flat = owner * stride + other if along_rows else other * stride + owner
        v = flat_t.index_select(0, flat.reshape(-1)).view(flat.shape)
        lim = tau.index_select(0, owner.reshape(-1)).view(-1, 1)
        keep = torch.nonzero((v <= lim).reshape(-1)).squeeze(1)
        out_o.append(owner.expand(flat.shape).reshape(-1).index_select(0, keep))
        out_x.append(other.expand(flat.shape).reshape(-1).index_select(0, keep))
        out_v.append(v.reshape(-1).index_select(0, keep))
    if len(out_o) == 1:
        return out_o[0], out_x[0], out_v[0]
    return torch.cat(out_o), torch.cat(out_x), torch.cat(out_v)


def _candidates(tile_fn, tile_dtype, bounds, n, n_pad, p, k, delta, block, dev):
    """All-pairs candidate pass over ``n_pad`` (padded) points.

    ``tile_fn(i0, i1, j0, j1, out)`` writes the keys of rows ``i0:i1`` against columns
    ``j0:j1`` into ``out`` (see :class:`_Bounds` for what a key proves). Each tile of
    ``block × block`` keys is symmetric and serves both its row block and its column
    block. Returns keys (n, p) float32 and indices (n, p) int64: the ``p`` smallest keys
    among the points that pass the filter (see :class:`_Running`); empty slots have key
    ``+inf``.
    """
    run = _Running(n_pad, p, k, bounds, delta, dev)
    run.tau[n:] = -math.inf  # padding rows take no candidates
    bs = min(block, n_pad)
    buf = torch.empty(bs * bs, dtype=tile_dtype, device=dev)
    starts = list(range(0, n_pad, block))

    def tile(i0, i1, j0, j1):
        out = buf[: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0)
        return tile_fn(i0, i1, j0, j1, out)

    # Diagonal tiles first: the exact top-p of each row within its own block seeds the
    # candidates and the filter thresholds, so that the other tiles pass few entries.
    for i0 in starts:
        i1 = min(i0 + block, n_pad)
        t = tile(i0, i1, i0, i1)
        t.fill_diagonal_(math.inf)
        v, c_ = _topp_rows(t, min(p, i1 - i0))
        run.keys[i0:i1, : v.shape[1]] = v.float()
        run.idx[i0:i1, : v.shape[1]] = c_ + i0
        run.tighten(torch.arange(i0, i1, device=dev))
    for a, i0 in enumerate(starts):
        i1 = min(i0 + block, n_pad)
        rows_i = torch.arange(i0, i1, device=dev)
        for j0 in starts[a + 1 :]:
            j1 = min(j0 + block, n_pad)
            t = tile(i0, i1, j0, j1)
            flat = buf[: t.numel()]
            got = _filter(t, flat, t.shape[1], _round_up_to(run.tau[i0:i1], tile_dtype), True)
            if got is not None:
                r, cc, v = got
                run.add(rows_i, r, cc + j0, v)
            got = _filter(t, flat, t.shape[1], _round_up_to(run.tau[j0:j1], tile_dtype), False)
            if got is not None:
                cc, r, v = got
                run.add(torch.arange(j0, j1, device=dev), cc, r + i0, v)
    keys, idx = run.keys[:n], run.idx[:n]
    keys.masked_fill_(idx >= n, math.inf)  # padding points are no candidates
    return keys, idx


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


def _resolve(X64, keys, idx, k, to_scaled, bounds, delta):
    """Exact distances of the candidates, and the certificate.

    ``keys``/``idx`` (n, p): candidate keys (any order) of every point (see
    :class:`_Bounds`); the centred, scaled coordinates differ from the exact ones by at
    most ``delta`` in distance. Returns (sq (n, k) float64 ascending, nb (n, k) int64,
    ok (n,) bool): a row is certified when every point not evaluated exactly is
    provably no closer than its k-th exact neighbour.

    Points that never passed the filter are provably farther than the k-th neighbour.
    The others are evaluated in order of their keys, the first ``k`` for every row, then
    for each row exactly those whose key's lower bound does not exclude them (a prefix
    of the sorted candidates, usually empty); points pushed out of the ``p`` kept ones
    have keys ≥ the ``p``-th kept key. Empty slots (key +inf) are no points.
    """
    n, p = keys.shape
    dev = X64.device
    keys, order = torch.sort(keys, dim=1)
    idx = torch.gather(idx, 1, order)
    rows = torch.arange(n, device=dev)
    q = min(p, k)

    def low_dist(kk):  # smallest possible distance (scaled) of a point with key kk
        return torch.sqrt(2.0 * bounds.lower(kk).clamp_min(0.0)) - delta

    sq = _exact_sq(X64, rows, idx[:, :q])
    sq.masked_fill_(torch.isinf(keys[:, :q]), math.inf)
    sq, j = torch.sort(sq, dim=1, stable=True)
    out_sq = sq[:, :k].contiguous()
    out_nb = torch.gather(idx[:, :q], 1, j)[:, :k].contiguous()
    kth = torch.sqrt(out_sq[:, -1] * to_scaled)
    # m = number of candidates that may be closer than the k-th found so far
    m = (low_dist(keys) < kth[:, None]).sum(dim=1)
    ok = torch.isfinite(out_sq[:, -1]) & (m <= q)
    _LAST.update(evaluated_beyond_k=int((m - q).clamp_min(0).sum()), most_needed=int(m.max()))
    if q == p:
        ok &= low_dist(keys[:, p - 1]) >= kth
        return out_sq, out_nb, ok
    more = torch.nonzero(~ok & (m > q)).squeeze(1)
    if more.numel():
        mm = m[more]
        width = int(mm.max()) - q
        cols = idx[more, q : q + width]
        valid = torch.arange(q, q + width, device=dev)[None, :] < mm[:, None]
        r_, c_ = torch.nonzero(valid, as_tuple=True)
        s = torch.full((more.numel(), width), math.inf, dtype=torch.float64, device=dev)
        s[r_, c_] = _exact_sq_pairs(X64, more[r_], cols[r_, c_])
        s_all = torch.cat([out_sq[more], s], dim=1)
        i_all = torch.cat([out_nb[more], cols], dim=1)
        s_all, jj = torch.sort(s_all, dim=1, stable=True)
        out_sq[more] = s_all[:, :k]
        out_nb[more] = torch.gather(i_all, 1, jj[:, :k])
        new_kth = torch.sqrt(out_sq[more, -1] * to_scaled)
        # a row with m < p is complete (the k-th only got closer); with m = p the
        # points pushed out of its list are bounded by the p-th kept key
        full = mm >= p
        bound_ok = low_dist(keys[more, p - 1]) >= new_kth
        ok[more] = torch.isfinite(out_sq[more, -1]) & (~full | bound_ok)
    return out_sq, out_nb, ok


def _threshold_rows(X64, mean, scale, half64, rows, tau, k, block, pairs=None):
    """Exact k-NN of the points ``rows`` by collecting *every* point whose float64 key is
    at most ``tau`` (a key is a lower bound of the scaled half squared distance, and
    ``tau`` an upper bound of the k-th neighbour's), then evaluating those exactly.

    The centred, scaled coordinates ``(X64 − mean)·scale`` are formed a block of
    columns at a time (and, per block, for the rows' own chunk), never as a whole
    n × d copy; ``half64`` are the lowered half squared norms of all of them.
    ``pairs(X64, a, b)`` computes the exact squared distances of pairs (default
    :func:`_exact_sq_pairs`; the compiled path passes its own, so that a pair gets the
    same float64 value whichever step evaluates it)."""
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
        s = (pairs or _exact_sq_pairs)(X64, ri[pr], pc)
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


_LAST: dict = {}  # what the last call did (candidate precision, rows that fell back); for tests and benchmarks


def _origin_knn(n, k, dev):
    """k-NN of n copies of the origin (distances 0, the next k indices)."""
    nb = (torch.arange(n, device=dev)[:, None] + torch.arange(1, k + 1, device=dev)[None, :]) % n
    return torch.zeros((n, k), dtype=torch.float64, device=dev), nb


def _plan(n, d, k, margin, abs_max, mean_max, precision, dev):
    """Scaling, centring error, candidate precision and list length of a k-NN of n
    points: (scale, to_scaled, delta, precision, p, n_pad), or None when every point
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
    if precision == "auto":
        precision = "bf16" if dev.type == "cpu" and _bf16_usable(dev, d) else "fp32"
    elif precision == "bf16" and not _bf16_usable(dev, d):
        precision = "fp32"  # pragma: no cover - the bound does not hold for bf16 products here
    if margin is None:
        margin = max(8, k) if precision == "bf16" else 8
    p = min(k + margin, n - 1)
    n_pad = -(-n // _GROUP) * _GROUP
    return scale, to_scaled, delta, precision, p, n_pad


def _knn_core(X64: torch.Tensor, k: int, block: int, margin, abs_max: float, precision: str):
    """Exact k-NN (squared distances, indices) of the rows of ``X64``, ``n ≥ k + 1``;
    ``abs_max`` is an upper bound of ``max |X64|``."""
    n, d = X64.shape
    dev = X64.device
    # Centre, then scale by a power of two so that every coordinate is below 1 in
    # magnitude (neither changes the neighbours; the scaling is exact).
    mean = X64.mean(dim=0)
    plan = _plan(n, d, k, margin, abs_max, float(mean.abs().max()), precision, dev)
    if plan is None:  # all points are the origin
        return _origin_knn(n, k, dev)
    scale, to_scaled, delta, precision, p, n_pad = plan
    with _ieee_fp32_matmul():
        if precision == "bf16":  # built from chunks: no float32 copy of all points
            pieces = (n, _centred_pieces(X64, mean, scale))
            tile_fn, tile_dtype, bounds = _bf16_operands(pieces, None, None, n_pad, d, dev)
        else:
            x32, nhat, eps_n = _centred32(X64, mean, scale, n_pad)
            tile_fn, tile_dtype, bounds = _fp32_operands(x32, nhat, eps_n, n_pad, d, dev)
            del x32
        keys, idx = _candidates(tile_fn, tile_dtype, bounds, n, n_pad, p, k, delta, block, dev)
        del tile_fn

    out_sq, out_nb, ok = _resolve(X64, keys, idx, k, to_scaled, bounds, delta)
    bad = torch.nonzero(~ok).squeeze(1)
    _LAST.update(precision=precision, n=n, k=k, p=p, fallback_rows=int(bad.numel()))
    if bad.numel():
        sq_norm = torch.empty(n, dtype=torch.float64, device=dev)
        for s, e in _row_chunks(n, d):  # squared norms of the centred, scaled points
            xs = torch.sub(X64[s:e], mean)
            if scale != 1.0:
                xs.mul_(scale)
            torch.sum(xs.mul_(xs), dim=1, out=sq_norm[s:e])
        del xs
        c64 = 2.0 * (_gamma(d + 2, _U64) + 8 * _U64)
        half64 = (1.0 - c64) * 0.5 * sq_norm
        tau = (torch.sqrt(out_sq[bad, -1] * to_scaled) + delta) ** 2 * (0.5 * (1 + 1e-12)) + 2.0 ** -1000
        sq2, nb2 = _threshold_rows(X64, mean, scale, half64, bad, tau, k, block)
        out_sq[bad] = sq2
        out_nb[bad] = nb2
    return out_sq, out_nb


# ---------------------------------------------------------------------------
# compiled CPU path (numba): the same algorithm in few passes
# ---------------------------------------------------------------------------
_SUBHASH_COLS = 16  # columns of the cheap first duplicate hash


def _groups_compiled(xn: np.ndarray):
    """:func:`_dedupe` for the compiled path, reading little of ``xn``: a hash of the
    first few columns proposes; the rows it cannot separate get the full hash of
    :func:`_dedupe`, and rows with equal full hashes are compared (exact). Returns
    None or (reps (u,), group (n,)) as numpy int64 arrays. (NaN/inf are found by the
    pass over the distinct rows.)"""
    n, d = xn.shape
    w = _hash_weights(d).numpy()
    m = min(d, _SUBHASH_COLS)
    h1 = np.ascontiguousarray(xn[:, :m], dtype=np.float64) @ w[:m]
    hs = np.sort(h1)
    eq = hs[1:] == hs[:-1]  # (NaN equals nothing)
    if not eq.any():
        return None
    cand = np.flatnonzero(np.isin(h1, hs[1:][eq]))  # the rows whose first hash repeats
    h2 = np.empty(cand.shape[0])
    _nk.row_hash(xn, cand, w, h2)
    rep = np.arange(n, dtype=np.int64)
    _nk.group_runs(xn, cand, h2, rep)
    isrep = rep == np.arange(n)
    if isrep.all():
        return None
    reps = np.flatnonzero(isrep)
    pos = np.cumsum(isrep) - 1
    return reps, pos[rep]


# Compiled path on two threads: two lanes (this thread and a persistent helper), each
# computing a tile's product with torch on one thread and then scanning it with the
# serial compiled loops; the scans run one at a time, in the plan's order. Measured on
# 2 cores (AMX bf16): the 1024-point tiles of split diagonal blocks gain nothing from a
# second matmul thread, and a parallel scan hands each launch to numba's pool (stalls
# of milliseconds when the other core is busy); two single-threaded lanes keep both
# cores on products and overlap every scan with the other lane's product.
_LANES = True
_LANE_BLOCK = 1024  # points per tile side on the lanes (at most block_size)


class _Helper:
    """A daemon thread, started on first use and kept for the process, that runs the
    second lane (a thread per call would cost its start-up every call)."""

    def __init__(self):
        self.pid = os.getpid()
        self.jobs = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="embgeom-knn-lane", daemon=True).start()

    def _loop(self):
        while True:
            fn, box, done = self.jobs.get()
            try:
                fn()
            except BaseException as exc:  # handed to the caller
                box.append(exc)
            finally:
                done.set()

    def submit(self, fn):
        box, done = [], threading.Event()
        self.jobs.put((fn, box, done))
        return box, done


_HELPER: list = []
_HELPER_LOCK = threading.Lock()


def _helper() -> _Helper:
    # a forked child inherits the list but not the thread: start its own
    with _HELPER_LOCK:
        if not _HELPER or _HELPER[0].pid != os.getpid():
            _HELPER[:] = [_Helper()]
        return _HELPER[0]


def _on_both_threads(here, there) -> None:
    """Run ``there()`` on the helper thread while ``here()`` runs on this one; return
    once both are done, raising the helper's exception if it had one."""
    box, fin = _helper().submit(there)
    try:
        here()
    finally:
        fin.wait()  # the helper may still be reading a buffer
    if box:
        raise box[0]


def _round_robin(m: int):
    """The pairs ``a < b`` of ``m`` blocks in rounds (circle method): within a round
    no block occurs twice."""
    ring = list(range(m)) + ([None] if m % 2 else [])
    out = []
    for _ in range(len(ring) - 1):
        for e in range(len(ring) // 2):
            a, b = ring[e], ring[-1 - e]
            if a is not None and b is not None:
                out.append((min(a, b), max(a, b)))
        ring = [ring[0], ring[-1]] + ring[1:-1]
    return out


def _scan_deps(plan):
    """For each tile of ``plan``, the earlier tiles it must be scanned after: for each
    diagonal tile's points among its own, the last earlier tile that also holds them.
    Tiles that share no points touch disjoint lists, so any schedule that keeps these
    orders ends in the state of the plan scanned one tile after another."""
    units = sorted({tl[0] for tl in plan if tl[0] == tl[2]})  # starts of the diagonal tiles
    last = {}
    deps = []
    for e, (i0, i1, j0, j1) in enumerate(plan):
        mine = [u for u in units if i0 <= u < i1 or j0 <= u < j1]
        deps.append(sorted({last[u] for u in mine if u in last}))
        for u in mine:
            last[u] = e
    return deps


def _run_lanes(plan, deps, product, scan):
    """Run ``scan(product(s, tile), tile)`` for every tile of ``plan`` on two lanes
    (``s`` = the lane's buffer): each lane takes the next tile, computes its product,
    then scans it once the tiles ``deps[e]`` are scanned (the other lane's scan of a
    tile sharing no points may run meanwhile). torch runs on one thread in this lane
    (restored afterwards) and in the helper's."""
    cond = threading.Condition()
    done = [False] * len(plan)
    state = [0, False]  # next tile to take, aborted

    def lane(s):
        try:
            while True:
                with cond:
                    e = state[0]
                    state[0] += 1
                if e >= len(plan) or state[1]:
                    return
                t = product(s, plan[e])
                with cond:
                    while not state[1] and not all(done[f] for f in deps[e]):
                        cond.wait()
                    if state[1]:
                        return
                scan(t, plan[e])
                with cond:
                    done[e] = True
                    cond.notify_all()
        except BaseException:
            with cond:  # release the other lane
                state[1] = True
                cond.notify_all()
            raise

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def helper_lane():
            # torch's thread count is per thread (OpenMP): one here too, set each time
            # (torch may re-initialise a thread's count from the global setting)
            torch.set_num_threads(1)
            lane(1)

        _on_both_threads(lambda: lane(0), helper_lane)
    finally:
        torch.set_num_threads(prev)


def _shared(fn, m: int):
    """``fn(c)`` for ``c = 0 … m − 1``, on this thread and the helper, each taking the
    next ``c``: where the other core is busy this thread does most of the work itself
    instead of waiting for a share that was handed out in advance (as a parallel loop
    would). ``fn`` must release the GIL (compiled, nogil)."""
    lock = threading.Lock()
    nxt = [0]

    def lane():
        while True:
            with lock:
                c = nxt[0]
                nxt[0] += 1
            if c >= m:
                return
            fn(c)

    _on_both_threads(lane, lane)


def _shares() -> bool:
    """Whether the per-point passes run through :func:`_shared` (with the lanes)."""
    return _LANES and torch.get_num_threads() == 2


_SHARE_PARTS = 16  # pieces of a per-point pass shared between the two threads


_SPLIT_DIAG = True  # compiled path: split diagonal blocks of ≥ 2·_SPLIT_MIN points in halves
_SPLIT_MIN = 256


def _candidates_compiled(tile_fn, tile_dtype, bounds, n, n_pad, p, k, delta, block):
    """:func:`_candidates` with compiled tile passes: returns (keys (n, p) float32
    ascending per row, +inf past ``cnt``; idx (n, p) int64; cnt (n,) int32), numpy.

    Every key of a tile is screened against its row's (and, off the diagonal, its
    column's) threshold and the survivors are inserted into sorted lists of the p
    smallest keys; a list's threshold tightens as soon as it changes (on diagonal
    tiles, once per row). What a skipped or dropped key proves is as in
    :func:`_candidates` (see :class:`_Running`). Diagonal blocks come first (each
    point's list starts there), a large one as two diagonal tiles of its halves and
    the tile between them; the tiles between blocks follow in rounds of disjoint pairs.
    On two threads (see ``_LANES``) the tiles are at most ``_LANE_BLOCK`` points a side
    and run on two lanes; a scan waits for the earlier tiles that share its points, so
    the result is that of the plan scanned one tile after another."""
    keys = np.full((n, p), np.inf, dtype=np.float32)
    idx = np.zeros((n, p), dtype=np.int64)
    cnt = np.zeros(n, dtype=np.int32)
    tau = np.full(n, np.inf, dtype=np.float32)
    G = np.ascontiguousarray(bounds.G.cpu().numpy())
    u_o, sigma = float(bounds.u_o), float(bounds.sigma)
    is16 = tile_dtype == torch.bfloat16
    view = torch.int16 if is16 else torch.int32
    starts = list(range(0, n_pad, block))
    lanes = _LANES and n_pad > _GROUP and torch.get_num_threads() == 2
    if lanes:
        # tiles of equal, moderate size: a lane's product is as fast per key as on
        # 2048-point tiles, and the last tiles leave the other lane little to wait for
        block = min(block, _LANE_BLOCK)
        starts = list(range(0, n_pad, block))
    bs = min(block, n_pad)

    # Diagonal blocks first: they seed the lists and thresholds. A block is split in
    # two halves (two diagonal tiles and the off-diagonal tile between them), which
    # computes a quarter fewer keys than its full square.
    plan, halves = [], []
    for i0 in starts:
        i1 = min(i0 + block, n_pad)
        m = i0 + ((i1 - i0) // 2 // _GROUP) * _GROUP if _SPLIT_DIAG and i1 - i0 >= 2 * _SPLIT_MIN else i1
        for a0, a1 in ((i0, m), (m, i1)) if m < i1 else ((i0, i1),):
            plan.append((a0, a1, a0, a1))
        if m < i1:
            halves.append((i0, m, m, i1))
    plan += halves
    # then the tiles between blocks, in rounds that pair every block at most once, so
    # that consecutive tiles share no points (their scans can run at the same time)
    for a, b in _round_robin(len(starts)):
        plan.append((starts[a], min(starts[a] + block, n_pad), starts[b], min(starts[b] + block, n_pad)))

    lanes = lanes and len(plan) > 1
    _LAST["lanes"] = bool(lanes)
    bufs = [torch.empty(bs * bs, dtype=tile_dtype) for _ in range(2 if lanes else 1)]
    diag, off = (_nk.tile_diag1, _nk.tile_off1) if lanes else (_nk.tile_diag, _nk.tile_off)

    def product(s, tl):
        i0, i1, j0, j1 = tl
        out = bufs[s][: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0)
        return tile_fn(i0, i1, j0, j1, out).view(view).numpy()

    def scan(t, tl):
        i0, _, j0, _ = tl
        if i0 == j0:
            diag(t, i0, n, keys, idx, cnt, tau, G, u_o, sigma, delta, k, is16)
        else:
            off(t, i0, j0, n, keys, idx, cnt, tau, G, u_o, sigma, delta, k, is16)

    if lanes:
        _run_lanes(plan, _scan_deps(plan), product, scan)
    else:
        for tl in plan:
            scan(product(0, tl), tl)
    return keys, idx, cnt


def _parts(u: int) -> np.ndarray:
    """Boundaries of the parallel parts of a pass over u rows."""
    return np.linspace(0, u, min(u, 4 * max(1, torch.get_num_threads())) + 1).astype(np.int64)


def _knn_core_compiled(X, xn, rows, k, block, margin, precision, name):
    """:func:`_knn_core` with compiled passes, for the distinct points ``rows`` (u,)
    of ``xn`` (the numpy view of the contiguous CPU tensor ``X``, float32 or
    float64). Returns (sq (u, k) float64, nb (u, k) int64 indices into the u points),
    or None when the data need the rescaling of :func:`knn` first.

    The points are centred on the mean of a sample of them (any centre keeps the
    distances; this one is known before the single pass over the points, which also
    finds the largest magnitude and any NaN/inf). The power-of-two scaling is guessed
    from the sample and the pass redone in the rare case that the whole data call for
    another one."""
    u = rows.shape[0]
    d = xn.shape[1]
    dev = torch.device("cpu")
    centre, guess = _nk.sample_centre(xn, rows, max(1, u // 512))
    if not (math.isfinite(guess) and np.isfinite(centre).all()):
        guess, centre = 1.0, np.zeros(d)  # NaN/inf in the sample: the pass below raises
    elif guess > 2.0 ** 400 or 0.0 < guess < 2.0 ** -400:
        return None  # extreme magnitudes (see knn)
    share = _shares() and u >= _SHARE_PARTS
    parts = np.linspace(0, u, _SHARE_PARTS + 1).astype(np.int64) if share else _parts(u)
    nhat = np.empty(u)
    e_done = None
    while True:
        plan = _plan(u, d, k, margin, guess, float(np.abs(centre).max()), precision, dev)
        if plan is None:  # the sample is all zeros: no scaling, the pass tells the rest
            plan = _plan(u, d, k, margin, 1.0, 0.0, precision, dev)
        scale, to_scaled, delta, precision_r, p, n_pad = plan
        if precision_r == "bf16":
            A = torch.empty((n_pad, d + 4), dtype=torch.bfloat16)
            B = torch.empty((n_pad, d + 4), dtype=torch.bfloat16)
            Au = A.view(torch.int16).numpy().view(np.uint16)
            Bu = B.view(torch.int16).numpy().view(np.uint16)
            ne = np.empty(u)
            if share:
                am = np.zeros(_SHARE_PARTS)
                _shared(lambda c: _nk.prep_bf16_parts(xn, rows, centre, scale, Au, Bu, nhat, ne, parts, c, c + 1,
                                                      am), _SHARE_PARTS)
            else:
                am = _nk.prep_bf16(xn, rows, centre, scale, Au, Bu, nhat, ne, parts)
        else:
            x32 = torch.empty((n_pad, d), dtype=torch.float32)
            x32[u:] = 0.0
            am = _nk.prep_fp32(xn, rows, centre, scale, x32.numpy(), nhat, parts)
        if not np.isfinite(nhat).all():
            _check_finite(X, torch.tensor([math.nan]), name)  # raises unless overflow
        abs_max = float(am.max())
        if abs_max > 2.0 ** 400 or 0.0 < abs_max < 2.0 ** -400:
            return None
        plan = _plan(u, d, k, margin, abs_max, float(np.abs(centre).max()), precision, dev)
        if plan is None:  # pragma: no cover - distinct points are never all the origin
            return _origin_knn(u, k, dev)
        if plan[0] == scale or e_done is not None:
            break
        e_done = guess = abs_max  # the scaling differs: once more with the right one
    scale, to_scaled, delta, precision, p, n_pad = plan
    with _ieee_fp32_matmul():
        if precision == "bf16":
            G = np.empty(n_pad)
            _nk.finish_bf16(nhat, ne, _EPS_N(d), d, Au, Bu, G, u, _U32, _U16, _bf16_of(_PAD_KEY), _bf16_of(1.0))

            def tile_fn(i0, i1, j0, j1, out):
                return torch.mm(A[i0:i1], B[j0:j1].T, out=out)

            bounds = _Bounds(_U16 / (1.0 - _U16), (5 * (d + 4) + 16) * 2.0 ** -126, torch.from_numpy(G))
            tile_dtype = torch.bfloat16
        else:
            tile_fn, tile_dtype, bounds = _fp32_operands(x32, torch.from_numpy(nhat), _EPS_N(d), n_pad, d, dev)
        keys, idx, cnt = _candidates_compiled(tile_fn, tile_dtype, bounds, u, n_pad, p, k, delta, block)
        del tile_fn

    out_sq = np.empty((u, k))
    out_nb = np.empty((u, k), dtype=np.int64)
    ok = np.empty(u, dtype=np.bool_)
    need = np.empty(u, dtype=np.int64)
    rargs = (xn, rows, keys, idx, cnt, k, to_scaled, float(bounds.u_o), float(bounds.sigma), delta, out_sq, out_nb,
             ok, need)
    if share:
        _shared(lambda c: _nk.resolve_rows(*rargs, parts[c], parts[c + 1]), _SHARE_PARTS)
    else:
        _nk.resolve(*rargs)
    q = min(p, k)
    bad = np.flatnonzero(~ok)
    _LAST.update(precision=precision, n=u, k=k, p=p, fallback_rows=int(bad.size),
                 evaluated_beyond_k=int(np.maximum(need - q, 0).sum()), most_needed=int(need.max()))
    out_sq = torch.from_numpy(out_sq)
    out_nb = torch.from_numpy(out_nb)
    if bad.size:
        # the float64 fallback of _knn_core on a float64 copy of the distinct points,
        # with the compiled exact distances (the same values as those of resolve)
        Xd = X[torch.from_numpy(rows)].to(torch.float64)
        mean_t = torch.from_numpy(centre)
        sq_norm = torch.empty(u, dtype=torch.float64)
        for s, e in _row_chunks(u, d):
            xs = torch.sub(Xd[s:e], mean_t)
            if scale != 1.0:
                xs.mul_(scale)
            torch.sum(xs.mul_(xs), dim=1, out=sq_norm[s:e])
        c64 = 2.0 * (_gamma(d + 2, _U64) + 8 * _U64)
        half64 = (1.0 - c64) * 0.5 * sq_norm
        bad_t = torch.from_numpy(bad)
        tau = (torch.sqrt(out_sq[bad_t, -1] * to_scaled) + delta) ** 2 * (0.5 * (1 + 1e-12)) + 2.0 ** -1000
        sq2, nb2 = _threshold_rows(Xd, mean_t, scale, half64, bad_t, tau, k, block, pairs=_pairs_compiled)
        out_sq[bad_t] = sq2
        out_nb[bad_t] = nb2
    return out_sq, out_nb


def _bf16_of(x: float) -> int:
    """bfloat16 bits of x (exactly representable)."""
    return int(torch.tensor([x], dtype=torch.bfloat16).view(torch.int16).item()) & 0xFFFF


def _pairs_compiled(X64, a, b):
    """Exact squared distances of the pairs (a[t], b[t]) of rows of the contiguous CPU
    float64 (or float32, read as float64) ``X64``, by the compiled loop of
    :func:`_nk.resolve`."""
    out = np.empty(a.shape[0])
    _nk.pair_sq(X64.numpy(), a.numpy(), b.numpy(), out)
    return torch.from_numpy(out)


def _knn_compiled(X, k, block, margin, precision, name):
    """:func:`knn` on the CPU with the compiled passes (``embgeom.stats._kernels.LOCK``
    held). Reads float32 or float64 input as it is (no float64 copy): the exact
    distances are those of its float64 values."""
    _compiled_loops()
    X = X.detach()
    if X.dtype not in (torch.float32, torch.float64):
        X = X.to(torch.float64)
    X = X.contiguous()
    n, d = X.shape
    xn = X.numpy()
    groups = _groups_compiled(xn)
    rows = np.arange(n, dtype=np.int64) if groups is None else groups[0]
    nu = rows.shape[0]
    ku = min(k, nu - 1)
    e0 = 0
    if ku == 0:  # every point is the same
        _check_finite(X[:1], torch.tensor([math.nan]), name)
        sq_u = torch.zeros((1, 1), dtype=torch.float64)
        nb_u = torch.zeros((1, 1), dtype=torch.int64)
    else:
        res = _knn_core_compiled(X, xn, rows, ku, block, margin, precision, name)
        if res is None:
            # extreme magnitudes: rescale the distinct points by a power of two (see knn)
            amax = float(X[torch.from_numpy(rows)].abs().max())
            e0 = math.frexp(amax)[1]
            Xs = X[torch.from_numpy(rows)].to(torch.float64) * (2.0 ** (-e0 // 2)) * (2.0 ** (-e0 - (-e0 // 2)))
            res = _knn_core_compiled(Xs, Xs.numpy(), np.arange(nu, dtype=np.int64), ku, block, margin, precision,
                                     name)
        sq_u, nb_u = res
    if groups is None:
        sq, nb = sq_u, nb_u
    else:
        group = groups[1]
        counts = np.bincount(group, minlength=nu)
        sq_n = np.empty((n, k))
        nb_n = np.empty((n, k), dtype=np.int64)
        _nk.expand(sq_u.numpy(), nb_u.numpy(), group, counts, k, sq_n, nb_n)
        sq, nb = torch.from_numpy(sq_n), torch.from_numpy(nb_n)
    # numpy's square root (correctly rounded, as torch's): torch runs this on its
    # thread pool, whose wake-up costs milliseconds when the other cores are busy
    sq_np = sq.numpy()
    np.sqrt(sq_np, out=sq_np)
    dist = sq
    if e0:
        dist.mul_(2.0 ** (e0 // 2)).mul_(2.0 ** (e0 - e0 // 2))
    return dist, nb


def _dedupe(X64: torch.Tensor, name: str = "X"):
    """Groups of exactly equal rows: None when all rows differ, else (representative
    rows (u,), group of each row (n,)).

    A float64 hash (a fixed random projection) proposes groups and every row of a
    proposed group is compared with the group's first row, so the grouping is exact:
    a row that merely shares a hash value stays on its own. (Equal rows whose hash
    happened to differ in the last bit are merely not grouped; the k-NN is exact
    either way, grouping only makes many duplicates cheap.) Also rejects NaN/inf."""
    h = X64 @ _hash_weights(X64.shape[1]).to(X64.device)
    _check_finite(X64, h, name)
    return _groups(X64, h)


def _hash_weights(d: int) -> torch.Tensor:
    """The fixed random projection (weights in [0.5, 1.5)) that hashes rows."""
    g = torch.Generator(device="cpu").manual_seed(0x5EED)
    return torch.rand(d, generator=g, dtype=torch.float64) + 0.5


def _check_finite(X, h, name):
    # NaN or ±inf anywhere makes the projection non-finite (the weights are > 0); a
    # non-finite projection of finite rows (overflow) is no error
    if not bool(torch.isfinite(h).all()) and not bool(torch.isfinite(X).all()):
        raise EmbgeomError(f"{name} contains NaN or infinite values; remove or fix those rows first")


def _groups(X64, h):
    """:func:`_dedupe` given the rows' hashes ``h`` (n,)."""
    n = X64.shape[0]
    dev = X64.device
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


def _take_rows(X64: torch.Tensor, reps: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``X64[reps]`` for ascending ``reps``. With ``in_place`` (``X64`` is this call's own
    copy) the rows are moved to the front of ``X64`` a chunk at a time, and the leading
    rows returned: the same values, without a second n × d float64 copy."""
    if not in_place:
        return X64[reps]
    u, d = reps.shape[0], X64.shape[1]
    for s, e in _row_chunks(u, d):
        # rows move only towards the front (reps[i] ≥ i) and a chunk is gathered before
        # it is written, so no row is overwritten before it has been read
        X64[s:e] = X64.index_select(0, reps[s:e])
    return X64[:u]


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


def knn(X, k: int, *, block_size: int = 2048, margin: int | None = None, name: str = "X", precision: str = "auto"):
    """Exact Euclidean ``k``-nearest-neighbour distances and indices of every point.

    Parameters
    ----------
    X : (n, d) numpy array or torch tensor, any real dtype; CPU or CUDA.
    k : number of neighbours, ``1 ≤ k ≤ n − 1``. The point itself is never its own
        neighbour (excluded by index); exact duplicates are neighbours at distance 0.
    block_size : rows (and columns) per tile. Memory: one ``block_size²`` tile
        (on the compiled CPU path with two threads, two of at most 1024²; bf16 or
        float32, plus screening buffers of a fraction of it), ``n · (k +
        margin) · 12`` bytes of candidates, and the operands: with bf16 two bf16
        copies of X (``2 n (d + 4) · 2`` bytes), with float32 one float32 copy. On the
        CPU with the compiled loops, float32 and float64 X are read as they are (no
        copy; other dtypes are converted to float64) and the float64 fallback, when
        some rows need it, makes a float64 copy of the distinct rows. Otherwise X is
        converted to float64 once (no copy when it already is float64); with exact
        duplicates the distinct rows are gathered into a float64 copy, or, when the
        float64 array is already this call's own conversion, moved to its front in
        place. The centring, rounding and the float64 fallback work on cache-sized
        chunks of rows (or one row at a time), never on n × d temporaries.
    margin : extra candidates kept per point beyond ``k`` (default ``max(8, k)``
        with bf16 candidates, 8 with float32); only speed depends on it, the result
        is exact in any case (see the module docstring).
    precision : precision of the candidate search: ``"auto"`` (bfloat16 on a CPU
        whose bf16 products pass the accuracy check, float32 otherwise and on CUDA),
        ``"bf16"`` (also on CUDA; float32 where the check fails) or ``"fp32"``. Only
        speed depends on it; the result is the float64 brute-force answer in every
        case.

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
    if margin is not None and (not isinstance(margin, int) or isinstance(margin, bool) or margin < 0):
        raise EmbgeomError(f"margin must be a non-negative integer, got {margin!r}")
    if precision not in ("auto", "bf16", "fp32"):
        raise EmbgeomError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    block = max(_GROUP, (block_size // _GROUP) * _GROUP)
    compiled = (_kernels.want_kernels(X.device) if n >= COMPILED_MIN_POINTS
                else _kernels.use_kernels(X.device))
    if compiled:
        with _kernels.parallel():
            return _knn_compiled(X, k, block, margin, precision, name)
    X64 = X.to(torch.float64)
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
        sq, nb = _knn_core(X64, k, block, margin, amax, precision)
    else:
        reps, group = groups
        nu = reps.shape[0]
        counts = torch.bincount(group, minlength=nu)
        ku = min(k, nu - 1)
        if ku == 0:  # every point is the same
            sq_u = torch.zeros((1, 1), dtype=torch.float64, device=X64.device)
            nb_u = torch.zeros((1, 1), dtype=torch.int64, device=X64.device)
        else:
            sq_u, nb_u = _knn_core(_take_rows(X64, reps, in_place=X64 is not X), ku, block, margin, amax, precision)
        sq, nb = _expand(sq_u, nb_u, group, counts, k)
    dist = sq.sqrt_()
    if e0:
        dist.mul_(2.0 ** (e0 // 2)).mul_(2.0 ** (e0 - e0 // 2))
    if X.device.type == "cpu":
        # Toward the "auto" rule's budget: this search took ~n²d/90 ns more than the
        # compiled one would have (measured 0.076 s at n = 2,000, d = 576), in the
        # rule's unit of ~3 ns per float; a layer sweep of small searches switches.
        _kernels.count_torch_work(1, n * n * d // _KNN_WORK_DIVISOR)
    return dist, nb


# n·n·d / this = a torch-path kNN's extra time in count_torch_work's floats (~3 ns each).
_KNN_WORK_DIVISOR = 90


def extend_knn_distances(X, inside, inside_distances, k: int, name: str = "X") -> torch.Tensor:
    """Exact k-NN distances of every point of ``X`` among all of ``X``, from those of a
    subset among itself: when only a few points are added to a searched set (the
    massive-activation tokens that the ``all`` view adds to the ``inliers``), there is
    no need to search again.

    ``inside``: (n,) bool, the subset. ``inside_distances``: (m, q) ascending exact
    distances of the subset's points (in row order) to their nearest others in the
    subset, with q ≥ min(k, m − 1) (as :func:`knn_distances` gives). Each of the
    n − m points outside is compared with every point, in float64 by differences (the
    exact distances :func:`knn` uses); each inside point's list is merged with its
    distances to them. Cost O((n − m)·n·d). Returns (n, min(k, n − 1)) float64,
    ascending per row, on ``X``'s device: the same distances as ``knn_distances(X, k)``
    up to the rounding of the sums (exact copies stay at distance 0, as there)."""
    X = as_float_matrix(X, name=name)
    n = X.shape[0]
    k = _check_k(k, n)
    inside = torch.as_tensor(inside, device=X.device)
    if inside.dtype != torch.bool or inside.shape != (n,):
        raise EmbgeomError(f"inside must be an (n,) = ({n},) bool mask, got {inside.dtype} {tuple(inside.shape)}")
    m = int(inside.sum())
    q_needed = min(k, m - 1)
    if m < 2 or inside_distances.ndim != 2 or inside_distances.shape[0] != m or inside_distances.shape[1] < q_needed:
        raise EmbgeomError(f"inside_distances must be ({m}, ≥{max(q_needed, 0)}) for a subset of {m} points, "
                           f"got {tuple(inside_distances.shape)}")
    out_rows = (~inside).nonzero().squeeze(1)
    n_out = int(out_rows.shape[0])
    # (n − m, n) exact squared distances of the points outside to every point
    if _kernels.use_kernels(X.device):  # the compiled loop of the search's own exact distances
        xs = torch.from_numpy(_kernels.as_array(X.detach()))
        a = out_rows.repeat_interleave(n)
        b = torch.arange(n).repeat(n_out)
        with _kernels.parallel():
            _compiled_loops()
            sq = _pairs_compiled(xs, a, b).view(n_out, n)
    else:
        everyone = torch.arange(n, device=X.device)
        sq = _exact_sq(X.to(torch.float64), out_rows, everyone.expand(n_out, n))
    sq[torch.arange(n_out, device=X.device), out_rows] = math.inf  # not their own neighbour
    to_out = sq.sqrt_()
    dist = torch.empty((n, k), dtype=torch.float64, device=X.device)
    dist[out_rows] = torch.topk(to_out, k, dim=1, largest=False, sorted=True).values
    in_rows = inside.nonzero().squeeze(1)
    merged = torch.cat([inside_distances[:, :q_needed].to(X.device, torch.float64), to_out[:, in_rows].T], dim=1)
    dist[in_rows] = torch.topk(merged, k, dim=1, largest=False, sorted=True).values
    return dist


def knn_distances(X, k: int, *, block_size: int = 2048, margin: int | None = None, name: str = "X",
                  precision: str = "auto") -> torch.Tensor:
    """Exact distances to the ``k`` nearest other points: (n, k) float64 torch tensor,
    ascending per row, on ``X``'s device. See :func:`knn`."""
    return knn(X, k, block_size=block_size, margin=margin, name=name, precision=precision)[0]
