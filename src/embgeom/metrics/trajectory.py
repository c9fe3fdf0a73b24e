"""Per-sequence geometry of a window's hidden states: curvature and prompt entropy.

Both after Skean et al. (2025), "Layer by Layer: Uncovering Hidden Representations
in Language Models", ICML. A sequence is H (n, d), its rows the hidden states of
consecutive tokens at one layer.

- curvature: the mean over t of the angle (radians) between consecutive steps
  v_t = h_{t+1} − h_t and v_{t+1}: arccos(v_t·v_{t+1} / (‖v_t‖ ‖v_{t+1}‖)).
- prompt entropy: the α-order (Rényi) entropy of the spectrum of the Gram matrix
  K = H Hᵀ (rows not centred) normalised by its trace, p_i = λ_i / tr K:
  S_α = log(Σ p_i^α) / (1 − α), and −Σ p_i log p_i at α = 1 (nats).

The batched forms (`window_curvatures`, `window_entropies`, and `window_measures`
for both) take many windows at once as their rows laid end to end, padded to the
longest window, in float64; the entropy decomposes the smaller of each window's
n × n Gram H Hᵀ and its d × d counterpart Hᵀ H (the same non-zero eigenvalues),
never anything larger. When that is H Hᵀ, `window_measures` reads the curvature's
step lengths and products off it too, in the windows where every cosine is then
provably within 1e-10 of its exact value (`window_curvatures`), so the rows are
read once.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import EmbgeomError

__all__ = ["curvature", "prompt_entropy", "window_curvatures", "window_entropies", "window_grams", "window_measures",
           "padded_windows"]


_POOL: dict = {}


def _cpu_eigvalsh(G: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a batch of small symmetric matrices on the CPU. LAPACK's own
    threads only wait on each other at n ~ 100, so each matrix is decomposed on one
    thread, and the batch is shared among as many threads as torch may use (each
    matrix is decomposed by the same routine either way: the values do not depend
    on the sharing)."""
    threads = torch.get_num_threads()
    parts = min(threads, G.shape[0])
    torch.set_num_threads(1)
    try:
        if parts <= 1:
            return torch.linalg.eigvalsh(G)
        pool = _POOL.get(parts)
        if pool is None:
            from concurrent.futures import ThreadPoolExecutor

            pool = _POOL[parts] = ThreadPoolExecutor(parts, thread_name_prefix="embgeom-eigvalsh")
        return torch.cat(list(pool.map(torch.linalg.eigvalsh, torch.tensor_split(G, parts))))
    finally:
        torch.set_num_threads(threads)


def _check_alpha(alpha) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError) as exc:
        raise EmbgeomError(f"alpha must be a positive number, got {alpha!r}") from exc
    if not (a > 0 and math.isfinite(a)):
        raise EmbgeomError(f"alpha must be a positive number, got {alpha!r}")
    return a


def padded_windows(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, n_max, d) float64 from rows laid end to end (window b holds lengths[b]
    consecutive rows), padded with zero rows."""
    lengths = lengths.to(device=x.device, dtype=torch.long)
    B = lengths.numel()
    n = int(lengths.max()) if B else 0
    if B and n * B == x.shape[0]:  # every window full: the rows are already laid out
        return x.to(torch.float64).reshape(B, n, x.shape[1])
    out = torch.zeros(B, n, x.shape[1], dtype=torch.float64, device=x.device)
    if x.shape[0]:
        win = torch.repeat_interleave(torch.arange(B, device=x.device), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        pos = torch.arange(x.shape[0], device=x.device) - starts[win]
        out[win, pos] = x.to(torch.float64)
    return out


def window_curvatures(P: torch.Tensor, lengths: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) float64 curvature of each padded window of `P` (B, n, d); NaN for a
    window of fewer than 3 rows. A zero step (two equal consecutive states) has no
    direction: the angles it takes part in are left out of its window's mean.

    With `gram`, the windows' Gram P Pᵀ (B, n, n), the steps' lengths and dot
    products are read off it (‖v_t‖² = K_{t,t} − 2K_{t,t+1} + K_{t+1,t+1}, and
    likewise v_t·v_{t+1}) wherever every cosine of the window is provably within
    1e-10 of its exact value; the other windows (short steps between long
    states, zero steps) are computed from the rows."""
    lengths = lengths.to(device=P.device, dtype=torch.long)
    if gram is None:
        return _curvatures_from_rows(P, lengths)
    out, trusted = _curvatures_from_gram(gram, lengths, P.shape[2])
    redo = torch.nonzero(~trusted).squeeze(1)
    if redo.numel():
        out[redo] = _curvatures_from_rows(P[redo], lengths[redo])
    return out


