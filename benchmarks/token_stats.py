"""Benchmark: per-token-type statistics, TokenMoments vs the paper's sequential update.

Paper B (Yamagiwa & Shimodaira, COLING 2025) keeps a float32 running mean and a
running mean squared norm per token type and updates them in a Python loop, one
token at a time; V is then taken as Q − M. This script times that loop (in numpy)
against ``embgeom.stats.token_moments.TokenMoments`` on the same vectors: by default
100k float32 vectors of width 384, Zipf(1.3) token ids over a 50k vocabulary,
batches of 8192.

It names the CPU first, and the first-call cost of the compiled loops (numba import
and cached code load, or the compile on a machine's very first run), measured in a
fresh child process. TokenMoments runs at its defaults (compiled loops on the CPU).
It is timed three ways: plain ``update(batch, ids)``; with rows already in
id order (the caller's gather does the reordering, so update reads in place); and
with --layers accumulators sharing one grouping per batch, as the pipeline does.

The sequential loop is timed on a subset (default the first 10k tokens) and scaled
per token; the output says so. The loop is timed again in every round of every
TokenMoments variant (alternately, in one process), and each is reported as the best
of its rounds (shared machines are noisy; the median is printed too).
Memory: the accumulator's state (``nbytes``) and the growth of the process's peak
RSS during its passes; for the loop, its state and tracemalloc
peak. Prints, never asserts.

    python benchmarks/token_stats.py [--tokens 100000] [--dim 384] [--batch 8192]
                                     [--seq-tokens 10000] [--layers 4] [--repeats 3]
                                     [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import torch

from embgeom import _hardware, _numba
from embgeom.stats.token_moments import TokenMoments

_FIRST_CALL = """
import time, numpy as np, torch
from embgeom.stats.token_moments import TokenMoments
x = torch.from_numpy(np.random.default_rng(0).standard_normal((4096, 384), dtype=np.float32))
ids = torch.from_numpy(np.random.default_rng(1).integers(0, 5000, 4096))
t = time.perf_counter(); TokenMoments(384).update(x, ids); a = time.perf_counter() - t
t = time.perf_counter(); TokenMoments(384).update(x, ids); b = time.perf_counter() - t
print(a, b)
"""


def first_call_cost() -> tuple[float, float]:
    """(first update, second update) seconds in a fresh process: the difference is the
    compiled loops' one-time cost (numba import and code load)."""
    out = subprocess.run([sys.executable, "-c", _FIRST_CALL], capture_output=True, text=True, check=True)
    a, b = map(float, out.stdout.split())
    return a, b


def make_data(tokens: int, dim: int, seed: int = 0, vocab: int = 50_000):
    rng = np.random.default_rng(seed)
    ids = ((rng.zipf(1.3, tokens) - 1) % vocab).astype(np.int64)
    x = rng.standard_normal((tokens, dim), dtype=np.float32)
    # a common offset, as hidden states have: the mean sits away from the origin
    x += rng.standard_normal(dim, dtype=np.float32) * 2.0
    return x, ids


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def sequential_pass(x, ids):
    """Paper B's update: one Python step per token, float32 running means; V = Q − M."""
    count, mean, sqn = {}, {}, {}
    for i in range(x.shape[0]):
        t = int(ids[i])
        v = x[i]
        c = count.get(t, 0) + 1
        count[t] = c
        if c == 1:
            mean[t] = v.copy()
            sqn[t] = np.float32(v @ v)
        else:
            mean[t] += (v - mean[t]) / np.float32(c)
            sqn[t] += (np.float32(v @ v) - sqn[t]) / np.float32(c)
    return count, mean, sqn


def tokenmoments_pass(xt, idt, batch: int) -> TokenMoments:
    acc = TokenMoments(xt.shape[1])
    for a in range(0, xt.shape[0], batch):
        acc.update(xt[a : a + batch], idt[a : a + batch])
    return acc


