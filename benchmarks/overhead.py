"""Whole-process cost of `embgeom run` against a plain forward loop (not a test).

The baseline is the honest minimum: the same model, corpus, windows and batch size,
run with `output_hidden_states=True` and nothing else. Both run as fresh processes,
so imports and model loading count on both sides. Prints the ratio and peak memory.

    .venv/bin/python benchmarks/overhead.py [--model minilm|smollm2|PATH] [--tokens 20000]
    .venv/bin/python benchmarks/overhead.py --breakdown   # forward pass and each accumulator, in-process
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def baseline(model_spec: str, corpus: str, seq_len: int, batch_size: int, max_tokens: int) -> None:
    """Forward passes only: tokenize, window, batch, run. Prints its own timings."""
    import torch

    from embgeom.models import load_model
    from embgeom.corpus import read_documents
    from embgeom.windows import WindowPlan, iter_batches, iter_windows, pad_token_id

    torch.set_grad_enabled(False)
    lm = load_model(model_spec, device="cpu")
    plan = WindowPlan(seq_len=seq_len, prefix=tuple(lm.facts.special_prefix), suffix=tuple(lm.facts.special_suffix),
                      max_tokens=max_tokens)
    t = time.perf_counter()
    n = 0
    for b in iter_batches(iter_windows(read_documents(corpus), lm.tokenizer, plan), batch_size,
                          pad_token_id(lm.tokenizer)):
        out = lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True)
        n += b.n_counted
        del out
    print(json.dumps({"stream_s": time.perf_counter() - t, "tokens": n}))


def breakdown(model_spec: str, corpus: str, seq_len: int, batch_size: int, max_tokens: int, repeats: int) -> None:
    """Where the streaming time of `analyze` goes, in one process: the forward pass,
    `Moments.update`, `TokenMoments.update`, the cross-layer moments (centring and
    products) and the per-window curvature and entropy, timed by wrappers (each
    call's wall time; the remainder is gathers, the outlier split, counting and
    batching).
    Best of `repeats` runs."""
    import torch

    import embgeom.pipeline as pipeline
    import embgeom.pipeline.stream as stream
    from embgeom.models import load_model
    from embgeom.stats.cross_moments import CrossMoments
    import embgeom.stats.layers as layer_statistics
    from embgeom.stats.layers import LayerStatistics
    from embgeom.stats.moments import Moments
    from embgeom.stats.token_moments import TokenMoments

    clock = {}

    def wrap(owner, name, key):
        inner = getattr(owner, name)

        def timed_call(*a, **k):
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                clock[key] = clock.get(key, 0.0) + time.perf_counter() - t

        setattr(owner, name, timed_call)

    wrap(stream, "forward_hidden", "forward")
    wrap(Moments, "update", "Moments")
    wrap(TokenMoments, "update", "TokenMoments")
    wrap(CrossMoments, "update_centred", "cross-layer")
    wrap(layer_statistics, "centred", "cross-layer")  # the pairs' centring, once per layer
    wrap(LayerStatistics, "_accumulate_windows", "per-window")
    lm = load_model(model_spec, device="cpu")
    best = None
    for _ in range(repeats):
        clock.clear()
        res = pipeline.analyze(lm, corpus, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size,
                               device="cpu", id_sample=0)
        run = dict(clock, stream=res.run["timings_s"]["stream"])
        if best is None or run["stream"] < best["stream"]:
            best = run
    parts = ("forward", "Moments", "TokenMoments", "cross-layer", "per-window")
    rest = best["stream"] - sum(best.get(k, 0.0) for k in parts)
    tokens = res.run["counts"]["tokens_counted"]
    layers = sum(n + 1 for n in res.run["model"]["n_layers"].values())
    from embgeom import _hardware

    print(f"CPU: {_hardware.cpu_name()}; bf16 {'native' if _hardware.bf16_native() else 'emulated'}")
    print(f"streaming part, best of {repeats} ({torch.get_num_threads()} threads): {best['stream']:.2f} s for "
          f"{tokens} tokens x {layers} layers")
    for key in parts:
        best.setdefault(key, 0.0)
        print(f"  {key:13s} {best[key]:6.2f} s  {best[key] / tokens / layers * 1e6:6.2f} us per token and layer  "
              f"{best[key] / best['forward']:6.1%} of the forward pass")
    print(f"  {'the rest':13s} {rest:6.2f} s  {rest / tokens / layers * 1e6:6.2f} us per token and layer  "
          f"{rest / best['forward']:6.1%} of the forward pass")


def timed(cmd: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (KiB) of the child, stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, max(peak, before), proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--id-sample", type=int, default=10000, help="passed to embgeom run (0: no ID estimation)")
    ap.add_argument("--baseline-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--breakdown", action="store_true",
                    help="instead: time the forward pass and each accumulator inside one process")
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--run-options", default="",
                    help='more options for embgeom run, one string (e.g. "--no-cross-layer --no-window-measures")')
    args = ap.parse_args()

    if args.baseline_worker:
        baseline(args.model, args.corpus, args.seq_len, args.batch_size, args.tokens)
        # `embgeom` ends with a fast exit (no interpreter teardown, ~1.2 s after a
        # model was loaded); so does this loop, so that the two compare like for like.
        sys.stdout.flush()
        os._exit(0)

    from embgeom.packaged import minilm_path, smollm2_gguf_path
    from embgeom.wiki import write_demo_corpus

    model = {"minilm": str(minilm_path()), "smollm2": str(smollm2_gguf_path())}.get(args.model, args.model)
    tmp = Path(tempfile.mkdtemp(prefix="embgeom-bench-"))
    corpus = write_demo_corpus(tmp / "corpus.txt", max_words=int(args.tokens * 1.2) + 2000)
    if args.breakdown:
        breakdown(model, str(corpus), args.seq_len, args.batch_size, args.tokens, args.repeats)
        return
    common = ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
    base_cmd = [sys.executable, __file__, "--baseline-worker", "--model", model, "--corpus", str(corpus),
                "--tokens", str(args.tokens), *common]
    run_cmd = [sys.executable, "-m", "embgeom", "run", model, "--corpus", str(corpus), "--out", str(tmp / "out"),
               "--max-tokens", str(args.tokens), "--device", "cpu", "--no-progress", "--no-figures",
               "--id-sample", str(args.id_sample), *common, *shlex.split(args.run_options)]
    # Warm the GGUF cache and the page cache before timing either side.
    timed(base_cmd)
    rows = []
    for _ in range(args.repeats):
        b_wall, b_rss, b_out = timed(base_cmd)
        e_wall, e_rss, _ = timed(run_cmd)
        run = json.loads((tmp / "out" / "run.json").read_text())
        rows.append((b_wall, e_wall, json.loads(b_out)["stream_s"], run["timings_s"]["stream"],
                     run["timings_s"]["metrics"]))
    for i, (bw, ew, bs, es, _) in enumerate(rows):
        print(f"run {i + 1}: whole {bw:.2f} s vs {ew:.2f} s ({ew / bw:.3f}), stream {bs:.2f} s vs {es:.2f} s ({es / bs:.3f})")
    b_wall = min(r[0] for r in rows)
    e_wall = min(r[1] for r in rows)
    b_stream = min(r[2] for r in rows)
    e_stream = min(r[3] for r in rows)
    med = statistics.median
    from embgeom import _hardware

    print(f"CPU: {_hardware.cpu_name()}; bf16 {'native' if _hardware.bf16_native() else 'emulated'}")
    print(f"model {Path(model).name}, {args.tokens} tokens, id-sample {args.id_sample}, seq_len {args.seq_len}, batch {args.batch_size}, "
          f"torch threads {os.cpu_count()} cores, best of {args.repeats}"
          + (f", run options {args.run_options}" if args.run_options else ""))
    print(f"whole process: forward-only loop {b_wall:.1f} s, embgeom run {e_wall:.1f} s, ratio {e_wall / b_wall:.3f} "
          f"(medians {med(r[0] for r in rows):.1f} s, {med(r[1] for r in rows):.1f} s, "
          f"ratio {med(r[1] for r in rows) / med(r[0] for r in rows):.3f})")
    print(f"streaming part: forward-only {b_stream:.1f} s, embgeom {e_stream:.1f} s, ratio {e_stream / b_stream:.3f} "
          f"(medians ratio {med(r[3] for r in rows) / med(r[2] for r in rows):.3f})")
    print(f"embgeom: {args.tokens / e_stream:,.0f} tokens/s while streaming; metrics after the stream "
          f"(eigenvalues, per-type tables, ID on {args.id_sample} sampled positions): {min(r[4] for r in rows):.1f} s")
    print(f"peak RSS of the children: {e_rss / 1024:.0f} MiB (max over both)")


if __name__ == "__main__":
    main()
