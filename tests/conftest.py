"""Shared fixtures: tiny random models of four architectures, built from configs and
saved with a small trained tokenizer, and small real corpora."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# fp32 copies of GGUF models are shared between test workers and runs.
os.environ.setdefault("EMBGEOM_CACHE", str(ROOT / ".embgeom-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Parallel test workers share the cores: more threads than cores makes BLAS and
# LAPACK spin-wait (an eigendecomposition then takes seconds instead of ms).
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(_threads))
    import torch

    torch.set_num_threads(_threads)

ARCHS = ["gpt2", "bert", "llama", "t5"]


@pytest.fixture(params=["compiled", "torch"])
def path(request, monkeypatch):
    """Run a test with the accumulators' compiled CPU loops (numba, the rule on the
    CPU) and with the torch operations they use on accelerators (forced on the CPU)."""
    import torch

    from embgeom import _numba

    if request.param == "compiled":
        assert _numba.serves(torch.device("cpu"))  # numba is a dependency: the loops serve the CPU
    else:
        monkeypatch.setattr(_numba, "serves", lambda device: False)
    return request.param


def lee_texts(n: int = 40) -> list[str]:
    from embgeom.wiki import lee_documents

    docs = []
    for d in lee_documents():
        docs.append(d)
        if len(docs) == n:
            break
    return docs


def build_tokenizer(style: str):
    """A 400-word-piece BPE tokenizer trained on real news text, with the special-token
    template of each model family."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(lee_texts(60), trainer)
    ids = {s: tok.token_to_id(s) for s in specials}
    if style == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])]
        )
    elif style == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", ids["<s>"])])
    elif style == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", ids["</s>"])])
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        bos_token="<s>", eos_token="</s>", model_max_length=128,
    )


def build_model(arch: str, vocab: int):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=3, n_head=2,
                                                           bos_token_id=4, eos_token_id=5))
    if arch == "bert":
        return tf.BertForMaskedLM(tf.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=64,
                                                max_position_embeddings=128))
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=2, num_attention_heads=4,
                                                  num_key_value_heads=2, max_position_embeddings=128))
    if arch == "t5":
        return tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=vocab, d_model=32, d_ff=64, num_layers=2,
                                                         num_decoder_layers=3, num_heads=2, d_kv=16,
                                                         decoder_start_token_id=0, pad_token_id=0))
    raise ValueError(arch)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """{arch: model directory} for tiny random GPT-2, BERT, Llama and T5 models."""
    root = tmp_path_factory.mktemp("tiny-models")
    dirs = {}
    for arch in ARCHS:
        tok = build_tokenizer(arch if arch != "gpt2" else "plain")
        model = build_model(arch, len(tok))
        d = root / arch
        model.save_pretrained(d)
        tok.save_pretrained(d)
        dirs[arch] = d
    return dirs


@pytest.fixture(scope="session")
def lee_corpus(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "lee.txt"
    p.write_text("\n".join(lee_texts(40)) + "\n", encoding="utf-8")
    return p
