"""PositionSample: the uniform, seeded, mergeable sample of token positions (SPEC §3)."""
import io
import itertools

import numpy as np
import pytest
import torch

from embgeom.errors import EmbgeomError
from embgeom.stats.position_sample import PositionSample, pack_position_keys, position_priorities

L, D = 3, 5
N_DOCS, DOC_LEN = 40, 125
N = N_DOCS * DOC_LEN  # 5000 tokens


@pytest.fixture(scope="module")
def stream():
    g = torch.Generator().manual_seed(0)
    docs = torch.arange(N_DOCS).repeat_interleave(DOC_LEN)
    offs = torch.arange(DOC_LEN).repeat(N_DOCS)
    keys = pack_position_keys(docs, offs)
    vecs = torch.randn(L, N, D, generator=g, dtype=torch.float64)
    tok = torch.randint(0, 30000, (N,), generator=g)
    return keys, vecs, tok, offs


def _run(stream, batch, size=300, seed=0, idx=None, as_list=False):
    keys, vecs, tok, offs = stream
    idx = torch.arange(N) if idx is None else torch.as_tensor(idx)
    s = PositionSample(size, L, D, seed=seed)
    for i in range(0, len(idx), batch):
        j = idx[i : i + batch]
        v = [vecs[l, j] for l in range(L)] if as_list else vecs[:, j]
        s.update(keys[j], v, {"token_id": tok[j], "position": offs[j]})
    return s


def _same(a, b):
    assert np.array_equal(a.keys, b.keys)
    for l in range(L):
        assert np.array_equal(a.layer(l), b.layer(l))
    for nm in ("token_id", "position"):
        assert np.array_equal(a.metadata(nm), b.metadata(nm))


def test_contents_are_the_bottom_k_of_the_stream(stream):
    keys, vecs, tok, offs = stream
    s = _run(stream, 256)
    assert len(s) == 300 and s.n_seen == N
    pr = position_priorities(keys.numpy(), 0)
    expect = np.sort(keys.numpy()[np.lexsort((keys.numpy(), pr))[:300]])
    assert np.array_equal(s.keys, expect)
    where = np.searchsorted(keys.numpy(), s.keys)
    for l in range(L):
        got = s.layer(l)
        assert got.dtype == np.float32 and got.shape == (300, D)
        assert np.array_equal(got, vecs[l, where].float().numpy())
    assert np.array_equal(s.metadata("token_id"), tok[where].numpy())
    assert np.array_equal(s.metadata("position"), offs[where].numpy())
    assert np.all(np.diff(s.keys) > 0)  # sorted by key


def test_independent_of_batch_size_and_order(stream):
    ref = _run(stream, 1)  # one token at a time
    for batch in (7, 500, N):  # and 1, above
        _same(ref, _run(stream, batch))
    _same(ref, _run(stream, 64, as_list=True))
    perm = np.random.default_rng(1).permutation(N)
    _same(ref, _run(stream, 100, idx=perm))


@pytest.mark.parametrize("n_shards", [1, 2, 3])
def test_shards_merged_in_any_order(stream, n_shards):
    ref = _run(stream, 256)
    parts = np.array_split(np.random.default_rng(n_shards).permutation(N), n_shards)
    for order in itertools.permutations(range(n_shards)):
        shards = [_run(stream, 97, idx=parts[i]) for i in order]
        merged = shards[0]
        for other in shards[1:]:
            merged.merge(other)
        _same(ref, merged)
        assert merged.n_seen == N
    # merging into an empty sample
    empty = PositionSample(300, L, D, seed=0)
    _same(ref, empty.merge(_run(stream, 256)))


def test_seed_changes_the_sample(stream):
    a, b = _run(stream, 500, seed=0), _run(stream, 500, seed=1)
    overlap = len(np.intersect1d(a.keys, b.keys))
    # two independent samples of 300 of 5000 share about 300²/5000 = 18 keys
    assert 5 <= overlap <= 40
    _same(a, _run(stream, 500, seed=0))
    big = _run(stream, 500, seed=2**70 + 5)  # any integer seed, used modulo 2^64
    _same(big, _run(stream, 500, seed=5))


def test_sample_is_uniform(stream):
    keys = stream[0]
    size, seeds = 250, 120
    counts = np.zeros(N)
    for seed in range(seeds):
        s = PositionSample(size, 1, 1, seed=seed)
        s.update(keys, torch.zeros(1, N, 1))
        counts[np.searchsorted(keys.numpy(), s.keys)] += 1
    # Each token is drawn with probability size/N = 5 % per seed. Chi-square over 25
    # bins of consecutive positions (200 tokens each, structured keys d·2³² + offset).
    obs = counts.reshape(25, -1).sum(axis=1)
    exp = size * seeds / 25
    chi2 = ((obs - exp) ** 2 / exp).sum()
    assert chi2 < 52.6  # 99.9 % quantile of chi-square with 24 degrees of freedom
    # position in the document: mean offset of the sampled tokens near the middle
    mean_off = (counts * np.tile(np.arange(DOC_LEN), N_DOCS)).sum() / counts.sum()
    assert mean_off == pytest.approx((DOC_LEN - 1) / 2, abs=2.0)  # s.e. ≈ 0.33


