"""More architectures than the four of test_pipeline, as tiny random models: each is
analysed end to end, its facts (kind, stacks, norm placement) are measured right,
and every layer's statistics match output_hidden_states (one window per batch)."""
import pytest
import torch
import transformers as tf

from embgeom import analyze
from embgeom.errors import EmbgeomError
from embgeom.models import load_model
from conftest import build_tokenizer, lee_texts
from reference import hidden_vectors, two_pass, windows_of

SMALL = dict(max_position_embeddings=128)
DEC = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **SMALL)
GQA = dict(DEC, num_key_value_heads=2)

# name: (model class, config class, config options, tokenizer style, kind, norm placement)
CASES = {
    "roberta": ("RobertaForMaskedLM", "RobertaConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=140, pad_token_id=0), "bert", "encoder", "post-LN"),
    "distilbert": ("DistilBertForMaskedLM", "DistilBertConfig", dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                   **SMALL), "bert", "encoder", "post-LN"),
    "deberta-v2": ("DebertaV2ForMaskedLM", "DebertaV2Config", dict(hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=2, intermediate_size=64, **SMALL), "bert", "encoder", "post-LN"),
    "gpt-neox (Pythia)": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=64, **SMALL), "plain", "decoder", "pre-LN"),
    "opt": ("OPTForCausalLM", "OPTConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
            word_embed_proj_dim=32, **SMALL), "llama", "decoder", "pre-LN"),
    "bloom": ("BloomForCausalLM", "BloomConfig", dict(hidden_size=32, n_layer=2, n_head=2), "plain", "decoder",
              "pre-LN"),
    "mistral": ("MistralForCausalLM", "MistralConfig", GQA, "llama", "decoder", "pre-LN"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", GQA, "plain", "decoder", "pre-LN"),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(GQA, head_dim=8), "llama", "decoder", "pre-LN"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(GQA, head_dim=8), "llama", "decoder", "sandwich"),
    "phi": ("PhiForCausalLM", "PhiConfig", DEC, "plain", "decoder", "pre-LN"),
    "olmo": ("OlmoForCausalLM", "OlmoConfig", DEC, "plain", "decoder", "pre-LN"),
    "bart": ("BartForConditionalGeneration", "BartConfig", dict(d_model=32, encoder_layers=2, decoder_layers=2,
             encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, **SMALL),
             "llama", "encoder-decoder", "post-LN"),
    # the two larger models of docs/findings.md: all-mpnet-base-v2 and Gemma-3-270m
    "mpnet": ("MPNetForMaskedLM", "MPNetConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=64, max_position_embeddings=42, pad_token_id=0), "bert", "encoder", "post-LN"),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(GQA, head_dim=8, sliding_window=16,
               layer_types=["sliding_attention", "full_attention"]), "llama", "decoder", "sandwich"),
}


@pytest.fixture(scope="module")
def tokenizers():
    return {}


@pytest.mark.parametrize("name", list(CASES))
def test_architecture_end_to_end(name, tokenizers, tmp_path):
    model_cls, config_cls, options, style, kind, placement = CASES[name]
    if not hasattr(tf, model_cls):
        pytest.skip(f"this transformers has no {model_cls}")
    tok = tokenizers.setdefault(style, build_tokenizer(style))
    torch.manual_seed(0)
    model = getattr(tf, model_cls)(getattr(tf, config_cls)(vocab_size=len(tok), **options))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    texts = lee_texts(3)
    res = analyze(str(tmp_path / "m"), texts, seq_len=40, batch_size=1, device="cpu", id_sample=100)
    facts = res.run["model"]
    assert (facts["kind"], facts["norm_placement"], facts["width"]) == (kind, placement, 32)
    lm = load_model(str(tmp_path / "m"), device="cpu")
    windows = windows_of(texts, lm.tokenizer, 40, lm.facts.special_prefix, lm.facts.special_suffix)
    ref = hidden_vectors(lm.model, windows, encoder_decoder=kind == "encoder-decoder")
    if "main" in ref:
        ref = {kind: ref.pop("main")}
    assert facts["n_layers"] == {s: len(v) - 1 for s, v in ref.items()}
    for stack, per_layer in ref.items():
        rows = res.layers[(res.layers["stack"] == stack) & (res.layers["view"] == "all")].sort_values("layer")
        for (_, row), X in zip(rows.iterrows(), per_layer):
            want = two_pass(X)
            assert row["n_tokens"] == want["n_tokens"]
            for key in ("Q", "V", "anisotropy", "mean_cosine"):
                assert row[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (stack, row["layer"], key)


def test_mpnet_positions_start_after_the_padding_index(tmp_path):
    """MPNet numbers positions from padding_idx + 1 (as RoBERTa does): a window fills
    max_position_embeddings - 2 positions, and a longer --seq-len is refused up front
    instead of failing inside the model."""
    tok = build_tokenizer("bert")
    torch.manual_seed(0)
    model = tf.MPNetModel(tf.MPNetConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=42,
                                         pad_token_id=1))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    res = analyze(str(tmp_path / "m"), lee_texts(2), seq_len=40, batch_size=2, device="cpu", id_sample=0)
    assert res.run["model"]["max_length"] == 40
    assert res.run["counts"]["windows"] > 1  # full windows of 40 were run
    with pytest.raises(EmbgeomError, match="seq_len=41 is longer than this model accepts"):
        analyze(str(tmp_path / "m"), lee_texts(2), seq_len=41, device="cpu", id_sample=0)
