"""TokenMoments (per-token-type Q, M, V; paper B) and the norm–variance trade-off.

Every number is checked against an independent float64 two-pass numpy reference.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
import torch

from embgeom.errors import EmbgeomError
from embgeom.metrics.tradeoff import norm_variance_tradeoff
from embgeom.stats.token_moments import TokenGroups, TokenMoments

D = 24


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are small: one intra-op thread avoids OpenMP barrier stalls when
    the cores are shared (pytest -n 2 on two cores). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- data
def zipf_ids(rng, n, vocab=400):
    """Zipf(1.3) type indices folded into `vocab` types, mapped to arbitrary int64
    ids (huge, negative, unordered) so nothing relies on small ids."""
    idx = (rng.zipf(1.3, n) - 1) % vocab
    table = np.unique(rng.integers(-(2**62), 2**62, size=2 * vocab, dtype=np.int64))
    table = rng.permutation(table)[:vocab]
    return table[idx]


def make_data(kind, n=4000, seed=0, dtype=np.float64):
    """Vectors with type structure. 'far': mean of norm 1e4, spread 1e-3 (M ≫ V, the
    case where V = Q − M fails); 'normal': unit scale."""
    rng = np.random.default_rng(seed)
    ids = zipf_ids(rng, n)
    _, inv = np.unique(ids, return_inverse=True)
    if kind == "far":
        offset = rng.standard_normal(D)
        offset *= 1e4 / np.linalg.norm(offset)
        type_off = 1e-3 * rng.standard_normal((inv.max() + 1, D))
        x = offset + type_off[inv] + 1e-3 * rng.standard_normal((n, D)) * rng.uniform(0.2, 2, (inv.max() + 1, 1))[inv]
    else:
        type_off = rng.standard_normal((inv.max() + 1, D)) * rng.uniform(0, 3, (inv.max() + 1, 1))
        x = type_off[inv] + rng.standard_normal((n, D)) * rng.uniform(0.1, 2, (inv.max() + 1, 1))[inv]
    return x.astype(dtype), ids


def reference(x, ids):
    """Float64 two-pass reference: per type (sorted ids) n, Q, M, V and the
    decomposition over all rows."""
    x = np.asarray(x, dtype=np.float64)
    u, inv, n = np.unique(ids, return_inverse=True, return_counts=True)
    sums = np.zeros((u.size, x.shape[1]))
    np.add.at(sums, inv, x)
    mean = sums / n[:, None]
    resid = x - mean[inv]
    ss = np.zeros(u.size)
    np.add.at(ss, inv, (resid**2).sum(1))
    sq = np.zeros(u.size)
    np.add.at(sq, inv, (x**2).sum(1))
    V = ss / n
    M = (mean**2).sum(1)
    Q = sq / n
    mu = x.mean(0)
    N = x.shape[0]
    dec = {
        "V": float(((x - mu) ** 2).sum(1).mean()),
        "V_within": float((n * V).sum() / N),
        "V_between": float((n * ((mean - mu) ** 2).sum(1)).sum() / N),
    }
    tab = pd.DataFrame({"token_id": u, "n": n, "Q": Q, "M": M, "V": V})
    return tab, dec


def close(a, b, rtol):
    """|a − b| ≤ rtol·|b| elementwise (exact equality where b = 0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    err = np.abs(a - b)
    bad = err > rtol * np.abs(b)
    assert not bad.any(), f"max relative error {np.max(err / np.where(b == 0, 1, np.abs(b))):.3g} > {rtol}"


def assert_tables_close(got, want, rtol):
    np.testing.assert_array_equal(got["token_id"].to_numpy(), want["token_id"].to_numpy())
    np.testing.assert_array_equal(got["n"].to_numpy(), want["n"].to_numpy())
    for col in ("Q", "M", "V"):
        close(got[col], want[col], rtol)


def assert_dec_close(got, want, rtol):
    assert set(got) == {"V", "V_within", "V_between"}
    for key in want:
        close(got[key], want[key], rtol)


def feed(acc, x, ids, batch):
    for a in range(0, len(ids), batch):
        acc.update(x[a : a + batch], ids[a : a + batch])
    return acc


# --------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("kind", ["far", "normal"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_two_pass_reference(kind, dtype):
    x, ids = make_data(kind, dtype=dtype)
    want, want_dec = reference(x, ids)
    before = x.copy()
    acc = feed(TokenMoments(D), x, ids, 700)
    np.testing.assert_array_equal(x, before)  # the input is never written to
    got = acc.table()
    assert list(got.columns) == ["token_id", "n", "Q", "M", "V"]
    assert got["token_id"].dtype == np.int64 and got["n"].dtype == np.int64
    assert all(got[c].dtype == np.float64 for c in "QMV")
    assert acc.n == len(ids) and acc.n_types == len(want)
    assert_tables_close(got, want, 1e-7)
    dec = acc.decomposition()
    assert_dec_close(dec, want_dec, 1e-7)
    # the identities
    close(got["Q"], got["M"] + got["V"], 1e-12)
    close(dec["V"], dec["V_within"] + dec["V_between"], 1e-12)
    if kind == "far":  # the case the sequential V = Q − M gets wrong
        assert (got["M"] > 1e7 * got["V"].max()).all()


@pytest.mark.parametrize("kind", ["far", "normal"])
def test_large_batches_match_reference(kind):
    """Two batches of 1500 rows (frequent types with hundreds of rows each) give the
    reference numbers."""
    x, ids = make_data(kind, n=3000, seed=3, dtype=np.float32)
    want, want_dec = reference(x, ids)
    acc = TokenMoments(D)
    feed(acc, x, ids, 1500)
    assert_tables_close(acc.table(), want, 1e-7)
    assert_dec_close(acc.decomposition(), want_dec, 1e-7)


@pytest.mark.parametrize("kind", ["far", "normal"])
def test_presorted_ids_read_batch_in_place(kind):
    """Rows arriving in id order (the fast path without a gather) give the same
    numbers."""
    x, ids = make_data(kind, n=2500, seed=13, dtype=np.float32)
    want, want_dec = reference(x, ids)
    acc = TokenMoments(D)
    for a in range(0, len(ids), 800):
        order = np.argsort(ids[a : a + 800], kind="stable")
        g = TokenMoments.group(ids[a : a + 800][order])
        assert g.presorted
        acc.update(x[a : a + 800][order], g)
    assert_tables_close(acc.table(), want, 1e-7)
    assert_dec_close(acc.decomposition(), want_dec, 1e-7)


def test_half_precision_input():
    x, ids = make_data("normal", n=1500, seed=4)
    xb = torch.from_numpy(x).to(torch.bfloat16)
    want, _ = reference(xb.to(torch.float64).numpy(), ids)
    acc = feed(TokenMoments(D), xb, torch.from_numpy(ids), 400)
    assert_tables_close(acc.table(), want, 1e-7)


# ------------------------------------------------------- splits, merges, state
@pytest.mark.parametrize("kind", ["far", "normal"])
def test_any_split_and_merge_order_equals_one_pass(kind):
    x, ids = make_data(kind, n=3000, seed=1, dtype=np.float32)
    one = TokenMoments(D)
    one.update(x, ids)
    want, want_dec = one.table(), one.decomposition()

    rng = np.random.default_rng(7)
    # uneven batch boundaries, incl. single rows
    cuts = np.unique(np.concatenate([[0, 1, 2, len(ids)], rng.integers(0, len(ids), 25)]))
    split = TokenMoments(D)
    for a, b in zip(cuts[:-1], cuts[1:]):
        split.update(x[a:b], ids[a:b])
    assert_tables_close(split.table(), want, 1e-10)
    assert_dec_close(split.decomposition(), want_dec, 1e-10)

    # shards: disjoint type sets (A, B) and one overlapping both (C)
    _, inv = np.unique(ids, return_inverse=True)
    in_c = rng.random(len(ids)) < 0.4
    sel_a = (inv % 2 == 0) & ~in_c
    sel_b = (inv % 2 == 1) & ~in_c
    parts = {}
    for name, sel in (("A", sel_a), ("B", sel_b), ("C", in_c)):
        parts[name] = feed(TokenMoments(D), x[sel], ids[sel], 333).state_dict()
    assert set(parts["A"]["token_ids"].tolist()).isdisjoint(parts["B"]["token_ids"].tolist())
    for order in ("ABC", "CBA", "BCA"):
        acc = TokenMoments.from_state_dict(parts[order[0]])
        for name in order[1:]:
            assert acc.merge(TokenMoments.from_state_dict(parts[name])) is acc
        assert acc.n == len(ids)
        assert_tables_close(acc.table(), want, 1e-10)
        assert_dec_close(acc.decomposition(), want_dec, 1e-10)
    # tree merge: (A+B) + (C), into an empty accumulator first
    ab = TokenMoments(D).merge(TokenMoments.from_state_dict(parts["A"])).merge(
        TokenMoments.from_state_dict(parts["B"])
    )
    ab.merge(TokenMoments.from_state_dict(parts["C"]))
    assert_tables_close(ab.table(), want, 1e-10)


def test_merge_self_and_empty():
    x, ids = make_data("normal", n=800, seed=2)
    acc = feed(TokenMoments(D), x, ids, 300)
    before = acc.table()
    acc.merge(TokenMoments(D))
    pd.testing.assert_frame_equal(acc.table(), before)
    doubled = TokenMoments(D)
    doubled.update(np.concatenate([x, x]), np.concatenate([ids, ids]))
    acc.merge(acc)
    assert acc.n == 2 * len(ids)
    assert_tables_close(acc.table(), doubled.table(), 1e-10)


def test_state_dict_round_trip_exact():
    x, ids = make_data("far", n=1500, seed=5, dtype=np.float32)
    acc = feed(TokenMoments(D), x[:1000], ids[:1000], 256)
    buf = io.BytesIO()
    torch.save(acc.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    for v in sd.values():
        assert isinstance(v, (int, str, torch.Tensor))
    back = TokenMoments.from_state_dict(sd)
    assert back.n == acc.n and back.n_types == acc.n_types
    pd.testing.assert_frame_equal(back.table(), acc.table(), check_exact=True)
    assert back.decomposition() == acc.decomposition()
    # and both continue identically
    acc.update(x[1000:], ids[1000:])
    back.update(x[1000:], ids[1000:])
    pd.testing.assert_frame_equal(back.table(), acc.table(), check_exact=True)
    # an empty accumulator round-trips too
    empty = TokenMoments.from_state_dict(TokenMoments(D).state_dict())
    assert empty.n == 0 and len(empty.table()) == 0


def test_grouping_reused_across_layers_is_identical():
    x, ids = make_data("normal", n=2000, seed=6, dtype=np.float32)
    layers = [x, 2.0 * x + 1.0, -x]
    raw = [TokenMoments(D) for _ in layers]
    grouped = [TokenMoments(D) for _ in layers]
    for a in range(0, len(ids), 512):
        g = TokenMoments.group(ids[a : a + 512])
        assert isinstance(g, TokenGroups) and len(g) == len(ids[a : a + 512])
        assert TokenMoments.group(g) is g
        for xl, r, gr in zip(layers, raw, grouped):
            r.update(xl[a : a + 512], ids[a : a + 512])
            gr.update(xl[a : a + 512], g)
    for r, gr in zip(raw, grouped):
        pd.testing.assert_frame_equal(r.table(), gr.table(), check_exact=True)
    want, _ = reference(layers[1], ids)
    assert_tables_close(grouped[1].table(), want, 1e-7)


def test_device_moves():
    x, ids = make_data("normal", n=600, seed=12, dtype=np.float32)
    acc = TokenMoments(D, device="cpu")
    assert acc.device == torch.device("cpu")
    acc.update(torch.from_numpy(x[:300]), TokenGroups(ids[:300], device="cpu").to("cpu"))
    acc.to("cpu").update(x[300:], ids[300:])
    want, _ = reference(x, ids)
    assert_tables_close(acc.table(), want, 1e-7)
    assert "types=" in repr(acc) and "TokenGroups(n=3" in repr(TokenGroups([1, 1, 2]))


def test_group_contents(path):
    g = TokenGroups(np.array([5, -3, 5, 7, -3, 5]))
    assert g.ids.tolist() == [-3, 5, 7]
    assert g.counts.tolist() == [2, 3, 1]
    assert g.first.tolist() == [1, 0, 3]
    assert g.inverse.tolist() == [1, 0, 1, 2, 0, 1]
    assert g.sorted_inverse.tolist() == [0, 0, 1, 1, 1, 2]
    assert not g.presorted and TokenGroups([-3, 5, 5, 7]).presorted
    assert g.perm.tolist() == [1, 4, 0, 2, 5, 3] and g.starts.tolist() == [0, 2, 5]


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 20_000])
def test_compiled_grouping_equals_the_sort(n, monkeypatch):
    """The O(n) grouping (hash table + counting sort) gives exactly what one stable
    sort gives, for extreme int64 ids, heavy repeats, presorted and reversed runs."""
    from embgeom import _numba

    rng = np.random.default_rng(n)
    pool = np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max, -1, 0, 1, 2**32, -(2**32)], dtype=np.int64)
    pool = np.concatenate([pool, rng.integers(-(2**63), 2**63 - 1, size=50, dtype=np.int64)])
    cases = [pool[rng.integers(0, len(pool), n)], zipf_ids(rng, n), np.sort(zipf_ids(rng, n)),
             np.sort(zipf_ids(rng, n))[::-1].copy(), np.full(n, 42, dtype=np.int64)]
    names = ("ids", "counts", "perm", "starts", "first", "inverse", "sorted_inverse")
    for ids in cases:
        fast = TokenGroups(ids)
        with monkeypatch.context() as m:
            m.setattr(_numba, "serves", lambda device: False)
            slow = TokenGroups(ids)
        assert fast.presorted == slow.presorted == bool(np.all(ids[1:] >= ids[:-1]))
        for name in names:
            assert torch.equal(getattr(fast, name), getattr(slow, name)), name


