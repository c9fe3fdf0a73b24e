"""Candidate keys of the exact k-NN and what they prove: the float32 and bfloat16
tile products, their error bounds, and the IEEE float32 guard.

A key ``r_ij`` approximates ``D_ij = ‖x_i − x_j‖²/2`` of the centred, scaled points
and comes with a proven interval ``lower(r) ≤ D_ij ≤ upper(r)`` (:class:`Bounds`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import _knn_points as kp

_GROUP = 16  # points are padded to a multiple of this (the tile scans' strided groups)
_U32 = 2.0 ** -24
_U64 = 2.0 ** -53


def _gamma(m: int, u: float) -> float:
    return m * u / (1.0 - m * u)



class Bounds:
    """What a candidate key ``r`` proves about the (scaled, centred) half squared
    distance ``D_ij = ‖x_i − x_j‖²/2``:

        r − u_o|r| − σ  ≤  D_ij  ≤  r + u_o|r| + σ + G_i + G_j.

    ``u_o`` is the relative rounding of the stored key (bf16 output; 0 for float32),
    ``σ`` an absolute slack for underflow, ``G`` (n_pad,) float64 a per-point widening.
    See :func:`_bf16_finish` and :func:`_fp32_operands` for the derivations. (The
    compiled scan applies the same formulas to single keys.)
    """

    def __init__(self, u_o: float, sigma: float, G: torch.Tensor):
        self.u_o, self.sigma, self.G = u_o, sigma, G

    def lower(self, r: torch.Tensor) -> torch.Tensor:
        r = r.double()  # r (1 − u_o sign r) = r − u_o|r|, and +inf stays +inf
        return r * (1.0 - self.u_o * torch.sign(r)) - self.sigma

    def upper(self, r: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        r = r.double()
        return r * (1.0 + self.u_o * torch.sign(r)) + self.sigma + self.G[rows][:, None] + self.G[cols]


def eps_n(d: int) -> float:
    """Relative error bound of the squared norms ``n̂`` of the centred points (a
    float64 sum of squares of float64 centred coordinates; the float32 bound covers
    it with room): γ_d, a few u32, and x32 vs x (≤ 3u32); squares lost to underflow
    (≤ (d + 8) 2⁻¹²⁶ absolute) are in the σ of the key bounds."""
    return _gamma(d, _U32) + 8 * _U32


def prepare(xn, rows, centre, scale, precision: str, n_pad: int):
    """One compiled pass over the points ``rows`` of ``xn``: the centred, scaled,
    rounded operands of ``precision``. Returns (n̂ (u,) float64 squared norms of the
    centred points, largest ``|x|``, operand state for :func:`operands`). A NaN or
    infinite coordinate makes its ``n̂`` non-finite."""
    u, d = rows.shape[0], xn.shape[1]
    nhat = np.empty(u)
    parts = np.linspace(0, u, min(u, 4 * max(1, torch.get_num_threads())) + 1).astype(np.int64)
    if precision == "bf16":
        A = torch.empty((n_pad, d + 4), dtype=torch.bfloat16)
        B = torch.empty((n_pad, d + 4), dtype=torch.bfloat16)
        ne = np.empty(u)
        am = kp.prep_bf16(xn, rows, centre, scale, A.view(torch.int16).numpy().view(np.uint16),
                          B.view(torch.int16).numpy().view(np.uint16), nhat, ne, parts)
        state = (A, B, torch.from_numpy(ne))
    else:
        x32 = torch.empty((n_pad, d), dtype=torch.float32)
        x32[u:] = 0.0
        am = kp.prep_fp32(xn, rows, centre, scale, x32.numpy(), nhat, parts)
        state = (x32,)
    return nhat, float(am.max()) if am.size else 0.0, state


def operands(state, nhat: np.ndarray, n_pad: int, d: int):
    """(tile_fn, tile dtype, :class:`Bounds`) from :func:`prepare`'s state.
    ``tile_fn(i0, i1, j0, j1, out)`` writes the keys of points ``i0:i1`` against
    ``j0:j1`` into ``out``."""
    nh = torch.from_numpy(nhat)
    if len(state) == 3:
        A, B, ne = state
        return _bf16_finish(A, B, nh, ne, eps_n(d), nh.shape[0], n_pad, d)
    return _fp32_operands(state[0], nh, eps_n(d), n_pad, d)


def _fp32_input_roundoff() -> float:
    """Rounding of the inputs of a float32 matmul here: 2⁻²⁴ (IEEE), or 2⁻⁸ if some
    reduced-precision mode (TF32, bf16) could not be switched off; products and sums
    stay in float32 in those modes, so the key bound only needs the wider input
    rounding."""
    g = torch.Generator(device="cpu").manual_seed(12345)
    a = torch.randn(64, 256, generator=g, dtype=torch.float64)
    b = torch.randn(256, 64, generator=g, dtype=torch.float64)
    exact = a @ b
    approx = (a.float() @ b.float()).double()
    bound = _gamma(258, _U32) * (a.abs() @ b.abs())
    if bool(((approx - exact).abs() <= 4 * bound).all()):
        return _U32
    return 2.0 ** -8  # pragma: no cover - only with an unswitchable TF32/bf16 mode



def _fp32_operands(x32, nhat, eps_n, n_pad, d):
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
    u_in = _fp32_input_roundoff()
    c = 2.0 * (2.0 * u_in + u_in * u_in + _gamma(d + 2, _U32) + eps_n + 8 * _U32)
    sigma = (d + 8) * 2.0 ** -120
    half = torch.full((n_pad,), math.inf, dtype=torch.float32)
    half[:n] = ((1.0 - c) * 0.5 * nhat).to(torch.float32)
    G = torch.zeros(n_pad, dtype=torch.float64)
    G[:n] = c * nhat

    def tile(i0, i1, j0, j1, out):
        torch.add(half[i0:i1, None], half[None, j0:j1], out=out)
        out.addmm_(x32[i0:i1], x32[j0:j1].T, alpha=-1.0)
        return out

    return tile, torch.float32, Bounds(0.0, sigma, G)


_U16 = 2.0 ** -8  # bfloat16 unit roundoff (8 significant bits: 7 stored + 1 implicit)
_PAD_KEY = 2.0 ** 100


def _bf16_finish(A, B, nhat, ne, eps_n, n, n_pad, d):
    """bfloat16 keys, ``K = d + 4`` columns, one bf16 matrix product per tile, once
    :func:`prepare` has written ``A[:n, :d] = a`` and ``B[:n, :d] = −a``: the norm
    columns, the padding rows and the bound. ``nhat`` (n,) float64 squared norms,
    ``ne`` (n,) float64 ``‖x32 − a‖``.

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
    :func:`._knn_precision.bf16_keeps_bound` checks the bound on a hard case before the path is used.
    """
    K = d + 4
    A[n:] = 0.0
    B[n:] = 0.0
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
    G = torch.zeros(n_pad, dtype=torch.float64)
    G[:n] = (eps_n * nhat + 2.0 * (g + w + v) + nhat * 2.0 ** -46) * (1 + 2.0 ** -40) + 2.0 ** -1000
    A[:n, d] = H
    A[:n, d + 1] = L
    A[n:, d] = _PAD_KEY  # padding rows and columns get keys of about 2^100
    A[:, d + 2:d + 4] = 1.0
    B[:, d:d + 2] = 1.0
    B[:n, d + 2] = H
    B[:n, d + 3] = L
    B[n:, d + 2] = _PAD_KEY

    def tile(i0, i1, j0, j1, out):
        return torch.mm(A[i0:i1], B[j0:j1].T, out=out)

    u_o = _U16 / (1.0 - _U16)
    sigma = (5 * K + 16) * 2.0 ** -126  # underflow here, and in n̂ (≤ (d + 8) 2⁻¹²⁶)
    return tile, torch.bfloat16, Bounds(u_o, sigma, G)
