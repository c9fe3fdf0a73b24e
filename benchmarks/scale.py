"""Peak memory and throughput of `embgeom run` as the corpus grows, and 1 vs N ranks
(not a test).

Each measurement is a fresh process (for N ranks: torchrun and its workers) that
reports its own peak resident memory; tokens per second come from run.json
(the streaming part: forward passes and every accumulator) and from the wall clock
(whole process: imports, loading, tokenizer pre-pass, metrics, writing).

    .venv/bin/python benchmarks/scale.py --model minilm --tokens 20000 100000 500000
    .venv/bin/python benchmarks/scale.py --model smollm2 --tokens 20000
    .venv/bin/python benchmarks/scale.py --model minilm --tokens 100000 --ranks 1 2
    .venv/bin/python benchmarks/scale.py --model minilm --token-types none   # no per-type tables
    .venv/bin/python benchmarks/scale.py --model minilm --type-layers 0 3 6  # per-type tables at 3 of 7
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(argv: list[str]) -> None:
    """Run the CLI in this process and print this process's peak RSS."""
    from embgeom.cli import main

    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code or 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_kib": peak, "exit": code}))


def launcher(argv: list[str], ranks: int) -> None:
    """Run torchrun with `ranks` workers; print the largest peak RSS among them."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           "-m", "embgeom", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
    print(json.dumps({"peak_rss_kib": peak, "exit": proc.returncode}))


def model_path(name: str) -> str:
    from embgeom.packaged import minilm_path, smollm2_gguf_path

    return {"minilm": lambda: str(minilm_path()), "smollm2": lambda: str(smollm2_gguf_path())}.get(
        name, lambda: name)()


def measure(model: str, corpus: Path, tokens: int, ranks: int, args) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"embgeom-scale-{tokens}-{ranks}-"))
    run_args = ["run", model, "--corpus", str(corpus), "--out", str(out), "--max-tokens", str(tokens),
                "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--id-sample",
                str(args.id_sample), "--device", "cpu", "--no-progress", "--no-figures",
                "--token-types", args.token_types]
    for layer in args.type_layers or ():
        run_args += ["--type-layers", str(layer)]
    me = [sys.executable, str(Path(__file__).resolve())]
    cmd = me + (["--child"] if ranks == 1 else ["--launch", str(ranks)]) + ["--", *run_args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    wall = time.perf_counter() - t
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if report["exit"]:
        sys.exit(f"embgeom run failed:\n{proc.stderr[-3000:]}")
    run = json.loads((out / "run.json").read_text())
    n = run["counts"]["tokens_counted"]
    return {
        "requested": tokens, "tokens": n, "ranks": ranks, "wall_s": wall,
        "stream_s": run["timings_s"]["stream"], "metrics_s": run["timings_s"]["metrics"],
        "tok_per_s_stream": n / run["timings_s"]["stream"], "tok_per_s_whole": n / wall,
        "peak_rss_mib": report["peak_rss_kib"] / 1024, "accumulator_mib": run["accumulator_bytes"] / 2**20,
        "token_types": run["counts"]["token_types"] or 0,
    }


def main() -> None:
    if "--child" in sys.argv:
        child(sys.argv[sys.argv.index("--") + 1:])
        return
    if "--launch" in sys.argv:
        launcher(sys.argv[sys.argv.index("--") + 1:], int(sys.argv[sys.argv.index("--launch") + 1]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", help="minilm, smollm2 or a model path")
    ap.add_argument("--tokens", type=int, nargs="+", default=[20000, 100000, 500000])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--id-sample", type=int, default=10000)
    ap.add_argument("--token-types", default="id", help="id, string or none (no per-type statistics)")
    ap.add_argument("--type-layers", type=int, nargs="+", default=None,
                    help="layers keeping per-type statistics (default: all)")
    ap.add_argument("--corpus", type=Path, default=None, help="default: the whole gensim Wikipedia sample")
    args = ap.parse_args()
    corpus = args.corpus
    if corpus is None:
        from embgeom.wiki import write_demo_corpus

        corpus = Path(tempfile.gettempdir()) / "embgeom-wiki-full.txt"
        if not corpus.exists():
            write_demo_corpus(corpus)
    model = model_path(args.model)
    rows = []
    print(f"{'tokens':>8} {'ranks':>5} {'wall s':>7} {'stream s':>8} {'tok/s stream':>12} {'tok/s whole':>11} "
          f"{'peak RSS MiB':>12} {'accum MiB':>9} {'types':>6}", flush=True)
    for tokens in args.tokens:
        for ranks in args.ranks:
            r = measure(model, corpus, tokens, ranks, args)
            rows.append(r)
            print(f"{r['tokens']:>8} {ranks:>5} {r['wall_s']:>7.1f} {r['stream_s']:>8.1f} {r['tok_per_s_stream']:>12.0f} "
                  f"{r['tok_per_s_whole']:>11.0f} {r['peak_rss_mib']:>12.0f} {r['accumulator_mib']:>9.0f} "
                  f"{r['token_types']:>6}", flush=True)
    ones = [r for r in rows if r["ranks"] == 1]
    if len(ones) > 1:
        a, b = ones[0], ones[-1]
        print(f"peak RSS {a['tokens']} -> {b['tokens']} tokens: {a['peak_rss_mib']:.0f} -> {b['peak_rss_mib']:.0f} MiB "
              f"({100 * (b['peak_rss_mib'] / a['peak_rss_mib'] - 1):+.1f}%); per-type accumulators "
              f"{a['accumulator_mib']:.0f} -> {b['accumulator_mib']:.0f} MiB")
    for tokens in args.tokens:
        by = {r["ranks"]: r for r in rows if r["requested"] == tokens}
        if 1 in by and len(by) > 1:
            for k, r in by.items():
                if k != 1:
                    print(f"{tokens} tokens: {k} ranks stream {by[1]['stream_s'] / r['stream_s']:.2f}x, "
                          f"whole {by[1]['wall_s'] / r['wall_s']:.2f}x faster than 1 rank")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