def test_memory_grows_only_with_types_and_capacity_hint():
    x, ids = make_data("normal", n=1000, seed=8)
    acc = TokenMoments(D)
    assert acc.nbytes == 0
    acc.update(x[:10], ids[:10])
    small = acc.nbytes
    feed(acc, x, ids, 250)
    k = acc.n_types
    assert k < len(ids) and acc.capacity < 4 * k + 64
    assert small < acc.nbytes <= acc.capacity * (8 * D + 24) + k * 16
    hinted = TokenMoments(D, capacity=1000)
    hinted.update(x[:10], ids[:10])
    feed(hinted, x, ids, 250)
    assert hinted.capacity == 1000
    pd.testing.assert_frame_equal(hinted.table(), acc.table(), check_exact=True)


def test_empty_batch_is_noop_and_empty_results():
    acc = TokenMoments(D)
    acc.update(np.zeros((0, D), np.float32), [])
    acc.update(torch.zeros(0, D), torch.zeros(0, dtype=torch.int64))
    assert acc.n == 0
    tab = acc.table()
    assert list(tab.columns) == ["token_id", "n", "Q", "M", "V"] and len(tab) == 0
    assert all(math.isnan(v) for v in acc.decomposition().values())
    tr = acc.tradeoff()
    assert tr["n_types"] == 0 and math.isnan(tr["mv_slope"]) and math.isnan(tr["q_cv"])


