"""Exact k-nearest-neighbour distances (Euclidean), fast and memory-bounded.

The intrinsic-dimension estimators need, for every point, the distances to its ``k``
nearest *other* points, exactly as a float64 brute force gives them. A float64
brute force costs ``2 n² d`` float64 flops plus an ``n × n`` partial sort; this
module returns the same numbers from low-precision matrix products that only *propose*
candidates, with a proven error bound deciding what must be checked in float64:

1. **Duplicates.** Exactly equal rows are grouped first (a hash of a few columns
   proposes, a full hash and a comparison confirm); the k-NN is computed on the
   distinct points and expanded (a copy's other copies are neighbours at distance
   0). Self-matches are excluded by index, never by distance.
2. **Candidates (bfloat16 or float32, blocked, symmetric).** One pass over the
   distinct points centres them (on the mean of a sample: distances do not change;
   it shrinks the norms, to which the error bound is proportional) and rounds them
   to the operands. For blocks ``I ≤ J`` one matrix product gives the tile of *keys*
   ``r_ij ≈ D_ij = ‖x_i − x_j‖²/2``; a tile serves the rows of ``I`` and, transposed,
   the rows of ``J``, which halves the flops. Every key comes with a proven interval
   ``lower(r) ≤ D_ij ≤ upper(r)`` (:mod:`._knn_bounds`): bfloat16 keys (rows
   ``[a_i, H_i, L_i, 1, 1]`` times columns ``[−a_j, 1, 1, H_j, L_j]``, width of the
   interval about 0.35 % of ``‖x_i‖² + ‖x_j‖²`` on real hidden states) or float32
   keys. ``precision="auto"`` takes the faster of the two on this CPU, measured
   (:mod:`._knn_precision`); an emulated bf16 is never taken.
   Diagonal tiles go first: each point's ``p = k + margin`` smallest keys within its
   own block give an upper bound ``τ_i`` of its k-th neighbour's distance; every
   other tile is read once, each key screened against its row's and its column's
   ``τ``, the survivors kept in sorted lists, and ``τ`` tightens as they accumulate.
   A point skipped by the screen is provably farther than the k-th neighbour.
   Memory: one ``block_size²`` tile plus ``n × p`` candidates and the operands
   (two bf16 copies or one float32 copy); never an ``n × n`` matrix.
3. **Exact distances (float64).** The ``k`` candidates with the smallest keys are
   recomputed from the original coordinates as sums of squared differences; then,
   per row, every further kept candidate whose lower bound does not exclude it.
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

Each step is one compiled CPU loop (numba; :mod:`._knn_points`, :mod:`._knn_tiles`)
around torch's matrix products. float32 input is read as it is (its exact distances
are those of its float64 values; no float64 copy). A tensor on an accelerator is
searched on the CPU (its result comes back on its device): the scans, not the
products, bound the search. Float32 products are forced to IEEE precision for the
duration of the call (TF32/bf16 "fast fp32" modes are switched off and restored).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import _numba
from .._validate import as_float_matrix
from ..errors import EmbgeomError

__all__ = ["knn", "knn_distances", "extend_knn_distances"]

_SUBHASH_COLS = 16  # columns of the cheap first duplicate hash


def _hash_weights(d: int) -> np.ndarray:
    """The fixed random projection (weights in [0.5, 1.5)) that hashes rows."""
    return np.random.default_rng(0x5EED).random(d) + 0.5


def _first_hash(xn: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Σ_j x_j w_j over the first few columns, column by column, so that every row's
    hash is the same sum in the same order (a BLAS product may sum the tail rows of
    a block in another order and split copies)."""
    with np.errstate(over="ignore", invalid="ignore"):
        h = xn[:, 0].astype(np.float64) * w[0]
        for j in range(1, min(xn.shape[1], _SUBHASH_COLS)):
            h += xn[:, j] * w[j]
    return h