def test_state_dict_round_trip(stream):
    s = _run(stream, 333)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    t = PositionSample.from_state_dict(torch.load(buf))
    _same(s, t)
    assert t.n_seen == s.n_seen and t.seed == s.seed
    # the restored sample keeps sampling as the original does
    keys, vecs, tok, offs = stream
    extra_keys = pack_position_keys(torch.full((500,), N_DOCS), torch.arange(500))
    extra = torch.randn(L, 500, D)
    meta = {"token_id": torch.zeros(500, dtype=torch.int64), "position": torch.arange(500)}
    _same(s.update(extra_keys, extra, meta), t.update(extra_keys, extra, meta))


def test_full_sample_copies_only_winners(stream):
    keys = stream[0]
    s = _run(stream, 1000)
    pr = position_priorities(keys.numpy(), 0)
    worst = np.sort(pr)[299]
    # new tokens that all lose against the current sample: their vectors are never read
    # (a 'meta' tensor has no data and would fail if indexed and copied)
    cand = np.arange(10**6, 10**6 + 20000)
    losers = cand[position_priorities(cand, 0) > worst][:64]
    ghost = torch.empty(L, len(losers), D, device="meta")
    before = s.keys.copy()
    s.update(torch.as_tensor(losers), ghost, {"token_id": losers, "position": losers})
    assert np.array_equal(s.keys, before) and s.n_seen == N + len(losers)


def test_errors(stream):
    keys, vecs, tok, offs = stream
    s = PositionSample(10, L, D)
    with pytest.raises(EmbgeomError, match="shape"):
        s.update(keys[:4], vecs[:2, :4])
    with pytest.raises(EmbgeomError, match="vectors\\[1\\]"):
        s.update(keys[:4], [vecs[0, :4], vecs[1, :3], vecs[2, :4]])
    with pytest.raises(EmbgeomError, match="integers"):
        s.update(keys[:4].double(), vecs[:, :4])
    s.update(keys[:4], vecs[:, :4], {"token_id": tok[:4]})
    with pytest.raises(EmbgeomError, match="offered twice"):
        s.update(keys[:2], vecs[:, :2], {"token_id": tok[:2]})
    with pytest.raises(EmbgeomError, match="metadata fields"):
        s.update(keys[4:6], vecs[:, 4:6])
    with pytest.raises(EmbgeomError, match="n=2 entries"):
        s.update(keys[4:6], vecs[:, 4:6], {"token_id": tok[:3]})
    with pytest.raises(EmbgeomError, match="different seed"):
        s.merge(PositionSample(10, L, D, seed=1))
    with pytest.raises(EmbgeomError, match="different dim"):
        s.merge(PositionSample(10, L, D + 1))
    other = PositionSample(10, L, D)
    other.update(keys[10:12], vecs[:, 10:12], {"position": offs[10:12]})
    with pytest.raises(EmbgeomError, match="metadata fields"):
        s.merge(other)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(EmbgeomError, match="size"):
            PositionSample(bad, L, D)
    with pytest.raises(EmbgeomError, match="layer index"):
        s.layer(L)
    with pytest.raises(EmbgeomError, match="no metadata field"):
        s.metadata("nope")
    with pytest.raises(EmbgeomError, match="state.dict"):
        PositionSample.from_state_dict({"version": 1})
    with pytest.raises(EmbgeomError, match="document_index"):
        pack_position_keys(-1, 0)
    with pytest.raises(EmbgeomError, match="token_offset"):
        pack_position_keys(0, 2**32)


def test_layers_of_different_widths(stream):
    """Hidden states of different widths (OPT-350m projects its last one): each layer
    keeps its own width, and the sample is the one of uniform width cut to it, through
    merges and a state round trip."""
    keys, vecs, tok, offs = stream
    dims = [D, D, 2]
    whole = _run(stream, 250)

    def narrow(idx, batch):
        s = PositionSample(300, L, dims, seed=0)
        for i in range(0, len(idx), batch):
            j = idx[i : i + batch]
            s.update(keys[j], [vecs[l, j][:, : dims[l]] for l in range(L)], {"token_id": tok[j], "position": offs[j]})
        return s

    one = narrow(torch.arange(N), 250)
    assert one.dim == dims and one.nbytes == 300 * L * D * 4
    assert np.array_equal(one.keys, whole.keys)
    for l in range(L):
        assert one.layer(l).shape == (300, dims[l])
        assert np.array_equal(one.layer(l), whole.layer(l)[:, : dims[l]])
    a, b = narrow(torch.arange(0, N, 2), 97), narrow(torch.arange(1, N, 2), 131)
    merged = a.merge(b)
    _same(one, merged)
    one._vec[2, :, 2:] = float("nan")  # what uninitialised memory may hold: not part of the state
    buf = io.BytesIO()
    torch.save(one.state_dict(), buf)
    buf.seek(0)
    _same(one, PositionSample.from_state_dict(torch.load(buf)))
    with pytest.raises(EmbgeomError, match=r"vectors\[2\] must have shape \(n=4, dim=2\)"):
        one.update(keys[:4] + 10**12, [vecs[l, :4] for l in range(L)])
    with pytest.raises(EmbgeomError, match="widths differ"):
        one.update(keys[:4] + 10**12, vecs[:, :4])
    with pytest.raises(EmbgeomError, match="different dim"):
        one.merge(_run(stream, 500))
    with pytest.raises(EmbgeomError, match="n_layers=3 widths, got 2"):
        PositionSample(10, L, [D, D])
