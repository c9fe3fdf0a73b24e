"""End to end on tiny random models of four architectures, against a reference
computed from `output_hidden_states` one window at a time."""
import json

import numpy as np
import pandas as pd
import pytest

from embgeom import EmbgeomError, analyze
from embgeom.models import load_model
from embgeom.output import save_run
from embgeom.report import write_report
from embgeom.results import LAYER_COLUMNS, Result
from reference import hidden_vectors, limit, two_pass, windows_of

EXPECTED = {  # kind, stacks -> blocks, norm placement
    "gpt2": ("decoder", {"decoder": 3}, "pre-LN"),
    "bert": ("encoder", {"encoder": 2}, "post-LN"),
    "llama": ("decoder", {"decoder": 2}, "pre-LN"),
    "t5": ("encoder-decoder", {"encoder": 2, "decoder": 3}, "pre-LN"),
}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_model_facts_are_measured(tiny_models, arch):
    lm = load_model(str(tiny_models[arch]), device="cpu")
    kind, n_layers, placement = EXPECTED[arch]
    assert lm.facts.kind == kind
    assert lm.facts.n_layers == n_layers
    assert lm.facts.norm_placement == placement
    assert lm.facts.width == 32


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_statistics_match_output_hidden_states(tiny_models, lee_corpus, arch):
    texts = lee_corpus.read_text().splitlines()[:12]
    res = analyze(str(tiny_models[arch]), texts, seq_len=48, batch_size=5, device="cpu")
    lm = load_model(str(tiny_models[arch]), device="cpu")
    windows = windows_of(texts, lm.tokenizer, 48, lm.facts.special_prefix, lm.facts.special_suffix)
    ref = hidden_vectors(lm.model, windows, encoder_decoder=arch == "t5")
    if "main" in ref:
        ref = {lm.facts.kind: ref.pop("main")}
    layers = res.layers
    assert list(layers.columns[: len(LAYER_COLUMNS)]) == LAYER_COLUMNS
    assert set(layers["stack"]) == set(ref)
    assert res.run["counts"]["windows"] == len(windows)
    for stack, per_layer in ref.items():
        rows = layers[(layers["stack"] == stack) & (layers["view"] == "all")].sort_values("layer")
        assert len(rows) == len(per_layer) == EXPECTED[arch][1][stack] + 1
        for (_, row), X in zip(rows.iterrows(), per_layer):
            want = two_pass(X)
            assert row["n_tokens"] == want["n_tokens"]
            for key in ("Q", "M", "V", "anisotropy", "mean_cosine"):
                # Batching pads windows; float32 attention then differs in the last bits.
                assert row[key] == pytest.approx(want[key], rel=2e-4, abs=1e-6), (stack, row["layer"], key)
            assert row["depth"] == pytest.approx(row["layer"] / row["n_layers"])


def test_exclusions_and_max_tokens(tiny_models, lee_corpus):
    texts = lee_corpus.read_text().splitlines()[:10]
    lm = load_model(str(tiny_models["bert"]), device="cpu")
    special = set(lm.tokenizer.all_special_ids)
    res = analyze(lm, texts, seq_len=40, batch_size=4, exclude_special=True, exclude_positions=(1,), max_tokens=300)
    windows = windows_of(texts, lm.tokenizer, 40, lm.facts.special_prefix, lm.facts.special_suffix)

    def counted(w):
        keep = np.array([t not in special for t in w])
        keep[1] = False
        return keep

    kept, counted_limited = limit(windows, counted, 300)
    ref = hidden_vectors(lm.model, kept, counted_fn=counted_limited)["main"]
    rows = res.layers[res.layers["view"] == "all"].sort_values("layer")
    assert (rows["n_tokens"] == 300).all()
    assert res.run["counts"]["tokens_counted"] == 300
    for (_, row), X in zip(rows.iterrows(), ref):
        want = two_pass(X)
        assert row["n_tokens"] == want["n_tokens"]
        assert row["V"] == pytest.approx(want["V"], rel=2e-4)
        assert row["M"] == pytest.approx(want["M"], rel=2e-4)