def test_single_occurrence_and_constant_types():
    x = np.array([[1.0, 2.0], [3.0, 4.0], [3.0, 4.0], [0.0, 0.0]])
    acc = TokenMoments(2)
    acc.update(x, [10, 20, 20, 30])
    tab = acc.table()
    assert tab["n"].tolist() == [1, 2, 1]
    assert tab["V"].tolist() == [0.0, 0.0, 0.0]
    assert tab["M"].tolist() == [5.0, 25.0, 0.0]
    dec = acc.decomposition()
    assert dec["V_within"] == 0.0
    assert dec["V"] == pytest.approx(((x - x.mean(0)) ** 2).sum(1).mean(), rel=1e-14)


# ------------------------------------------------------------------- trade-off
def test_tradeoff_matches_lstsq_and_corrcoef():
    x, ids = make_data("normal", n=6000, seed=9, dtype=np.float32)
    acc = TokenMoments(D)
    acc.update(x, ids)
    tab = acc.table()
    for lo, hi in ((10, 100_000), (3, 50), (2, 2)):
        sel = tab[(tab["n"] >= lo) & (tab["n"] <= hi)]
        got = acc.tradeoff(min_count=lo, max_count=hi)
        np.testing.assert_equal(acc.tradeoff(min_count=lo, max_count=hi, table=tab), got)  # from the caller's table: the same
        assert got["n_types"] == len(sel)
        if len(sel) < 2:
            assert math.isnan(got["mv_slope"])
            continue
        A = np.column_stack([sel["M"], np.ones(len(sel))])
        (slope, intercept), *_ = np.linalg.lstsq(A, sel["V"].to_numpy(), rcond=None)
        resid = sel["V"] - A @ np.array([slope, intercept])
        r2 = 1 - (resid**2).sum() / ((sel["V"] - sel["V"].mean()) ** 2).sum()
        pearson = np.corrcoef(sel["M"], sel["V"])[0, 1]
        assert got["mv_slope"] == pytest.approx(slope, rel=1e-9)
        assert got["mv_intercept"] == pytest.approx(intercept, rel=1e-9)
        assert got["mv_r2"] == pytest.approx(r2, rel=1e-9)
        assert got["mv_pearson"] == pytest.approx(pearson, rel=1e-9)
        assert got["mv_r2"] == pytest.approx(pearson**2, rel=1e-9)
        assert got["q_cv"] == pytest.approx(sel["Q"].std(ddof=0) / sel["Q"].mean(), rel=1e-9)
    assert acc.tradeoff()["n_types"] > 10