def _groups(xn: np.ndarray):
    """Groups of exactly equal rows: None when all rows differ, else (representative
    rows (u,) ascending, group of each row (n,)), numpy int64.

    A hash of the first few columns proposes; the rows it cannot separate get a
    hash of all columns, and rows with equal full hashes are compared with the
    first of them, so the grouping is exact (a row that merely shares a hash stays
    on its own; NaN never equals anything)."""
    from . import _knn_points as kp

    n, d = xn.shape
    w = _hash_weights(d)
    h1 = _first_hash(xn, w)
    tiny = w * 2.0 ** -1000  # sums of huge values overflow: hash the rows scaled by a
    if not np.isfinite(h1).all():  # power of two (NaN rows stay NaN, equal to nothing)
        w = tiny
        h1 = _first_hash(xn, w)
    hs = np.sort(h1)
    eq = hs[1:] == hs[:-1]
    if not eq.any():
        return None
    cand = np.flatnonzero(np.isin(h1, hs[1:][eq]))  # the rows whose first hash repeats
    h2 = np.empty(cand.shape[0])
    kp.row_hash(xn, cand, w, h2)
    if w is not tiny and not np.isfinite(h2).all():
        kp.row_hash(xn, cand, tiny, h2)
    rep = np.arange(n, dtype=np.int64)
    kp.group_runs(xn, cand, h2, rep)
    isrep = rep == np.arange(n)
    if isrep.all():
        return None
    return np.flatnonzero(isrep), (np.cumsum(isrep) - 1)[rep]


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


def _as_cpu_floats(X: torch.Tensor) -> torch.Tensor:
    """``X`` as a contiguous CPU float32 or float64 tensor (other dtypes convert to
    float64 exactly; float32 and float64 are not copied when already contiguous)."""
    X = X.detach()
    if X.dtype not in (torch.float32, torch.float64):
        X = X.to(torch.float64)
    return X.cpu().contiguous()


def _nonfinite(name: str) -> EmbgeomError:
    return EmbgeomError(f"{name} contains NaN or infinite values; remove or fix those rows first")


