"""The compiled loops (numba) of the accumulators' per-batch passes on the CPU.

Torch expresses a per-type residual sum only as several whole-batch operations,
each a pass over memory with a float64 temporary; these loops read the batch once,
keep the float64 work in registers and cache, and write only what is needed. The
arithmetic is that of the torch path (float64 throughout, exact float32→float64
conversion); only the order of the terms in a sum differs (`fastmath` is limited
to re-association and fused multiply-add, so NaN and inf propagate as usual).

Importing this module imports numba (through :mod:`embgeom._numba`, which selects
its threading layer); loading the cached machine code happens on each function's
first call. Nothing imports it until a compiled loop is about to run.
"""
from __future__ import annotations

import numpy as np

from .._numba import numba as _numba

numba = _numba()

from llvmlite import ir as _ir  # noqa: E402
from numba import prange  # noqa: E402
from numba.core import cgutils as _cg  # noqa: E402
from numba.extending import intrinsic as _intrinsic  # noqa: E402

_FASTMATH = {"reassoc", "contract"}


@_intrinsic
def _prefetch(typingctx, arr, row, col):
    """Hint the CPU to fetch the cache line holding arr[row, col] (LLVM's
    prefetch: read, keep in all cache levels). Rows read in a permuted order
    defeat the hardware prefetcher at every row start; this starts the next
    row's loads while the current one is summed."""
    sig = numba.types.void(arr, row, col)

    def codegen(context, builder, signature, args):
        aty = signature.args[0]
        ary = context.make_array(aty)(context, builder, args[0])
        ptr = _cg.get_item_pointer2(
            context, builder, ary.data, _cg.unpack_tuple(builder, ary.shape),
            _cg.unpack_tuple(builder, ary.strides), aty.layout, [args[1], args[2]])
        i8p = _ir.IntType(8).as_pointer()
        i32 = _ir.IntType(32)
        fnty = _ir.FunctionType(_ir.VoidType(), [i8p, i32, i32, i32])
        fn = _cg.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(ptr, i8p), _ir.Constant(i32, 0), _ir.Constant(i32, 3),
                          _ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen

@numba.njit(cache=True, nogil=True, parallel=True, fastmath=_FASTMATH)
def type_residual_sums(x, order, starts, rows, ref, new, s1, s2, chunks):  # pragma: no cover - compiled
    """For each group g (rows order[starts[g]:starts[g+1]] of x, one token
    type), with y = float64(x[row]) − ref[rows[g]]:
    s1[g] = Σ y (written, not added), s2[g] = Σ ‖y‖². Where new[g], the
    reference row is first set to the group's first vector. `chunks` splits the
    groups into balanced runs (see row_chunks), one per parallel task."""
    n = x.shape[0]
    m = starts.shape[0]
    d = x.shape[1]
    line = 64 // x.itemsize
    for c in prange(chunks.shape[0] - 1):
        for g in range(chunks[c], chunks[c + 1]):
            end = starts[g + 1] if g + 1 < m else n
            r = rows[g]
            if new[g]:
                first = order[starts[g]]
                for j in range(d):
                    ref[r, j] = np.float64(x[first, j])
            for j in range(d):
                s1[g, j] = 0.0
            acc = 0.0
            for i in range(starts[g], end):
                src = order[i]
                if i + 2 < n:  # two rows ahead: a row takes about a miss's latency
                    ahead = order[i + 2]
                    for j in range(0, d, line):
                        _prefetch(x, ahead, j)
                for j in range(d):
                    y = np.float64(x[src, j]) - ref[r, j]
                    s1[g, j] += y
                    acc += y * y
            s2[g] = acc

@numba.njit(cache=True, nogil=True, parallel=True, fastmath=_FASTMATH)
def merge_type_sums(rows, counts_b, s1, s2, mean, m2, counts):  # pragma: no cover - compiled
    """Chan et al. update of state rows `rows` (distinct) from batch sums about
    the rows' current means (see type_residual_sums): with n_b, Σy, Σ‖y‖²,
    n = n_a + n_b: μ += Σy/n, S += Σ‖y‖² − ‖Σy‖²/n_b (clamped at 0) + (‖Σy‖²/n_b)·n_a/n."""
    d = s1.shape[1]
    for g in prange(rows.shape[0]):
        r = rows[g]
        na = counts[r]
        nb = counts_b[g]
        nt = na + nb
        q = 0.0
        for j in range(d):
            q += s1[g, j] * s1[g, j]
        qc = q / nb
        within = s2[g] - qc
        if within < 0.0:
            within = 0.0
        m2[r] = m2[r] + within + qc * (na / nt)
        inv = 1.0 / nt
        for j in range(d):
            mean[r, j] += s1[g, j] * inv
        counts[r] = nt

# ------------------------------------------------------------ token grouping
_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: odd, well mixed

