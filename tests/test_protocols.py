"""--protocol paper-a / paper-b against float64 references written here from the
papers' definitions, on hidden states extracted independently (one window at a time,
`output_hidden_states`), and the options each preset sets."""
import json

import numpy as np
import pytest

from embgeom import EmbgeomError, analyze
from embgeom.cli import main
from embgeom.metrics.intrinsic_dim import twonn_from_distances, twonn_ranked_from_distances
from embgeom.models import load_model
from embgeom.pipeline import AnalysisConfig
from embgeom.stats.position_sample import PositionSample
from reference import hidden_vectors_with_ids, windows_of


# ------------------------------------------------------------------ references
def two_nearest(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distances to the nearest and second nearest other point, brute force from
    differences (as paper A's per-row loop computes them)."""
    r = np.empty((len(X), 2))
    for a in range(0, len(X), 64):
        d = np.sqrt(((X[a:a + 64, None, :] - X[None, :, :]) ** 2).sum(-1))
        d[np.arange(d.shape[0]), np.arange(a, a + d.shape[0])] = np.inf
        r[a:a + 64] = np.sort(d, axis=1)[:, :2]
    return r[:, 0], r[:, 1]


def twonn_paper_a(X: np.ndarray, eps: float = 1e-8) -> float:
    """Paper A's TwoNN: centred points scaled by their mean norm; a nearest neighbour
    closer than eps counts as a duplicate (ratio -1); ratios ≤ 1 + eps are left out,
    the rest keep ranks u+1..N of all N; the smallest fifth of them are fitted by a
    line through the origin of -log(1 - F) on log μ."""
    Y = X - X.mean(0)
    Y = Y / np.sqrt((Y * Y).sum(1)).mean()
    r1, r2 = two_nearest(Y)
    mu = np.where(r1 < eps, -1.0, r2 / np.where(r1 < eps, 1.0, r1))
    mu = np.sort(mu)
    u = int((mu <= 1 + eps).sum())
    mu = mu[u:]
    n = len(mu)
    F = np.arange(1 + u, n + 1 + u) / (n + u)
    m = min(n // 5, n - 1)
    x, y = np.log(mu[:m]), -np.log(1 - F[:m])
    return float((x * y).sum() / (x * x).sum())


def pooled_reference(X: np.ndarray, types: np.ndarray) -> dict:
    """Q, M, V, V_within, V_between of the rows of X, two passes."""
    mu = X.mean(0)
    within = between = 0.0
    for t in np.unique(types):
        Xt = X[types == t]
        mt = Xt.mean(0)
        within += ((Xt - mt) ** 2).sum()
        between += len(Xt) * ((mt - mu) ** 2).sum()
    n = len(X)
    return {"Q": float((X * X).sum(1).mean()), "M": float(mu @ mu), "V": float(((X - mu) ** 2).sum(1).mean()),
            "V_within": within / n, "V_between": between / n}


def surface(tokenizer, ids) -> np.ndarray:
    """Paper B's token type: the token's string with a leading ## or Ġ (or ▁) removed."""
    out = []
    for p in tokenizer.convert_ids_to_tokens([int(i) for i in ids]):
        for marker in ("##", "Ġ", "▁"):
            if p.startswith(marker):
                p = p[len(marker):]
                break
        out.append(p)
    return np.asarray(out, dtype=object)


def rel_err(got, want) -> float:
    return abs(got - want) / abs(want)


# ------------------------------------------------------------------ presets
def test_presets_set_their_options_and_explicit_options_win():
    a = AnalysisConfig.from_options(protocol="paper-a")
    assert (a.id_first, a.twonn_discard, a.twonn_duplicates, a.token_types, a.types_filtered) == \
        (4096, 0.8, "keep-rank", "id", False)
    b = AnalysisConfig.from_options(protocol="paper-b")
    assert (b.id_first, b.twonn_discard, b.twonn_duplicates, b.token_types, b.types_filtered) == \
        (0, 0.1, "drop", "string", True)
    e = AnalysisConfig.from_options()
    assert (e.protocol, e.id_first, e.twonn_discard, e.token_types, e.types_filtered) == ("embgeom", 0, 0.1, "id", False)
    mixed = AnalysisConfig.from_options(protocol="paper-a", id_first=0, twonn_discard=0.5)
    assert (mixed.id_first, mixed.twonn_discard, mixed.twonn_duplicates) == (0, 0.5, "keep-rank")
    assert AnalysisConfig.from_options(protocol="paper-b", token_types="id").token_types == "id"
    # each setting is reachable without a protocol
    alone = AnalysisConfig.from_options(twonn_discard=0.8, id_first=100, types_filtered=True)
    assert (alone.protocol, alone.id_points, alone.types_filtered) == ("embgeom", 100, True)


@pytest.mark.parametrize("options, words", [
    (dict(protocol="paper-c"), "^protocol must"),  # the Python API names its parameters
    (dict(id_first=-1), "^id_first must"),
    (dict(twonn_discard=1.0), "^twonn_discard must"),
    (dict(twonn_duplicates="keep"), "^twonn_duplicates must"),
    (dict(protocol="paper-b", token_types="none"), "^types_filtered takes"),
])
def test_bad_protocol_options_are_refused(options, words):
    with pytest.raises(EmbgeomError, match=words):
        AnalysisConfig.from_options(**options)


# ------------------------------------------------------------------ estimator and sample
def test_ranked_twonn_is_paper_a_formula_with_duplicates_and_ties():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((400, 6))
    X[50:90] = X[10]  # 41 copies of one point
    X[200] = X[201] + 1e-3 * np.ones(6)
    r1, r2 = two_nearest(X)
    dist = np.stack([r1, r2], 1)
    scale = float(np.sqrt(((X - X.mean(0)) ** 2).sum(1)).mean())
    got = twonn_ranked_from_distances(dist, 0.8, scale=scale)
    assert rel_err(got, twonn_paper_a(X)) < 1e-12
    # Duplicates raise the estimate: they shift every rank up, where "drop" ranks without them.
    assert got > twonn_from_distances(dist, 0.8)
    # Without degenerate points the two conventions agree, but for the count kept: for n a
    # multiple of 5, n·(1 − 0.8) falls just short of n/5 in floating point.
    for n, same in ((396, True), (395, False)):
        Z = rng.standard_normal((n, 5))
        r1, r2 = two_nearest(Z)
        dz = np.stack([r1, r2], 1)
        assert rel_err(twonn_ranked_from_distances(dz, 0.8), twonn_paper_a(Z)) < 1e-12
        assert (rel_err(twonn_ranked_from_distances(dz, 0.8), twonn_from_distances(dz, 0.8)) < 1e-12) == same


def test_first_order_sample_keeps_the_smallest_keys_and_merges_exactly():
    rng = np.random.default_rng(0)
    keys = rng.permutation(1000).astype(np.int64)
    vec = rng.standard_normal((2, 1000, 3)).astype(np.float32)
    whole = PositionSample(100, 2, 3, order="first").update(keys, vec)
    assert list(whole.keys) == list(range(100))
    order = np.argsort(keys)[:100]
    np.testing.assert_array_equal(whole.layer(1), vec[1][order])
    parts = [PositionSample(100, 2, 3, order="first").update(keys[s], vec[:, s])
             for s in (slice(0, 400), slice(400, 1000))]
    merged = parts[0].merge(PositionSample.from_state_dict(parts[1].state_dict()))
    np.testing.assert_array_equal(merged.keys, whole.keys)
    np.testing.assert_array_equal(merged.layer(0), whole.layer(0))
    with pytest.raises(EmbgeomError, match="order"):
        PositionSample(100, 2, 3).merge(PositionSample(100, 2, 3, order="first"))


# ------------------------------------------------------------------ end to end
def _reference_stream(model_dir, texts, seq_len):
    lm = load_model(str(model_dir), device="cpu")
    windows = windows_of(texts, lm.tokenizer, seq_len, lm.facts.special_prefix, lm.facts.special_suffix)
    per_layer, ids = hidden_vectors_with_ids(lm.model, windows)
    return lm, per_layer, ids


def test_paper_a_id_is_twonn_on_the_first_tokens(tiny_models, lee_corpus):
    texts = lee_corpus.read_text().splitlines()[:12]
    first = 1200
    res = analyze(str(tiny_models["bert"]), texts, protocol="paper-a", id_first=first, max_tokens=1800, seq_len=64,
                  batch_size=1, device="cpu")
    assert res.run["config"]["twonn_discard"] == 0.8 and res.run["config"]["twonn_duplicates"] == "keep-rank"
    assert res.run["protocol"] == {"name": "paper-a", "preset": res.run["protocol"]["preset"],
                                   "overridden": {"id_first": first}}
    _, per_layer, _ = _reference_stream(tiny_models["bert"], texts, 64)
    rows = res.layers[res.layers["view"] == "all"].sort_values("layer")
    errors = []
    for (_, row), X in zip(rows.iterrows(), per_layer):
        want = twonn_paper_a(X[:first])
        errors.append(rel_err(row["id_twonn"], want))
    assert len(errors) == 3
    print("paper-a max rel err per layer", errors)
    assert max(errors) < 1e-6, errors
    # layer 0 repeats vectors ([CLS] and other tokens at the same position): the rule matters there
    assert rows.iloc[0]["id_n"] < first


def test_paper_b_moments_are_over_the_counted_string_types(tiny_models, lee_corpus):
    texts = lee_corpus.read_text().splitlines()[:8]
    lo, hi = 4, 60
    res = analyze(str(tiny_models["gpt2"]), texts, protocol="paper-b", min_count=lo, max_count=hi, seq_len=48,
                  batch_size=1, device="cpu", id_sample=0)
    lm, per_layer, ids = _reference_stream(tiny_models["gpt2"], texts, 48)
    types = surface(lm.tokenizer, ids)
    names, counts = np.unique(types, return_counts=True)
    chosen = set(names[(counts >= lo) & (counts <= hi)])
    keep = np.array([t in chosen for t in types])
    assert 0 < keep.sum() < len(keep) and (counts > hi).any()  # both bounds leave types out
    rows = res.layers[res.layers["view"] == "all"].sort_values("layer")
    assert (rows["n_types"] == len(chosen)).all()
    worst = 0.0
    for (_, row), X in zip(rows.iterrows(), per_layer):
        want = pooled_reference(X[keep], types[keep])
        for key, value in want.items():
            worst = max(worst, rel_err(row[key], value))
        # the M-V fit is over the same types, as before
        Ms, Vs = [], []
        for t in sorted(chosen):
            Xt = X[types == t]
            mt = Xt.mean(0)
            Ms.append(mt @ mt)
            Vs.append(((Xt - mt) ** 2).sum(1).mean())
        slope = np.polyfit(Ms, Vs, 1)[0]
        assert rel_err(row["mv_slope"], slope) < 1e-6
        assert row["n_tokens"] == len(X)  # the count of every token is still reported
    print("paper-b max rel err", worst)
    assert worst < 1e-6, worst


def test_cli_protocol_is_recorded_and_reported(tiny_models, lee_corpus, tmp_path):
    out = tmp_path / "run"
    main(["run", str(tiny_models["gpt2"]), "--corpus", str(lee_corpus), "--out", str(out), "--max-tokens", "300",
          "--seq-len", "48", "--id-sample", "200", "--protocol", "paper-b", "--token-types", "id",
          "--no-figures", "--no-progress"])
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["protocol"] == "paper-b"
    assert run["config"]["token_types"] == "id" and run["config"]["types_filtered"] is True
    assert run["protocol"]["overridden"] == {"token_types": "id"}
    report = (out / "report.md").read_text()
    assert "Protocol **paper-b**" in report and "token_types='id'" in report
    assert "10 ≤ n_t ≤ 100000 only" in report


def test_probe_takes_a_protocol(tiny_models, lee_corpus):
    import transformers as tf

    from embgeom.callback import GeometryProbe

    model = tf.GPT2LMHeadModel.from_pretrained(tiny_models["gpt2"])
    tok = tf.AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    probe = GeometryProbe(str(lee_corpus), tok, protocol="paper-b", max_tokens=200, seq_len=48, id_sample=0)
    res = probe(model, 1)
    assert res.run["config"]["token_types"] == "string" and res.run["protocol"]["name"] == "paper-b"
    with pytest.raises(EmbgeomError, match="^protocol must"):  # named as the Python API names it
        GeometryProbe(str(lee_corpus), tok, protocol="paper-z")
