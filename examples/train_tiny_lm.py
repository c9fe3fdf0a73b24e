#!/usr/bin/env python
"""Train a small GPT-2-style language model from scratch on CPU and watch the geometry
of its hidden states change (paper A: does intrinsic dimension rise then fall, does
anisotropy grow?).

The text is English Wikipedia (the sample that ships with gensim, wiki markup
stripped: `embgeom.wiki.wiki_documents`); a byte-level BPE tokenizer is trained on the
training part of it (or `--tokenizer smollm2` reuses the packaged SmolLM2 tokenizer).
A held-out slice of the articles is the probe corpus that `GeometryCallback`
measures at step 0, at log-spaced steps early on, every `--every` steps, and at the
end.

    python examples/train_tiny_lm.py --quick --out tiny-lm-quick   # about 1 minute
    python examples/train_tiny_lm.py --out tiny-lm                 # about 10 minutes on 1-2 cores

Writes, under --out:
    geometry/layers.csv ...        every measurement (step, layer, view, metrics, train_loss)
    geometry/training_log.csv      the loss the Trainer logged
    geometry/figures/training_*.png  layer x step heatmaps; anisotropy, ID and loss against step
    summary.txt                    per layer: anisotropy and TwoNN ID at the start, peak and end
    probe.txt                      the held-out probe corpus, one paragraph per line
    model/                         the trained model and tokenizer (`embgeom run OUT/model ...`)
    trainer/checkpoint-N/          with --save-every N: checkpoints for
                                   `embgeom run OUT/trainer --corpus OUT/probe.txt --out OUT/sweep`
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

PRESETS = {
    #            words     steps  width layers heads seq  batch vocab  lr     every  early probe  id
    "quick": dict(words=60_000, steps=300, width=64, layers=3, heads=4, seq_len=64, batch_size=16, vocab_size=2048,
                  lr=2e-3, every=50, early=8, probe_tokens=2048, id_sample=2048),
    "full": dict(words=None, steps=800, width=128, layers=4, heads=4, seq_len=128, batch_size=16, vocab_size=4096,
                 lr=1e-3, every=100, early=14, probe_tokens=4096, id_sample=4096),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("tiny-lm"), help="output directory")
    p.add_argument("--quick", action="store_true", help="a ~1 minute run (smaller model, fewer steps)")
    p.add_argument("--words", type=int, help="words of Wikipedia text to read (default: all, ~410k; quick: 60k)")
    p.add_argument("--steps", type=int, help="optimiser steps")
    p.add_argument("--width", type=int, help="hidden size")
    p.add_argument("--layers", type=int, help="transformer blocks")
    p.add_argument("--heads", type=int, help="attention heads")
    p.add_argument("--seq-len", type=int, help="training and probe window length in tokens")
    p.add_argument("--batch-size", type=int, help="sequences per step")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size")
    p.add_argument("--lr", type=float, help="peak learning rate (cosine decay, 5%% warm-up)")
    p.add_argument("--every", type=int, help="measure every N steps")
    p.add_argument("--early", type=int, help="extra log-spaced measurements between step 1 and the end")
    p.add_argument("--probe-tokens", type=int, help="tokens of held-out text per measurement")
    p.add_argument("--id-sample", type=int, help="token positions sampled for intrinsic dimension")
    p.add_argument("--tokenizer", choices=["bpe", "smollm2"], default="bpe",
                   help="train a byte-level BPE on the text (default) or reuse the packaged SmolLM2 tokenizer")
    p.add_argument("--save-every", type=int, default=0, help="also save Trainer checkpoints every N steps")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: a model this small gains little from more, and several "
                        "threads slow down badly on a machine that is shared)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-to", default="none", help="Trainer loggers, e.g. tensorboard (default: none)")
    args = p.parse_args(argv)
    for key, value in PRESETS["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data
def split_documents(docs: list[str], probe_words: int) -> tuple[list[str], list[str]]:
    """Hold out the last articles' paragraphs (about `probe_words` words) as the probe."""
    held, n = [], 0
    while docs and n < probe_words:
        d = docs.pop()
        held.append(d)
        n += len(d.split())
    return docs, held[::-1]