def _mean_angles(dots, den, valid):
    """Mean over t of arccos(dots/den) where valid, per window; NaN where none is."""
    cos = torch.where(valid, dots / torch.where(valid, den, 1.0), 0.0).clamp_(-1.0, 1.0)
    angle = torch.where(valid, torch.arccos(cos), 0.0)
    count = valid.sum(1)
    return torch.where(count > 0, angle.sum(1) / count.clamp(min=1), math.nan)


def _angle_slots(B, n, lengths, device):
    """(B, n − 2) mask of the angles t that lie inside each window."""
    t = torch.arange(max(n - 2, 0), device=device)
    return t[None, :] < (lengths[:, None] - 2)


def _curvatures_from_rows(P, lengths):
    B, n = P.shape[:2]
    if n < 3:
        return torch.full((B,), math.nan, dtype=torch.float64, device=P.device)
    v = P[:, 1:] - P[:, :-1]
    norm = torch.linalg.vector_norm(v, dim=2)
    dots = torch.linalg.vecdot(v[:, :-1], v[:, 1:])
    den = norm[:, :-1] * norm[:, 1:]
    return _mean_angles(dots, den, _angle_slots(B, n, lengths, P.device) & (den > 0))


# Rounding of a dot product of d terms: |fl(x·y) − x·y| ≤ γ_d ‖x‖‖y‖ (Higham, 2002,
# eq. 3.5), γ_d = d·u / (1 − d·u). A step's squared length or two steps' product,
# formed from four Gram entries in three operations, is then off by at most
# E = (2γ_d + 6u)·A, with A = ‖h_t‖² + ‖h_{t+1}‖² + ‖h_{t+2}‖² (xy ≤ (x² + y²)/2).
# The cosine v_t·v_{t+1} / √(‖v_t‖²‖v_{t+1}‖²) is then off by at most, to first
# order, E/√(‖v_t‖²‖v_{t+1}‖²) + E/(2‖v_t‖²) + E/(2‖v_{t+1}‖²) + 4u
# ≤ 2E / min(‖v_t‖², ‖v_{t+1}‖²) + 4u.
_COSINE_TOLERANCE = 1e-10


def _curvatures_from_gram(G, lengths, d):
    """(values, trusted): curvatures from the Gram, and which windows' cosines are
    all within _COSINE_TOLERANCE (the others' values are to be recomputed)."""
    B, n = G.shape[:2]
    if n < 3:
        return torch.full((B,), math.nan, dtype=torch.float64, device=G.device), torch.ones(
            B, dtype=torch.bool, device=G.device)
    u = torch.finfo(torch.float64).eps / 2
    gamma = d * u / (1 - d * u)
    a = torch.diagonal(G, 0, 1, 2)
    b = torch.diagonal(G, 1, 1, 2)
    c = torch.diagonal(G, 2, 1, 2)
    sq = a[:, 1:] + a[:, :-1] - 2.0 * b  # ‖v_t‖²
    dots = b[:, 1:] + b[:, :-1] - a[:, 1:-1] - c  # v_t·v_{t+1}
    positive = (sq[:, :-1] > 0) & (sq[:, 1:] > 0)
    den = torch.sqrt(torch.where(positive, sq[:, :-1] * sq[:, 1:], 0.0))
    inside = _angle_slots(B, n, lengths, G.device)
    # the bound above, with E doubled for the rounding of E's own terms
    bound = 4.0 * (2.0 * gamma + 6.0 * u) * (a[:, :-2] + a[:, 1:-1] + a[:, 2:])
    sure = positive & (bound <= (_COSINE_TOLERANCE - 4.0 * u) * torch.minimum(sq[:, :-1], sq[:, 1:]))
    trusted = (sure | ~inside).all(1)
    return _mean_angles(dots, den, inside & positive), trusted


def window_grams(P: torch.Tensor) -> torch.Tensor:
    """The smaller of each padded window's Gram matrices: P Pᵀ (B, n, n) when
    n ≤ d, else Pᵀ P (B, d, d). Both have the same non-zero eigenvalues."""
    Pt = P.transpose(1, 2)
    return torch.bmm(P, Pt) if P.shape[1] <= P.shape[2] else torch.bmm(Pt, P)


