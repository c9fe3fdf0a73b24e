"""The two real pretrained models that PyPI packages carry, on real news text."""
import numpy as np
import pytest
import transformers

from embgeom import analyze
from embgeom.models import gguf_fp32_copy, load_model
from embgeom.packaged import minilm_path, smollm2_gguf_path
from reference import hidden_vectors, limit, two_pass, windows_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def texts(lee_corpus):
    return lee_corpus.read_text().splitlines()[:6]


def check_against_reference(lm, texts, seq_len, max_tokens):
    res = analyze(lm, texts, seq_len=seq_len, batch_size=4, max_tokens=max_tokens)
    windows = windows_of(texts, lm.tokenizer, seq_len, lm.facts.special_prefix, lm.facts.special_suffix)
    windows, counted = limit(windows, lambda w: np.ones(len(w), dtype=bool), max_tokens)
    ref = hidden_vectors(lm.model, windows, counted_fn=counted)["main"]
    rows = res.layers[res.layers["view"] == "all"].sort_values("layer")
    assert len(rows) == len(ref)
    for (_, row), X in zip(rows.iterrows(), ref):
        want = two_pass(X)
        assert row["n_tokens"] == want["n_tokens"] == max_tokens
        for key in ("Q", "M", "V", "anisotropy", "mean_cosine"):
            assert row[key] == pytest.approx(want[key], rel=5e-4), (row["layer"], key)
    return res


def test_minilm_encoder(texts):
    lm = load_model(str(minilm_path()), device="cpu")
    f = lm.facts
    assert (f.kind, f.n_layers, f.width, f.norm_placement) == ("encoder", {"encoder": 6}, 384, "post-LN")
    check_against_reference(lm, texts, seq_len=96, max_tokens=600)


def test_smollm2_gguf_decoder(texts, monkeypatch):
    path = smollm2_gguf_path()
    lm = load_model(str(path), device="cpu")
    f = lm.facts
    assert (f.source, f.kind, f.n_layers, f.width, f.norm_placement) == ("gguf", "decoder", {"decoder": 30}, 576, "pre-LN")
    res = check_against_reference(lm, texts, seq_len=96, max_tokens=600)
    # Massive activations make the middle layers of this decoder nearly one-dimensional.
    mid = res.layers[(res.layers["layer"] >= 12) & (res.layers["layer"] <= 28)]
    assert (mid[mid["view"] == "all"]["anisotropy"] > 0.9).all()
    # ... and leaving out the few massive-activation tokens brings them back to low values.
    assert (mid[mid["view"] == "inliers"]["anisotropy"] < 0.3).all()
    assert (res.outliers["position"] == 0).mean() > 0.5
    # The fp32 copy is cached: a second load skips dequantization.
    cached = gguf_fp32_copy(path)
    assert (cached / "config.json").exists()
    real = transformers.AutoModel.from_pretrained

    def no_dequantizing(*args, **kwargs):
        assert "gguf_file" not in kwargs, "the cached fp32 copy should have been used"
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", no_dequantizing)
    again = load_model(str(path), device="cpu")
    assert again.facts.n_parameters == f.n_parameters