def bpe_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<pad>")


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from embgeom.models import gguf_fp32_copy
    from embgeom.packaged import smollm2_gguf_path

    tok = AutoTokenizer.from_pretrained(gguf_fp32_copy(smollm2_gguf_path(), progress=say))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def packed_blocks(texts: list[str], tok, seq_len: int) -> list[dict]:
    """Documents joined with end-of-text and cut into full blocks of `seq_len` tokens."""
    eos = tok.eos_token_id
    stream: list[int] = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    n = len(stream) // seq_len
    return [{"input_ids": stream[i * seq_len:(i + 1) * seq_len]} for i in range(n)]


# ----------------------------------------------------------------------------- summary
def summarise(layers, log) -> str:
    """Per layer: anisotropy (all, inliers) and TwoNN ID at the start, at their peak
    and at the end, and the shape of the ID curve."""
    import numpy as np

    d = layers[layers["view"].isin(["all", "inliers"])].copy()
    d["step"] = d["step"].astype(int)
    steps = sorted(d["step"].unique())
    lines = [f"measured steps: {', '.join(map(str, steps))}"]
    if len(log):
        first, last = log.iloc[0], log.iloc[-1]
        lines.append(f"training loss: {first['loss']:.3f} at step {int(first['step'])} -> {last['loss']:.3f} "
                     f"at step {int(last['step'])} (min {log['loss'].min():.3f})")
    head = (f"{'layer':>5} | {'anisotropy (all)':^26} | {'anisotropy (inliers)':^26} | "
            f"{'TwoNN ID (all)':^34} | ID shape")
    lines += ["", "start / peak (at step) / end", head, "-" * len(head)]

    def span(series):
        v = series.to_numpy(dtype=float)
        if not np.isfinite(v).any():
            return "n/a", None
        k = int(np.nanargmax(v))
        return f"{v[0]:.3f} / {v[k]:.3f} ({series.index[k]}) / {v[-1]:.3f}", (v, k)

    for layer in sorted(d["layer"].unique()):
        a = d[(d["layer"] == layer) & (d["view"] == "all")].set_index("step").sort_index()
        b = d[(d["layer"] == layer) & (d["view"] == "inliers")].set_index("step").sort_index()
        an, _ = span(a["anisotropy"])
        ai, _ = span(b["anisotropy"])
        idt, peak = span(a["id_twonn"])
        shape = "n/a"
        if peak is not None:
            v, k = peak
            rise, fall = v[k] / v[0] - 1, 1 - v[-1] / v[k]
            if k not in (0, len(v) - 1) and rise > 0.05 and fall > 0.05:
                shape = f"rise {rise:+.0%} then fall {-fall:+.0%}"
            else:
                shape = f"{'up' if v[-1] > v[0] else 'down'} {v[-1] / v[0] - 1:+.0%} overall"
            idt = f"{v[0]:.1f} / {v[k]:.1f} ({a.index[k]}) / {v[-1]:.1f}"
        lines.append(f"{layer:>5} | {an:^26} | {ai:^26} | {idt:^34} | {shape}")
    mean = d.groupby(["view", "step"])[["anisotropy", "id_twonn"]].mean()
    lines += ["", "mean over layers, by step:", f"{'step':>6} {'aniso all':>10} {'aniso inl':>10} {'ID all':>8}"]
    for s in steps:
        lines.append(f"{s:>6} {mean.loc[('all', s), 'anisotropy']:>10.4f} {mean.loc[('inliers', s), 'anisotropy']:>10.4f} "
                     f"{mean.loc[('all', s), 'id_twonn']:>8.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    import pandas as pd
    import torch
    from transformers import (DataCollatorForLanguageModeling, GPT2Config, GPT2LMHeadModel, Trainer,
                              TrainingArguments, set_seed)
    from transformers.utils import logging as hf_logging

    from embgeom.callback import GeometryCallback, log_spaced_steps
    from embgeom.wiki import wiki_documents

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    say(f"reading Wikipedia text ({'all' if args.words is None else f'{args.words:,} words'}) ...")
    docs = list(wiki_documents(max_words=args.words))
    train_docs, probe_docs = split_documents(docs, probe_words=max(args.probe_tokens, 1000))
    say(f"  {len(train_docs):,} training paragraphs ({sum(len(d.split()) for d in train_docs):,} words), "
        f"{len(probe_docs)} held-out probe paragraphs ({sum(len(d.split()) for d in probe_docs):,} words)")

    t0 = time.time()
    tok = bpe_tokenizer(train_docs, args.vocab_size) if args.tokenizer == "bpe" else smollm2_tokenizer()
    blocks = packed_blocks(train_docs, tok, args.seq_len)
    n_tokens = len(blocks) * args.seq_len
    say(f"tokenizer: {args.tokenizer}, {len(tok):,} tokens ({time.time() - t0:.1f} s); "
        f"{n_tokens:,} training tokens in {len(blocks):,} blocks of {args.seq_len}; "
        f"{args.steps * args.batch_size * args.seq_len / n_tokens:.1f} epochs")

    config = GPT2Config(vocab_size=len(tok), n_positions=args.seq_len, n_embd=args.width, n_layer=args.layers,
                        n_head=args.heads, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(config)
    say(f"model: GPT-2, {args.layers} blocks, width {args.width}, {args.heads} heads, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    probe = out / "probe.txt"  # the held-out probe, one paragraph per line (for `embgeom run` later)
    probe.write_text("".join(" ".join(d.split()) + "\n" for d in probe_docs), encoding="utf-8")
    early = log_spaced_steps(args.steps, args.early) if args.early else []
    geometry = GeometryCallback(
        probe, every=args.every, at_steps=early, out=out / "geometry", name="tiny-gpt2",
        max_tokens=args.probe_tokens, seq_len=args.seq_len, id_sample=args.id_sample, batch_size=16,
        log_layers=False,  # the console gets the means over layers; per layer is in the tables
    )
    train_args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 20),
        weight_decay=0.01, logging_steps=max(1, args.steps // 100),
        save_strategy="steps" if args.save_every else "no", save_steps=args.save_every or 500,
        report_to=[] if args.report_to == "none" else [args.report_to], use_cpu=True, seed=args.seed,
        dataloader_num_workers=0, disable_tqdm=True, log_level="error",
    )
    trainer = Trainer(model=model, args=train_args, train_dataset=blocks, processing_class=tok,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    geometry.attach(trainer)
    say(f"training {args.steps} steps; geometry at steps 0, {', '.join(map(str, early))}, every {args.every}, "
        f"and the end -> {out / 'geometry'}")
    t0 = time.time()
    trainer.train()
    t_train = time.time() - t0
    trainer.save_model(str(out / "model"))
    tok.save_pretrained(out / "model")

    result = geometry.result()
    log = pd.DataFrame(result.run["training"]["log"])
    text = summarise(result.layers, log)
    text += (f"\n\nmodel: {args.layers} blocks, width {args.width}; {args.steps} steps of {args.batch_size} x "
             f"{args.seq_len} tokens; probe: {args.probe_tokens} held-out tokens, ID sample {args.id_sample}"
             f"\ntraining (with measurements) {t_train:.0f} s; total {time.time() - t_start:.0f} s"
             f"\ngeometry measurements: {len(geometry.seconds)} taking {sum(geometry.seconds.values()):.1f} s "
             f"({sum(geometry.seconds.values()) / max(1, len(geometry.seconds)):.2f} s each, "
             f"{100 * sum(geometry.seconds.values()) / max(t_train, 1e-9):.0f}% of training time)\n")
    (out / "summary.txt").write_text(text)
    print(text)
    figures = sorted((out / "geometry" / "figures").glob("*.png"))
    say(f"figures: {', '.join(str(f) for f in figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