def _search_distinct(X, rows, k, block, margin, precision, name):
    """(sq, nb, info) of the distinct points ``rows`` of the CPU tensor ``X``, and the
    power-of-two exponent ``e0`` by which they were rescaled (0 when not)."""
    from . import _knn_core

    res = _knn_core.search(X, X.numpy(), rows, k, block, margin, precision)
    e0 = 0
    if res is None:  # extreme magnitudes: rescale the distinct points by a power of two
        amax = float(np.abs(X.numpy()[rows]).max())
        e0 = math.frexp(amax)[1]
        Xs = X[torch.from_numpy(rows)].to(torch.float64) * (2.0 ** (-e0 // 2)) * (2.0 ** (-e0 - (-e0 // 2)))
        res = _knn_core.search(Xs, Xs.numpy(), np.arange(rows.shape[0], dtype=np.int64), k, block, margin,
                               precision)
    if res is None or isinstance(res, str):
        raise _nonfinite(name)
    return res, e0


def _knn_cpu(X, k, block, margin, precision, name):
    """:func:`knn` of a contiguous CPU float32/float64 tensor (``_numba.LOCK`` held)."""
    n = X.shape[0]
    groups = _groups(X.numpy())
    rows = np.arange(n, dtype=np.int64) if groups is None else groups[0]
    nu = rows.shape[0]
    ku = min(k, nu - 1)
    e0 = 0
    if ku == 0:  # every point is the same
        if not np.isfinite(X.numpy()[0]).all():
            raise _nonfinite(name)
        sq, nb = torch.zeros((1, 1), dtype=torch.float64), torch.zeros((1, 1), dtype=torch.int64)
        info = {"precision": None, "chosen_by": None, "tile_seconds": {}, "n_distinct": 1, "k": 0,
                "fallback_rows": 0}
    else:
        (sq, nb, info), e0 = _search_distinct(X, rows, ku, block, margin, precision, name)
    if groups is not None:
        group = torch.from_numpy(groups[1])
        sq, nb = _expand(sq, nb, group, torch.bincount(group, minlength=nu), k)
    # numpy's square root (correctly rounded, as torch's) skips torch's thread pool
    np.sqrt(sq.numpy(), out=sq.numpy())
    if e0:
        sq.mul_(2.0 ** (e0 // 2)).mul_(2.0 ** (e0 - e0 // 2))
    info.update(n=n, rescaled=bool(e0))
    return sq, nb, info


def knn(X, k: int, *, block_size: int = 2048, margin: int | None = None, name: str = "X",
        precision: str = "auto", return_info: bool = False):
    """Exact Euclidean ``k``-nearest-neighbour distances and indices of every point.

    The float64 brute-force answer (``d_ij = √Σ_l (x_il − x_jl)²``), from
    low-precision candidates certified by a proven error bound (module docstring).

    Parameters
    ----------
    X : (n, d) numpy array or torch tensor, any real dtype; CPU or accelerator (the
        search runs on the CPU; the result comes back on ``X``'s device).
    k : number of neighbours, ``1 ≤ k ≤ n − 1``. The point itself is never its own
        neighbour (excluded by index); exact duplicates are neighbours at distance 0.
    block_size : points per tile side. Memory: one ``block_size²`` tile (bf16 or
        float32), ``n · (k + margin) · 12`` bytes of candidates, and the operands:
        with bf16 two bf16 copies of X (``2 n (d + 4) · 2`` bytes), with float32 one
        float32 copy. float32 and float64 X are read as they are (other dtypes are
        converted to float64); the float64 fallback, when some rows need it, makes a
        float64 copy of the distinct rows.
    margin : extra candidates kept per point beyond ``k`` (default ``max(8, k)``
        with bf16 candidates, 8 with float32); only speed depends on it.
    precision : precision of the candidate search: ``"auto"`` (the faster of bf16
        and float32 on this CPU, timed once per process and width on one tile;
        bf16 only where the CPU multiplies it in hardware), ``"bf16"`` (float32
        where bf16 products do not keep the bound) or ``"fp32"``. Only speed
        depends on it; the result is the float64 brute-force answer in every case.
    return_info : also return the diagnostics (a dict): ``precision`` used,
        ``chosen_by`` ("measured" or "given"), ``tile_seconds`` {bf16, fp32} (the
        timings "auto" compared; None where not timed), ``bf16_native``, ``n``,
        ``n_distinct``, ``k``, ``p`` (list length), ``fallback_rows`` (rows the
        certificate sent to float64 keys), ``evaluated_beyond_k``, ``most_needed``,
        ``rescaled``.

    Returns
    -------
    (distances, indices) or, with ``return_info``, (distances, indices, info):
    (n, k) float64 distances ascending per row and int64 neighbour indices, torch
    tensors on ``X``'s device. Among exactly tied distances the order of indices is
    arbitrary.

    Example
    -------
    >>> dist, idx = knn(np.random.default_rng(0).standard_normal((1000, 32)), 5)
    """
    X = as_float_matrix(X, name=name)
    n, d = X.shape
    k = _check_k(k, n)
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 16:
        raise EmbgeomError(f"block_size must be an integer ≥ 16, got {block_size!r}")
    if margin is not None and (not isinstance(margin, int) or isinstance(margin, bool) or margin < 0):
        raise EmbgeomError(f"margin must be a non-negative integer, got {margin!r}")
    if precision not in ("auto", "bf16", "fp32"):
        raise EmbgeomError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    if not _numba.AVAILABLE:
        raise EmbgeomError("the exact k-NN needs numba (a dependency of embgeom); pip install numba")
    block = (block_size // 16) * 16
    with _numba.parallel():
        dist, nb, info = _knn_cpu(_as_cpu_floats(X), k, block, margin, precision, name)
    dist, nb = dist.to(X.device), nb.to(X.device)
    return (dist, nb, info) if return_info else (dist, nb)


def knn_distances(X, k: int, *, block_size: int = 2048, margin: int | None = None, name: str = "X",
                  precision: str = "auto", return_info: bool = False):
    """Exact distances to the ``k`` nearest other points: (n, k) float64 torch tensor,
    ascending per row, on ``X``'s device; with ``return_info``, (distances, info).
    See :func:`knn`.

    >>> knn_distances(np.eye(4), 1)[:, 0]   # tensor([1.4142, 1.4142, 1.4142, 1.4142], ...)
    """
    out = knn(X, k, block_size=block_size, margin=margin, name=name, precision=precision, return_info=return_info)
    return (out[0], out[2]) if return_info else out[0]


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
    from . import _knn_core

    inside = inside.cpu()
    out_rows = (~inside).nonzero().squeeze(1)
    n_out = int(out_rows.shape[0])
    # (n − m, n) exact squared distances of the points outside to every point, by the
    # compiled loop of the search's own exact distances
    a = out_rows.repeat_interleave(n)
    b = torch.arange(n).repeat(n_out)
    with _numba.parallel():
        sq = _knn_core._pairs(_as_cpu_floats(X), a, b).view(n_out, n)
    sq[torch.arange(n_out), out_rows] = math.inf  # not their own neighbour
    to_out = sq.sqrt_()
    dist = torch.empty((n, k), dtype=torch.float64)
    dist[out_rows] = torch.topk(to_out, k, dim=1, largest=False, sorted=True).values
    in_rows = inside.nonzero().squeeze(1)
    merged = torch.cat([inside_distances[:, :q_needed].to("cpu", torch.float64), to_out[:, in_rows].T], dim=1)
    dist[in_rows] = torch.topk(merged, k, dim=1, largest=False, sorted=True).values
    dist = dist.to(X.device)
    return dist