def test_tradeoff_degenerate_cases_give_nan():
    out = norm_variance_tradeoff([1.0], [2.0], [3.0], [50])
    assert out["n_types"] == 1 and out["q_cv"] == 0.0
    assert all(math.isnan(out[k]) for k in ("mv_slope", "mv_intercept", "mv_r2", "mv_pearson"))
    out = norm_variance_tradeoff([1.0, 1.0, 1.0], [2.0, 3.0, 4.0], [3.0, 4.0, 5.0], [20, 20, 20])
    assert out["n_types"] == 3 and math.isnan(out["mv_slope"]) and math.isnan(out["mv_pearson"])
    assert out["q_cv"] == pytest.approx(np.std([3.0, 4, 5]) / 4.0)
    out = norm_variance_tradeoff([1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [6.0, 7.0, 8.0], [20, 20, 20])
    assert out["mv_slope"] == 0.0 and out["mv_intercept"] == 5.0 and math.isnan(out["mv_r2"])
    out = norm_variance_tradeoff([], [], [], [])
    assert out["n_types"] == 0 and math.isnan(out["q_cv"])
    # counts outside [min_count, max_count] are left out
    out = norm_variance_tradeoff([1.0, 2.0, 9.0], [4.0, 2.0, 100.0], [5.0, 4.0, 109.0], [10, 10, 9])
    assert out["n_types"] == 2 and out["mv_slope"] == pytest.approx(-2.0) and out["mv_pearson"] == pytest.approx(-1.0)
    with pytest.raises(EmbgeomError, match="lengths"):
        norm_variance_tradeoff([1.0], [1.0, 2.0], [1.0], [1])
    with pytest.raises(EmbgeomError, match="min_count"):
        norm_variance_tradeoff([1.0], [1.0], [1.0], [1], min_count=5, max_count=4)


# ------------------------------------------------------------------ bad input
def test_bad_input_raises_embgeom_error():
    acc = TokenMoments(4)
    x = np.ones((3, 4), np.float32)
    with pytest.raises(EmbgeomError, match="width 5"):
        acc.update(np.ones((3, 5)), [1, 2, 3])
    with pytest.raises(EmbgeomError, match="3 rows"):
        acc.update(x, [1, 2])
    with pytest.raises(EmbgeomError, match="integers"):
        acc.update(x, np.array([1.0, 2.0, 3.0]))
    with pytest.raises(EmbgeomError, match="integers"):
        acc.update(x, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(EmbgeomError, match="shape"):
        acc.update(x, np.array([[1, 2, 3]]))
    with pytest.raises(EmbgeomError, match="shape"):
        acc.update(np.ones(4), [1])
    with pytest.raises(EmbgeomError, match="shape"):
        acc.update(np.ones((2, 3, 4)), [1, 2])
    with pytest.raises(EmbgeomError, match="int64"):
        acc.update(x, np.array([1, 2, 2**63 + 5], dtype=np.uint64))
    with pytest.raises(EmbgeomError, match="3 entries"):
        acc.update(np.ones((2, 4)), TokenMoments.group([1, 2, 3]))
    assert acc.n == 0
    # a NaN leaves the state untouched
    acc.update(x, [1, 2, 2])
    before = acc.table()
    bad = x.copy()
    bad[1, 2] = np.nan
    with pytest.raises(EmbgeomError, match="NaN"):
        acc.update(bad, [1, 5, 2])
    bad[1, 2] = np.inf
    with pytest.raises(EmbgeomError, match="NaN or infinite"):
        acc.update(bad, [1, 5, 2])
    assert acc.n == 3
    pd.testing.assert_frame_equal(acc.table(), before)
    with pytest.raises(EmbgeomError, match="width"):
        acc.merge(TokenMoments(5))
    with pytest.raises(EmbgeomError, match="TokenMoments"):
        acc.merge(object())
    with pytest.raises(EmbgeomError, match="positive integer"):
        TokenMoments(0)
    with pytest.raises(EmbgeomError, match="state_dict"):
        TokenMoments.from_state_dict({"kind": "Moments"})
    sd = acc.state_dict()
    sd["n"] = 99
    with pytest.raises(EmbgeomError, match="inconsistent"):
        TokenMoments.from_state_dict(sd)


def test_nan_in_a_late_type_adds_nothing():
    """A NaN in the last type (in id order) leaves the accumulator as before: no
    stored type changes and no new type is kept."""
    x, ids = make_data("normal", n=1200, seed=14, dtype=np.float32)
    good = TokenMoments(D)
    good.update(x[:600], ids[:600])
    twin = TokenMoments.from_state_dict(good.state_dict())
    before = good.table()
    bad = x[600:].copy()
    bad[np.argmax(ids[600:])] = np.nan  # the last type in id order: found last
    with pytest.raises(EmbgeomError, match="NaN"):
        good.update(bad, ids[600:])
    assert good.n == 600 and good.n_types == len(before)
    pd.testing.assert_frame_equal(good.table(), before, check_exact=True)
    good.update(x[600:], ids[600:])
    twin.update(x[600:], ids[600:])
    pd.testing.assert_frame_equal(good.table(), twin.table(), check_exact=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, ids = make_data("far", n=3000, seed=11, dtype=np.float32)
    cpu = feed(TokenMoments(D), x, ids, 1000)
    gpu = feed(TokenMoments(D), torch.from_numpy(x).cuda(), torch.from_numpy(ids).cuda(), 1000)
    assert gpu.device.type == "cuda"
    assert_tables_close(gpu.table(), cpu.table(), 1e-10)
    back = TokenMoments.from_state_dict(gpu.state_dict())
    assert_tables_close(back.table(), cpu.table(), 1e-10)


# ------------------------------------------ compiled CPU loops and the torch path
@pytest.mark.parametrize("kind", ["far", "normal"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("presorted", [False, True])
def test_both_paths_match_reference_and_one_batch(path, kind, dtype, presorted):
    x, ids = make_data(kind, n=3000, seed=21, dtype=dtype)
    want, want_dec = reference(x, ids)
    acc = TokenMoments(D)
    for a in range(0, len(ids), 700):
        xb, ib = x[a : a + 700], ids[a : a + 700]
        if presorted:
            order = np.argsort(ib, kind="stable")
            xb, ib = xb[order], ib[order]
        acc.update(xb, TokenMoments.group(ib))
    assert_tables_close(acc.table(), want, 1e-7)
    assert_dec_close(acc.decomposition(), want_dec, 1e-7)
    one = TokenMoments(D)
    one.update(x, ids)
    # float64 vectors 1e4 from the origin: the stored float64 mean itself rounds by
    # ~1e-12, which moves a later batch's between-term by ~1e-10 of V (the same with
    # any split); float32 vectors agree to 1e-10.
    tol = 1e-9 if kind == "far" and dtype == np.float64 else 1e-10
    assert_tables_close(acc.table(), one.table(), tol)
    assert_dec_close(acc.decomposition(), one.decomposition(), tol)


def test_compiled_and_torch_paths_agree(monkeypatch):
    from embgeom import _numba

    x, ids = make_data("far", n=2400, seed=24, dtype=np.float32)
    runs = {True: feed(TokenMoments(D), x, ids, 600)}
    monkeypatch.setattr(_numba, "serves", lambda device: False)
    runs[False] = feed(TokenMoments(D), x, ids, 600)
    assert_tables_close(runs[True].table(), runs[False].table(), 1e-12)
    assert_dec_close(runs[True].decomposition(), runs[False].decomposition(), 1e-12)


def test_half_precision_batches_convert_exactly(path):
    x, ids = make_data("normal", n=1500, seed=26, dtype=np.float32)
    xb = torch.from_numpy(x).to(torch.bfloat16)
    acc = feed(TokenMoments(D), xb, ids, 500)
    want, want_dec = reference(xb.double().numpy(), ids)
    assert_tables_close(acc.table(), want, 1e-7)
    assert_dec_close(acc.decomposition(), want_dec, 1e-7)


def test_row_chunks_balance_rows_over_whole_groups():
    from embgeom._numba import row_chunks

    rng = np.random.default_rng(22)
    sizes = np.concatenate([[5000], rng.integers(1, 5, 3000)])  # one huge group first
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    n = int(sizes.sum())
    c = row_chunks(starts, n, 8)
    assert c[0] == 0 and c[-1] == len(sizes) and np.all(np.diff(c) > 0)
    rows = [int(sizes[a:b].sum()) for a, b in zip(c[:-1], c[1:])]
    assert sum(rows) == n and len(rows) >= 2
    assert max(rows[1:]) <= n / 8 + 5  # only the huge group is a run of its own
    assert row_chunks(np.zeros(0, dtype=np.int64), 0, 4).tolist() == [0]


@pytest.mark.parametrize("where", ["frequent", "rare"])
def test_nan_in_any_type_adds_nothing(path, where):
    x, ids = make_data("far", n=1200, seed=23, dtype=np.float32)
    acc = TokenMoments(D)
    acc.update(x[:600], ids[:600])
    before = acc.table()
    u, c = np.unique(ids[600:], return_counts=True)
    t = u[np.argmax(c)] if where == "frequent" else u[np.argmin(c)]
    bad = x[600:].copy()
    bad[np.flatnonzero(ids[600:] == t)[-1], 3] = np.inf if where == "rare" else np.nan
    with pytest.raises(EmbgeomError, match="NaN or infinite"):
        acc.update(bad, ids[600:])
    assert acc.n == 600
    pd.testing.assert_frame_equal(acc.table(), before, check_exact=True)
    acc.update(x[600:], ids[600:])
    want, _ = reference(x, ids)
    assert_tables_close(acc.table(), want, 1e-7)


def test_large_state_with_huge_page_hint_is_exact():
    """A capacity hint large enough for the means to be marked for huge pages (Linux)
    changes nothing in the numbers."""
    x, ids = make_data("normal", n=1500, seed=25, dtype=np.float32)
    plain = feed(TokenMoments(D), x, ids, 500)
    big = feed(TokenMoments(D, capacity=40_000), x, ids, 500)  # 7.7 MB of means
    assert big.capacity == 40_000
    pd.testing.assert_frame_equal(big.table(), plain.table(), check_exact=True)
    assert big.decomposition() == plain.decomposition()


def test_row_store_grows_in_place_or_by_copy_keeping_rows():
    """The CPU means table grows without losing rows: in place (the mapping moves,
    no copy) when nothing else views it, by a copy when a view is still alive."""
    from embgeom.stats.token_moments import _RowStore

    dim = 64
    store = _RowStore(8192, dim, "cpu")  # 4 MiB: mapped where the platform allows
    vals = torch.arange(8192 * dim, dtype=torch.float64).view(8192, dim)
    store.tensor.copy_(vals)
    grown = store.grown(20_000, 8192)
    assert grown.tensor.shape == (20_000, dim)
    assert torch.equal(grown.tensor[:8192], vals)
    held = grown.tensor[:10]  # a live view: the mapping cannot move, so it copies
    again = grown.grown(50_000, 8192)
    assert again.tensor.shape == (50_000, dim)
    assert torch.equal(again.tensor[:8192], vals) and torch.equal(held, vals[:10])


def test_many_types_without_capacity_hint_grow_exactly(path):
    """Tens of thousands of types, rows grown batch by batch from nothing (the
    table passes the size at which it is mapped and moved), equal the reference
    and an accumulator given the capacity up front."""
    rng = np.random.default_rng(31)
    n = 60_000
    ids = rng.permutation(np.repeat(np.arange(30_000, dtype=np.int64) * 7919 - 10**12, 2))
    x = rng.standard_normal((n, D)).astype(np.float32) + 50.0
    grown = feed(TokenMoments(D), x, ids, 4096)
    hinted = feed(TokenMoments(D, capacity=30_000), x, ids, 4096)
    assert grown.n_types == 30_000 and grown.capacity >= 30_000
    pd.testing.assert_frame_equal(grown.table(), hinted.table(), check_exact=True)
    want, _ = reference(x.astype(np.float64), ids)
    assert_tables_close(grown.table(), want, 1e-7)


def test_decomposition_in_many_chunks_equals_one(monkeypatch):
    """Wide tables are read in chunks of rows (two passes, each gathering its chunk);
    small chunks give the one-chunk answer to rounding, far from the origin too."""
    rng = np.random.default_rng(12)
    t = TokenMoments(8)
    for _ in range(3):
        t.update(rng.standard_normal((400, 8)) + 1e4, rng.integers(0, 90, 400))
    one = t.decomposition()

    def small_chunks(self, k):
        for a in range(0, k, 7):
            yield a, min(k, a + 7)

    monkeypatch.setattr(TokenMoments, "_chunk_rows", small_chunks)
    many = t.decomposition()
    for key in ("V", "V_within", "V_between"):
        assert many[key] == pytest.approx(one[key], rel=1e-12), key
    assert one["V"] == pytest.approx(one["V_within"] + one["V_between"], rel=1e-15)