@numba.njit(cache=True, nogil=True)
def _group_sorted(ids):  # pragma: no cover - compiled
    """`group_ids` of ids already in ascending order: the groups are runs."""
    n = ids.shape[0]
    m = 0
    for i in range(n):
        if i == 0 or ids[i] != ids[i - 1]:
            m += 1
    starts = np.empty(m, dtype=np.int64)
    inverse = np.empty(n, dtype=np.int64)
    g = -1
    for i in range(n):
        if i == 0 or ids[i] != ids[i - 1]:
            g += 1
            starts[g] = i
        inverse[i] = g
    uniq = ids[starts]
    counts = np.empty(m, dtype=np.int64)
    for j in range(m):
        end = starts[j + 1] if j + 1 < m else n
        counts[j] = end - starts[j]
    perm = np.arange(n)
    return True, uniq, counts, perm, starts, inverse, inverse.copy(), starts.copy()


@numba.njit(cache=True, nogil=True)
def group_ids(ids):  # pragma: no cover - compiled
    """Group a batch's int64 ids in O(n) (a hash table of the distinct ids, then
    a counting sort of the rows; only the m distinct ids are sorted).

    Returns (presorted, uniq, counts, perm, starts, sorted_inverse, inverse,
    first): uniq ascending distinct ids, perm the stable order sorting the rows
    by id, starts[g] where group g begins in it, sorted_inverse[i] the group of
    row perm[i], inverse[i] the group of row i, first[g] = perm[starts[g]]."""
    n = ids.shape[0]
    presorted = True
    for i in range(1, n):
        if ids[i] < ids[i - 1]:
            presorted = False
            break
    if presorted:
        return _group_sorted(ids)

    bits = 1
    while (1 << bits) < 2 * n:
        bits += 1
    size = 1 << bits
    shift = np.uint64(64 - bits)
    slot = np.full(size, -1, dtype=np.int64)
    seen = np.empty(n, dtype=np.int64)  # distinct ids in order of first appearance
    seen_first = np.empty(n, dtype=np.int64)
    seen_count = np.zeros(n, dtype=np.int64)
    arrival = np.empty(n, dtype=np.int64)  # each row's group, in arrival numbering
    m = 0
    for i in range(n):
        v = ids[i]
        h = np.int64((np.uint64(v) * _HASH_MUL) >> shift)
        while True:
            s = slot[h]
            if s < 0:
                slot[h] = m
                seen[m] = v
                seen_first[m] = i
                s = m
                m += 1
                break
            if seen[s] == v:
                break
            h = (h + 1) & (size - 1)
        arrival[i] = s
        seen_count[s] += 1
    order = np.argsort(seen[:m])
    rank = np.empty(m, dtype=np.int64)
    for j in range(m):
        rank[order[j]] = j
    uniq = np.empty(m, dtype=np.int64)
    counts = np.empty(m, dtype=np.int64)
    first = np.empty(m, dtype=np.int64)
    starts = np.empty(m, dtype=np.int64)
    pos = 0
    for j in range(m):
        a = order[j]
        uniq[j] = seen[a]
        counts[j] = seen_count[a]
        first[j] = seen_first[a]
        starts[j] = pos
        pos += seen_count[a]
    fill = starts.copy()
    perm = np.empty(n, dtype=np.int64)
    inverse = np.empty(n, dtype=np.int64)
    sorted_inverse = np.empty(n, dtype=np.int64)
    for i in range(n):  # a counting sort: stable
        g = rank[arrival[i]]
        inverse[i] = g
        perm[fill[g]] = i
        sorted_inverse[fill[g]] = g
        fill[g] += 1
    return False, uniq, counts, perm, starts, sorted_inverse, inverse, first

@numba.njit(cache=True, nogil=True)
def lookup_rows(sorted_ids, sorted_rows, ids, next_row):  # pragma: no cover - compiled
    """Rows of `ids` (ascending, distinct) in an index (sorted_ids ascending,
    sorted_rows their rows), by one merge walk. Ids not in the index get the
    rows next_row, next_row + 1, … in order. Returns (rows, is_new)."""
    m = ids.shape[0]
    k = sorted_ids.shape[0]
    rows = np.empty(m, dtype=np.int64)
    is_new = np.zeros(m, dtype=np.bool_)
    j = 0
    nxt = next_row
    for i in range(m):
        v = ids[i]
        while j < k and sorted_ids[j] < v:
            j += 1
        if j < k and sorted_ids[j] == v:
            rows[i] = sorted_rows[j]
        else:
            rows[i] = nxt
            is_new[i] = True
            nxt += 1
    return rows, is_new

@numba.njit(cache=True, nogil=True)
def insert_sorted(sorted_ids, sorted_rows, new_ids, first_row):  # pragma: no cover - compiled
    """The index (sorted_ids, sorted_rows) with new_ids (ascending, none in it)
    merged in at rows first_row, first_row + 1, …: one merge walk."""
    k = sorted_ids.shape[0]
    p = new_ids.shape[0]
    out_ids = np.empty(k + p, dtype=np.int64)
    out_rows = np.empty(k + p, dtype=np.int64)
    a = 0
    b = 0
    for o in range(k + p):
        if b == p or (a < k and sorted_ids[a] < new_ids[b]):
            out_ids[o] = sorted_ids[a]
            out_rows[o] = sorted_rows[a]
            a += 1
        else:
            out_ids[o] = new_ids[b]
            out_rows[o] = first_row + b
            b += 1
    return out_ids, out_rows