def window_entropies(P: torch.Tensor, alpha: float = 1.0, gram: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) float64 prompt entropy of each padded window of `P` (B, n, d): the
    spectrum of the Gram P Pᵀ, or of Pᵀ P when d < n (zero padding rows add zero
    eigenvalues, which add nothing); NaN for an empty or all-zero window. Eigenvalues below
    n·ε·λ_max are rounding noise of zero ones and count as zero. `gram`: the
    windows' `window_grams(P)`, when already formed."""
    alpha = _check_alpha(alpha)
    B = P.shape[0]
    if P.shape[1] == 0:
        return torch.full((B,), math.nan, dtype=torch.float64, device=P.device)
    # P Pᵀ (n × n) and Pᵀ P (d × d) share their non-zero spectrum: the smaller one
    # is decomposed (the zeros only the larger one has add nothing to any S_α).
    G = window_grams(P) if gram is None else gram
    lam = _cpu_eigvalsh(G) if G.device.type == "cpu" else torch.linalg.eigvalsh(G)
    # Eigenvalues within rounding of zero (the Gram of n rows in d < n dimensions has
    # n − d of them) count as zero: at α < 1 their p^α would add up otherwise.
    tiny = lam.shape[1] * torch.finfo(lam.dtype).eps * lam[:, -1:].clamp(min=0.0)
    lam = torch.where(lam > tiny, lam, 0.0)
    total = lam.sum(1, keepdim=True)
    p = lam / torch.where(total > 0, total, 1.0)
    if alpha == 1.0:
        s = -torch.special.xlogy(p, p).sum(1)
    else:
        s = torch.log((p ** alpha).sum(1)) / (1.0 - alpha)
    return torch.where(total[:, 0] > 0, s, math.nan)


def window_measures(P: torch.Tensor, lengths: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """(2, B) float64: each padded window's curvature and prompt entropy, from one
    Gram per window (the curvature reads its steps off P Pᵀ when that is the Gram
    formed, see `window_curvatures`)."""
    G = window_grams(P) if P.shape[1] else None
    rows_gram = G is not None and G.shape[1] == P.shape[1]  # P Pᵀ (n × n), not Pᵀ P (d × d, d < n)
    return torch.stack([window_curvatures(P, lengths, G if rows_gram else None),
                        window_entropies(P, alpha, G)])


def _sequence(H) -> torch.Tensor:
    if isinstance(H, torch.Tensor):
        t = H.detach().to("cpu", torch.float64)
    else:
        t = torch.from_numpy(np.asarray(H, dtype=np.float64))
    if t.ndim != 2:
        raise EmbgeomError(f"H must be a 2-d array (tokens, features), got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise EmbgeomError("H holds NaN or infinite values")
    return t


def curvature(H) -> float:
    """Mean angle (radians) between consecutive steps of the sequence H (n, d):
    mean over t of arccos(cos(v_t, v_{t+1})), v_t = h_{t+1} − h_t. 0 for a straight
    path; NaN for fewer than 3 rows (no pair of steps).

    Reference: Skean et al. (2025), "Layer by Layer: Uncovering Hidden
    Representations in Language Models", ICML.

    Parameters
    ----------
    H : (n, d) array or tensor, the hidden states of n consecutive tokens.

    >>> import numpy as np
    >>> from embgeom import curvature
    >>> t = np.linspace(0, 1, 5)
    >>> round(curvature(np.stack([t, 2 * t], 1)), 6)  # a straight line
    0.0
    >>> round(curvature(np.array([[0, 0], [1, 0], [1, 1], [0, 1.0]])), 4)  # right angles
    1.5708
    """
    t = _sequence(H)
    return float(window_curvatures(t[None], torch.tensor([t.shape[0]]))[0])


def prompt_entropy(H, alpha: float = 1.0) -> float:
    """α-order matrix entropy of the sequence H (n, d), in nats: with p_i the
    eigenvalues of K = H Hᵀ (rows not centred) divided by tr K,
    S_α = log(Σ p_i^α) / (1 − α), and −Σ p_i log p_i at α = 1.
    0 for one token (or rank one); log n at most. NaN when every row is zero.

    Reference: Skean et al. (2025), "Layer by Layer: Uncovering Hidden
    Representations in Language Models", ICML.

    Parameters
    ----------
    H : (n, d) array or tensor, the hidden states of n consecutive tokens.
    alpha : the order α > 0 (1: the Shannon (von Neumann) entropy).

    >>> import numpy as np
    >>> from embgeom import prompt_entropy
    >>> round(prompt_entropy(np.eye(4)), 4)  # orthogonal rows of equal norm: log 4
    1.3863
    """
    t = _sequence(H)
    return float(window_entropies(t[None], alpha)[0])