def grouped_pass(layers_x, idt, batch: int) -> tuple[float, list[TokenMoments]]:
    """`len(layers_x)` accumulators fed the same ids, grouped once per batch."""
    accs = [TokenMoments(layers_x[0].shape[1]) for _ in layers_x]
    t_group = 0.0
    for a in range(0, idt.shape[0], batch):
        t0 = time.perf_counter()
        g = TokenMoments.group(idt[a : a + batch])
        t_group += time.perf_counter() - t0
        for xl, acc in zip(layers_x, accs):
            acc.update(xl[a : a + batch], g)
    return t_group, accs


def presorted_pass(batches, dim: int) -> TokenMoments:
    """Batches whose rows already come in id order (as when the caller gathers its
    vectors with ids sorted): update reads them in place."""
    acc = TokenMoments(dim)
    for xb, ib in batches:
        acc.update(xb, TokenMoments.group(ib))
    return acc


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--seq-tokens", type=int, default=10_000)
    p.add_argument("--layers", type=int, default=4, help="accumulators sharing one grouping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; the best is reported")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default 1: on shared cores OpenMP workers spin and slow "
        "down both methods; 0 keeps torch's default)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"CPU: {_hardware.cpu_name()}; bf16 {'native' if _hardware.bf16_native() else 'emulated'} "
          f"(not used here: float64 accumulation); load {os.getloadavg()[0]:.1f}")
    a, b = first_call_cost()
    print(f"compiled loops' first-call cost (fresh process): first update {a:.2f} s, second {b * 1e3:.1f} ms "
          f"-> {a - b:.2f} s once per process")
    x, ids = make_data(args.tokens, args.dim, args.seed)
    xt, idt = torch.from_numpy(x), torch.from_numpy(ids)
    n_sub = min(args.seq_tokens, args.tokens)
    xs, ids_s = x[:n_sub], ids[:n_sub]

    # warm-up (allocator, kernels, numpy dispatch)
    sequential_pass(xs[:500], ids_s[:500])
    tokenmoments_pass(xt[: 2 * args.batch], idt[: 2 * args.batch], args.batch)
    rss_before = peak_rss_mib()

    t_seq, t_tm = [], []
    acc = None
    for _ in range(args.repeats):
        dt, _ = timed(sequential_pass, xs, ids_s)
        t_seq.append(dt / n_sub)
        acc = None  # free the previous round's state first
        dt, acc = timed(tokenmoments_pass, xt, idt, args.batch)
        t_tm.append(dt / args.tokens)
    rss_after_tm = peak_rss_mib()

    # rows handed over in id order (the reordering itself is the caller's gather)
    sorted_batches = []
    for a in range(0, args.tokens, args.batch):
        order = torch.sort(idt[a : a + args.batch], stable=True).indices
        sorted_batches.append((xt[a : a + args.batch][order], idt[a : a + args.batch][order]))
    t_sorted = []
    for _ in range(args.repeats):
        # the loop again in every round, so each method meets the same machine load
        dt, _ = timed(sequential_pass, xs, ids_s)
        t_seq.append(dt / n_sub)
        acc_s = None
        dt, acc_s = timed(presorted_pass, sorted_batches, args.dim)
        t_sorted.append(dt / args.tokens)
    del acc_s, sorted_batches

    # several layers: the same vectors, shifted and scaled, one grouping per batch
    layers_x = [xt * (1.0 + 0.5 * layer) + layer for layer in range(args.layers)]
    t_grouped = []
    t_group = 0.0
    for _ in range(args.repeats):
        dt, _ = timed(sequential_pass, xs, ids_s)
        t_seq.append(dt / n_sub)
        accs = None
        dt, (t_group, accs) = timed(grouped_pass, layers_x, idt, args.batch)
        t_grouped.append(dt / args.tokens / args.layers)
    del accs

    # the torch operations instead of the compiled loops (the path on accelerators)
    t_torch = []
    serves = _numba.serves
    _numba.serves = lambda device: False
    try:
        tokenmoments_pass(xt[: 2 * args.batch], idt[: 2 * args.batch], args.batch)
        for _ in range(args.repeats):
            dt, _ = timed(sequential_pass, xs, ids_s)
            t_seq.append(dt / n_sub)
            dt, _ = timed(tokenmoments_pass, xt, idt, args.batch)
            t_torch.append(dt / args.tokens)
    finally:
        _numba.serves = serves

    # memory of the loop's state (untimed run under tracemalloc)
    tracemalloc.start()
    _, mean, _ = sequential_pass(xs, ids_s)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    seq_state = sum(v.nbytes for v in mean.values())

    t0 = time.perf_counter()
    dec = acc.decomposition()
    tr = acc.tradeoff()
    tab = acc.table()
    t_tables = time.perf_counter() - t0

    us = lambda v: min(v) * 1e6  # noqa: E731
    med = lambda v: statistics.median(v) * 1e6  # noqa: E731
    print(f"data: {args.tokens} float32 vectors of width {args.dim}, {len(tab)} Zipf(1.3) token types "
          f"(50k vocabulary), batches of {args.batch}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op thread(s); best of {args.repeats} rounds (median)")
    print(f"sequential, paper B style (numpy, one running-mean update per token, float32): timed on "
          f"the first {n_sub} tokens and scaled per token")
    print(f"  {us(t_seq):8.3f} us/token ({med(t_seq):.3f})  -> {us(t_seq) * args.tokens / 1e6:6.2f} s "
          f"for {args.tokens} tokens (extrapolated)")
    print(f"  state {seq_state / 2**20:.1f} MiB ({len(mean)} types), tracemalloc peak {traced_peak / 2**20:.1f} MiB")
    compiled = "compiled CPU loops" if _numba.serves(torch.device("cpu")) else "torch operations"
    print(f"TokenMoments (float64 state, all {args.tokens} tokens, grouping included; {compiled}):")
    print(f"  {us(t_tm):8.3f} us/token ({med(t_tm):.3f})  -> {us(t_tm) * args.tokens / 1e6:6.2f} s")
    if t_torch:
        print(f"  same with the torch operations used on accelerators: {us(t_torch):.3f} us/token "
              f"({med(t_torch):.3f}); {min(t_seq) / min(t_torch):.1f}x the loop")
    print(f"  rows already in id order (no gather): {us(t_sorted):.3f} us/token ({med(t_sorted):.3f})")
    print(f"  {args.layers} layers, ids grouped once per batch: {us(t_grouped):.3f} us/token/layer "
          f"({med(t_grouped):.3f}); grouping {t_group / args.tokens * 1e6:.3f} us/token per batch")
    print(f"  state {acc.nbytes / 2**20:.1f} MiB ({acc.n_types} types, capacity {acc.capacity}); "
          f"peak RSS grew {rss_after_tm - rss_before:.0f} MiB "
          f"during its passes (process peak {rss_after_tm:.0f} MiB)")
    print(f"  table + decomposition + tradeoff: {t_tables * 1e3:.1f} ms")
    print(f"speed-up over the loop (best/best): {min(t_seq) / min(t_tm):.1f}x per token; "
          f"{min(t_seq) / min(t_sorted):.1f}x with rows in id order; "
          f"{min(t_seq) / min(t_grouped):.1f}x per token and layer with a shared grouping; "
          f"medians: {statistics.median(t_seq) / statistics.median(t_tm):.1f}x, "
          f"{statistics.median(t_seq) / statistics.median(t_sorted):.1f}x, "
          f"{statistics.median(t_seq) / statistics.median(t_grouped):.1f}x")
    print("decomposition: " + ", ".join(f"{k}={v:.6g}" for k, v in dec.items()))
    print("tradeoff: " + ", ".join(f"{k}={v:.4g}" for k, v in tr.items()))


if __name__ == "__main__":
    main()