def test_long_documents_are_windowed_not_truncated(tiny_models):
    lm = load_model(str(tiny_models["gpt2"]), device="cpu")
    text = " ".join(["the geometry of hidden states"] * 60)
    n_ids = len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    res = analyze(lm, [text], seq_len=32, batch_size=3)
    assert res.run["counts"]["tokens_counted"] == n_ids
    assert res.run["counts"]["windows"] == -(-n_ids // 32)
    assert (res.layers["n_tokens"] == n_ids).all()


def test_batch_size_does_not_change_results(tiny_models, lee_corpus):
    texts = lee_corpus.read_text().splitlines()[:8]
    lm = load_model(str(tiny_models["llama"]), device="cpu")
    a = analyze(lm, texts, seq_len=40, batch_size=1).layers
    b = analyze(lm, texts, seq_len=40, batch_size=7).layers
    assert (a["n_tokens"] == b["n_tokens"]).all()
    np.testing.assert_allclose(a["V"], b["V"], rtol=2e-4)


def test_save_and_load_round_trip(tiny_models, lee_corpus, tmp_path):
    res = analyze(str(tiny_models["gpt2"]), lee_corpus, seq_len=64, max_tokens=500, device="cpu")
    out = save_run(res, tmp_path / "out")
    for name in ("layers.csv", "layers.parquet", "spectrum.parquet", "run.json", "figures/layer_profiles.png"):
        assert (out / name).exists(), name
    back = Result.load(out)
    np.testing.assert_allclose(back.layers["V"], res.layers["V"])
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["kind"] == "decoder" and run["model"]["norm_placement"] == "pre-LN"
    assert run["corpus"]["sha256"]
    # the k-NN's precision choice (by measured tile timings) is recorded
    assert run["knn"]["searches"] > 0 and run["knn"]["choices"][0]["precision"] in ("bf16", "fp32")
    spec = back.spectrum[(back.spectrum["layer"] == 2) & (back.spectrum["view"] == "all")]
    assert len(spec) == 32 and (np.diff(spec["eigenvalue"].to_numpy()) <= 0).all()
    assert spec["eigenvalue"].sum() == pytest.approx(float(res.layers.query("layer == 2 and view == 'all'")["V"].iloc[0]), rel=1e-9)


def test_hub_id_with_revisions_from_local_cache(tiny_models, lee_corpus, tmp_path, monkeypatch):
    """A Hub id resolves offline from a Hugging Face cache, at the asked revision."""
    import shutil

    hub = tmp_path / "hub"
    repo = hub / "models--someone--tiny-gpt2"
    for rev, commit, arch in [("main", "a" * 40, "gpt2"), ("step100", "b" * 40, "llama")]:
        shutil.copytree(tiny_models[arch], repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / rev).write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a = analyze("someone/tiny-gpt2", lee_corpus, revision="step100", seq_len=32, max_tokens=100, device="cpu")
    assert a.run["model"]["model_type"] == "llama" and a.run["model"]["source"] == "hub"
    assert set(a.layers["revision"]) == {"step100"}
    b = analyze("someone/tiny-gpt2", lee_corpus, seq_len=32, max_tokens=100, device="cpu")
    assert b.run["model"]["model_type"] == "gpt2"
    with pytest.raises(EmbgeomError, match="revision nope"):
        analyze("someone/tiny-gpt2", lee_corpus, revision="nope", seq_len=32, device="cpu")


@pytest.mark.parametrize("token_types", ["id", "string"])
def test_token_types_and_decomposition(tiny_models, lee_corpus, token_types, path):
    from embgeom.pipeline import token_type_table
    from reference import hidden_vectors_with_ids, per_type

    texts = lee_corpus.read_text().splitlines()[:6]
    lm = load_model(str(tiny_models["gpt2"]), device="cpu")
    res = analyze(lm, texts, seq_len=64, batch_size=3, token_types=token_types, min_count=3)
    windows = windows_of(texts, lm.tokenizer, 64, [], [])
    layers, ids = hidden_vectors_with_ids(lm.model, windows)
    table, text_of = token_type_table(lm.tokenizer, token_types)
    types = ids if table is None else table[ids]
    if token_types == "string":
        # Ġthe and the are one type.
        pieces = lm.tokenizer.convert_ids_to_tokens(list(range(len(lm.tokenizer))))
        pairs = [(i, pieces.index(p[1:])) for i, p in enumerate(pieces) if p.startswith("Ġ") and p[1:] in pieces]
        assert pairs and all(table[a] == table[b] for a, b in pairs)
    tok_table = res.tokens
    for layer, X in enumerate(layers):
        want_types, want = per_type(X, types)
        row = res.layers[(res.layers["layer"] == layer) & (res.layers["view"] == "all")].iloc[0]
        for key in ("V", "V_within", "V_between"):
            assert row[key] == pytest.approx(want[key], rel=2e-4, abs=1e-9), (layer, key)
        got = tok_table[(tok_table["layer"] == layer) & (tok_table["view"] == "all")].set_index("token_id")
        assert len(got) == len(want_types)
        for t, (n, Q, M, V) in want_types.items():
            assert got.loc[t, "n"] == n
            assert got.loc[t, "Q"] == pytest.approx(Q, rel=2e-4)
            assert got.loc[t, "token"] == text_of([t])[0]
        # the trade-off columns come from the same per-type numbers
        sel = got[(got["n"] >= 3) & (got["n"] <= 100000)]
        assert row["n_types"] == len(sel)
        if layer > 0 and len(sel) > 2:
            slope = np.polyfit(sel["M"], sel["V"], 1)[0]
            assert row["mv_slope"] == pytest.approx(slope, rel=1e-3, abs=1e-9)


def test_token_types_none_keeps_every_other_column_and_no_type_table(tiny_models, lee_corpus, tmp_path):
    """--token-types none: no per-type accumulators (memory constant in the number of
    types), the per-type columns NaN, an empty tokens table with the usual columns,
    and every other column identical to a run with types."""
    from embgeom.plots import plot_runs

    texts = lee_corpus.read_text().splitlines()[:6]
    lm = load_model(str(tiny_models["gpt2"]), device="cpu")
    with_types = analyze(lm, texts, seq_len=64, batch_size=3, id_sample=200)
    without = analyze(lm, texts, seq_len=64, batch_size=3, id_sample=200, token_types="none")
    per_type = ["V_within", "V_between", "mv_slope", "mv_intercept", "mv_r2", "mv_pearson", "q_cv", "n_types"]
    assert without.layers[per_type].isna().all().all()
    assert with_types.layers[per_type].notna().any().all()
    other = [c for c in with_types.layers.columns if c not in per_type]
    pd.testing.assert_frame_equal(without.layers[other], with_types.layers[other])
    assert len(without.tokens) == 0 and list(without.tokens.columns) == list(with_types.tokens.columns)
    assert without.run["counts"]["token_types"] is None
    out = without.save(tmp_path / "none")
    again = Result.load(out)
    assert len(again.tokens) == 0
    written = plot_runs([again], tmp_path / "figs")
    assert written and not any("mv_scatter" in p.name for p in written)


def test_outlier_calibration_does_not_depend_on_batch_size(tiny_models, lee_corpus):
    texts = lee_corpus.read_text().splitlines()[:10]
    lm = load_model(str(tiny_models["gpt2"]), device="cpu")
    opts = dict(seq_len=48, calibration_tokens=200, outlier_factor=1.3)
    a = analyze(lm, texts, batch_size=2, **opts)
    b = analyze(lm, texts, batch_size=9, **opts)
    assert a.run["outliers"]["calibration_windows"] == b.run["outliers"]["calibration_windows"] == 5
    np.testing.assert_allclose(a.run["outliers"]["median_norm"]["decoder"], b.run["outliers"]["median_norm"]["decoder"],
                               rtol=1e-5)
    inl_a = a.layers[a.layers["view"] == "inliers"]
    inl_b = b.layers[b.layers["view"] == "inliers"]
    assert (inl_a["n_tokens"].to_numpy() == inl_b["n_tokens"].to_numpy()).all()
    assert (inl_a["n_tokens"] < a.layers[a.layers["view"] == "all"]["n_tokens"].to_numpy()).any()
    assert len(a.outliers) == len(b.outliers) > 0


def test_intrinsic_dimension_on_the_same_sampled_positions_in_every_layer(tiny_models, lee_corpus):
    from embgeom.metrics.intrinsic_dim import mle_id, twonn
    from embgeom.stats.position_sample import position_priorities
    from embgeom.windows import POSITION_BITS

    texts = lee_corpus.read_text().splitlines()[:10]
    lm = load_model(str(tiny_models["gpt2"]), device="cpu")
    opts = dict(seq_len=48, id_sample=150, seed=3)
    a = analyze(lm, texts, batch_size=2, **opts)
    b = analyze(lm, texts, batch_size=7, **opts)
    cols = ["id_twonn", "id_twonn_ml", "id_twonn_ml_low", "id_twonn_ml_high", "id_mle", "id_n"]
    np.testing.assert_allclose(a.layers[cols].to_numpy(float), b.layers[cols].to_numpy(float), rtol=1e-5)

    # Reference: every window alone, keys (window, position), the 150 smallest seeded priorities.
    windows = windows_of(texts, lm.tokenizer, 48, [], [])
    ref = hidden_vectors(lm.model, windows)["main"]
    keys = np.concatenate([(i << POSITION_BITS) + np.arange(len(w)) for i, w in enumerate(windows)])
    prio = position_priorities(keys, seed=3)
    chosen = np.lexsort((keys, prio))[:150]
    rows = a.layers[a.layers["view"] == "all"].sort_values("layer")
    for (_, row), X in zip(rows.iterrows(), ref):
        S = X[chosen]
        assert row["id_twonn"] == pytest.approx(twonn(S), rel=1e-4)
        assert row["id_mle"] == pytest.approx(mle_id(S, k=20), rel=1e-4)
        assert row["id_n"] == len(np.unique(S, axis=0))  # the distinct vectors
    assert (rows["id_n"] > 100).all()


def test_id_n_counts_distinct_vectors(tiny_models, lee_corpus):
    """A llama's layer 0 is the token embedding: a token met twice is one point for
    intrinsic dimension, so id_n there is the number of distinct sampled token ids."""
    from embgeom.stats.position_sample import position_priorities
    from embgeom.windows import POSITION_BITS

    texts = lee_corpus.read_text().splitlines()[:6]
    lm = load_model(str(tiny_models["llama"]), device="cpu")
    res = analyze(lm, texts, seq_len=48, id_sample=200, seed=1, token_types="none")
    windows = windows_of(texts, lm.tokenizer, 48, lm.facts.special_prefix, lm.facts.special_suffix)
    ids = np.concatenate([np.asarray(w) for w in windows])
    keys = np.concatenate([(i << POSITION_BITS) + np.arange(len(w)) for i, w in enumerate(windows)])
    chosen = np.lexsort((keys, position_priorities(keys, seed=1)))[:200]
    rows = res.layers[res.layers["view"] == "all"].set_index("layer")
    distinct_ids = len(np.unique(ids[chosen]))
    assert distinct_ids < 150  # a 400-token vocabulary repeats
    assert rows.loc[0, "id_n"] == distinct_ids
    assert rows.loc[rows.index.max(), "id_n"] > distinct_ids  # context makes the vectors distinct


def test_windows_kept_from_the_count_equal_a_second_tokenization(tiny_models, lee_corpus, monkeypatch):
    import embgeom.pipeline as pipeline

    texts = lee_corpus.read_text().splitlines()[:8]
    lm = load_model(str(tiny_models["gpt2"]), device="cpu")
    opts = dict(seq_len=48, batch_size=3, calibration_tokens=100, id_sample=0)
    kept = analyze(lm, texts, **opts)
    monkeypatch.setattr(pipeline, "KEEP_WINDOW_TOKENS", 0)  # tokenize again in the stream
    again = analyze(lm, texts, **opts)
    pd.testing.assert_frame_equal(kept.layers, again.layers)
    pd.testing.assert_frame_equal(kept.tokens, again.tokens)
    assert kept.run["outliers"]["median_norm"] == again.run["outliers"]["median_norm"]


def test_figures_drawn_by_workers_equal_those_drawn_here(tiny_models, lee_corpus, tmp_path, monkeypatch):
    """plot_runs in forked workers writes the same files, byte for byte, as in one
    process, and an error inside a worker reaches the caller (as a warning)."""
    import embgeom.plots as plots

    texts = lee_corpus.read_text().splitlines()[:6]
    lm = load_model(str(tiny_models["gpt2"]), device="cpu")
    res = analyze(lm, texts, seq_len=64, batch_size=3, id_sample=200)
    here = plots.plot_runs([res], tmp_path / "here", workers=1)
    forked = plots.plot_runs([res], tmp_path / "forked", workers=2)
    assert [p.name for p in here] == [p.name for p in forked] and len(here) >= 20
    for a, b in zip(here, forked):
        assert a.read_bytes() == b.read_bytes(), a.name

    def broken(*args, **kwargs):
        raise EmbgeomError("spectrum figure failed")

    monkeypatch.setattr(plots, "plot_spectrum", broken)
    for workers in (1, 2):  # an error inside a worker reaches the caller as a warning
        warnings = []
        drawn = plots.plot_runs([res], tmp_path / f"broken{workers}", workers=workers, warnings=warnings)
        assert [p.name for p in drawn] == [p.name for p in here if not p.name.startswith("spectrum_")]
        assert len(warnings) == 1 and warnings[0].startswith("figure spectrum_"), warnings
        assert "was not drawn (EmbgeomError: spectrum figure failed)" in warnings[0]


def test_hidden_states_of_different_widths(tmp_path, lee_corpus):
    """OPT-350m's last hidden state is projected to the embedding width (project_out):
    each layer is measured at its own width, against output_hidden_states."""
    import torch
    import transformers as tf

    from conftest import build_tokenizer

    tok = build_tokenizer("llama")
    torch.manual_seed(0)
    model = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, ffn_dim=64, max_position_embeddings=128,
                                           word_embed_proj_dim=16, do_layer_norm_before=False))
    model.save_pretrained(tmp_path / "opt")
    tok.save_pretrained(tmp_path / "opt")
    texts = lee_corpus.read_text().splitlines()[:5]
    res = analyze(str(tmp_path / "opt"), texts, seq_len=48, batch_size=1, device="cpu", id_sample=200,
                  outlier_factor=1e6, precision="float64")  # float64 products: exact to 1e-9
    facts = res.run["model"]
    assert facts["width"] == 32 and facts["layer_widths"] == {"decoder": [32, 32, 16]}
    assert facts["norm_placement"] == "post-LN"
    # planned: every layer's outlier covariance too; with no outlier none was allocated
    # (and each layer pair's cross-moment parts that only meet outliers: one d_l × d_{l+1}, two d²)
    cov = [8 * (w * w + 2 * w) for w in (32, 32, 16)]
    unused_pairs = sum(8 * (a * b + a + b) + cov[i] + cov[i + 1] for i, (a, b) in enumerate([(32, 32), (32, 16)]))
    assert res.run["planned_accumulator_bytes"] - res.run["accumulator_bytes"] == sum(cov) + unused_pairs
    lm = load_model(str(tmp_path / "opt"), device="cpu")
    windows = windows_of(texts, lm.tokenizer, 48, lm.facts.special_prefix, lm.facts.special_suffix)
    ref = hidden_vectors(lm.model, windows)["main"]
    rows = res.layers[res.layers["view"] == "all"].sort_values("layer")
    for (_, row), X in zip(rows.iterrows(), ref):
        want = two_pass(X)
        for key in ("Q", "M", "V", "anisotropy", "mean_cosine"):
            assert row[key] == pytest.approx(want[key], rel=1e-9), (row["layer"], key)
        assert np.isfinite(row["id_twonn"]) and np.isfinite(row["V_within"])
    (tmp_path / "out").mkdir()
    assert "width 32 (decoder layer 2: 16)" in write_report(res, tmp_path / "out", None).read_text()
    last = res.spectrum[(res.spectrum["layer"] == 2) & (res.spectrum["view"] == "all")]
    assert len(last) == 16
    assert set(res.tokens["layer"]) == {0, 1, 2}


