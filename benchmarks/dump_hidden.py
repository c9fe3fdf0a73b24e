"""Save one layer's hidden states of real text as .npy, for benchmarks/intrinsic_dim.py.

    .venv/bin/python benchmarks/dump_hidden.py --model smollm2 --layer 15 --tokens 20000 --out /tmp/h.npy
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from embgeom.corpus import read_documents
from embgeom.extract import forward_hidden
from embgeom.models import load_model
from embgeom.packaged import minilm_path, smollm2_gguf_path
from embgeom.wiki import write_demo_corpus
from embgeom.windows import WindowPlan, iter_batches, iter_windows, pad_token_id


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip-first", action="store_true", help="drop position 0 of every window (massive activations)")
    args = ap.parse_args()
    spec = {"minilm": str(minilm_path()), "smollm2": str(smollm2_gguf_path())}.get(args.model, args.model)
    lm = load_model(spec, device="cpu")
    corpus = write_demo_corpus("/tmp/embgeom-dump-corpus.txt", max_words=args.tokens * 2)
    plan = WindowPlan(seq_len=args.seq_len, prefix=tuple(lm.facts.special_prefix), suffix=tuple(lm.facts.special_suffix),
                      exclude_positions=(0,) if args.skip_first else (), max_tokens=args.tokens)
    rows = []
    with torch.no_grad():
        for b in iter_batches(iter_windows(read_documents(corpus), lm.tokenizer, plan), 16, pad_token_id(lm.tokenizer)):
            hs = next(iter(forward_hidden(lm.model, b.input_ids, b.attention_mask, False).values()))
            rows.append(hs[args.layer][b.counted].numpy())
    X = np.concatenate(rows).astype(np.float32)
    np.save(args.out, X)
    print(f"saved {X.shape} from layer {args.layer} of {spec} to {args.out}")


if __name__ == "__main__":
    main()