def test_seq_len_defaults_to_the_model_positions(tiny_models, lee_corpus, monkeypatch):
    """No seq_len: min(512, the model's positions) (the tiny models have 128), recorded
    in run.json; an explicit value past the limit is refused, naming the parameter."""
    import embgeom.windows as windows

    texts = lee_corpus.read_text().splitlines()[:3]
    res = analyze(str(tiny_models["gpt2"]), texts, max_tokens=300, id_sample=0, device="cpu")
    assert res.run["config"]["seq_len"] == 128
    assert res.run["counts"]["windows"] == 3  # 300 tokens in windows of 128
    lm = load_model(str(tiny_models["gpt2"]), device="cpu")
    assert analyze(lm, texts, max_tokens=50, id_sample=0).run["config"]["seq_len"] == 128
    monkeypatch.setattr(windows, "DEFAULT_SEQ_LEN", 40)  # a model with more positions than the default
    assert analyze(lm, texts, max_tokens=50, id_sample=0).run["config"]["seq_len"] == 40
    with pytest.raises(EmbgeomError) as exc:
        analyze(lm, texts, seq_len=4096)
    assert str(exc.value) == ("seq_len=4096 is longer than this model accepts (128 positions); "
                              "use seq_len=128 or less")
    with pytest.raises(EmbgeomError, match="max_tokens must be a positive integer, got -5"):
        analyze(lm, texts, max_tokens=-5)
