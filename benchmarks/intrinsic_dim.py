"""Benchmark: embgeom's exact k-NN and TwoNN against the honest baselines, on this CPU.

    python benchmarks/intrinsic_dim.py                        # n = 5k, 10k, 20k; d = 384
    python benchmarks/intrinsic_dim.py --sizes 5000 --dims 384 768 --ks 2 20
    python benchmarks/intrinsic_dim.py --npy layer.npy        # real hidden states, (N, d)

It names the CPU (model, whether it multiplies bfloat16 in hardware) and, in one
process on the same float64 data, times for each n, d and k (best of ``--repeat``,
median in brackets, peak resident memory growth of the call):

* ``knn`` at its defaults (``precision="auto"``: the faster exact candidate path,
  chosen by timing one tile of each) and forced to each exact path this CPU runs
  natively, timed in turn within each repeat (``fp32``; ``bf16`` only where bf16 is native: an emulated bf16 is skipped
  and the output says so); the default's ratio to the fastest;
* faiss-cpu ``IndexFlatL2`` (exact float32 search; if installed) and scikit-learn's
  brute-force ``NearestNeighbors``, with their ratio to embgeom's default and the
  fraction of rows whose neighbour sets equal embgeom's (rows with a tie at the k-th
  place, where any of the tied points may be listed, are left out);
* ``embgeom.twonn`` against scikit-dimension's ``TwoNN`` at ``--twonn-n`` points.

The first k-NN call of the process (numba import and cached code load) and the
one-time precision choice are timed and printed apart. Threads: torch's default (the
baselines get the same count). Prints only; asserts nothing. On 2 cores the defaults
finish in a few minutes; ``--quick`` runs n = 5k only.
"""
from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np
import torch

from embgeom import _hardware
from embgeom.metrics.intrinsic_dim import twonn
from embgeom.metrics.neighbors import knn


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measured(fn, repeat: int):
    """(best seconds, median seconds, peak RSS growth in bytes over the runs, result)."""
    times, out, peak = [], None, [0]
    base = rss_bytes()
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes() - base)
            time.sleep(0.002)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    try:
        for _ in range(repeat):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
    finally:
        stop.set()
        w.join()
    return min(times), float(np.median(times)), peak[0], out


def fmt(best, med, peak) -> str:
    return f"{best:7.3f} s ({med:.3f}) {peak / 2**20:6.0f} MiB"


def untied_rows(dist_k1: np.ndarray, k: int) -> np.ndarray:
    """Rows whose k-th distance is strictly below the (k+1)-th: their sets are unique."""
    return dist_k1[:, k - 1] < dist_k1[:, k]


def same_sets(a: np.ndarray, b: np.ndarray, rows: np.ndarray) -> float:
    return float((np.sort(a[rows], 1) == np.sort(b[rows], 1)).all(1).mean())


def data(n, d, seed=0):
    rng = np.random.default_rng(seed)
    # correlated, off-centre: the spectrum decays as in hidden states
    return rng.standard_normal((n, d)) @ (rng.standard_normal((d, d)) / np.sqrt(d)) * np.linspace(2, 0.2, d) + 3.0


def baselines(X, k, repeat, ref_idx, rows, t_ref):
    try:
        import faiss
    except ImportError:
        print("    faiss-cpu not installed: pip install faiss-cpu to compare with IndexFlatL2")
    else:
        faiss.omp_set_num_threads(torch.get_num_threads())
        X32 = np.ascontiguousarray(X, dtype=np.float32)

        def run_faiss():
            index = faiss.IndexFlatL2(X.shape[1])
            index.add(X32)
            return index.search(X32, k + 1)[1]

        b, m, p, I = measured(run_faiss, repeat)
        nb = np.array([[j for j in r if j != i][:k] for i, r in enumerate(I)])  # drop the point itself
        print(f"    faiss IndexFlatL2     {fmt(b, m, p)}   embgeom {b / t_ref:5.2f}x faster; "
              f"same sets {same_sets(nb, ref_idx, rows):.4f}")
    from sklearn.neighbors import NearestNeighbors

    def run_sklearn():
        return NearestNeighbors(n_neighbors=k, algorithm="brute").fit(X).kneighbors(return_distance=False)

    b, m, p, I = measured(run_sklearn, 1 if X.shape[0] > 10_000 else repeat)
    print(f"    sklearn brute force   {fmt(b, m, p)}   embgeom {b / t_ref:5.2f}x faster; "
          f"same sets {same_sets(I, ref_idx, rows):.4f}")


def bench_knn(X, k, repeat, native, compare):
    n, d = X.shape
    # The default and each forced path are timed in turn within every repeat, so the
    # machine's drift and the order of the calls weigh on all of them alike.
    calls = {"default": lambda: knn(X, k, return_info=True)}
    for precision in ("fp32", "bf16"):
        if precision == "bf16" and not native:
            continue
        calls[precision] = lambda p=precision: knn(X, k, precision=p)
    runs = {name: [] for name in calls}
    for _ in range(repeat):
        for name, fn in calls.items():
            runs[name].append(measured(fn, 1))
    timed = {name: (min(r[0] for r in rs), float(np.median([r[0] for r in rs])), max(r[2] for r in rs), rs[-1][3])
             for name, rs in runs.items()}
    b, m, p, (dist, idx, info) = timed.pop("default")
    print(f"  n={n} d={d} k={k}")
    print(f"    embgeom default       {fmt(b, m, p)}   -> {info['precision']} "
          f"(fallback rows {info['fallback_rows']})")
    if not native:
        print("    embgeom bf16          skipped: bf16 is emulated on this CPU (never the default)")
    for precision, (pb, pm, pp, (dp, ip)) in timed.items():
        same = "identical" if torch.equal(dp, dist) else "DIFFERENT"
        print(f"    embgeom {precision:<13} {fmt(pb, pm, pp)}   distances {same}")
    print(f"    default / fastest exact path: {b / min(t[0] for t in timed.values()):.2f}")
    if compare:
        ref = knn(X, k + 1)[0].numpy()
        baselines(X, k, repeat, idx.numpy(), untied_rows(ref, k), b)


def bench_twonn(n, d, repeat):
    import skdim

    X = data(n, d, seed=1)
    # both warm: one untimed call each (a cold first call of either pays imports and caches)
    skdim.id.TwoNN().fit(X)
    twonn(X)
    bs, ms, ps, est_s = measured(lambda: skdim.id.TwoNN().fit(X).dimension_, repeat)
    be, me, pe, est_e = measured(lambda: twonn(X), repeat)
    print(f"  TwoNN n={n} d={d}: scikit-dimension {fmt(bs, ms, ps)}; embgeom {fmt(be, me, pe)}; "
          f"embgeom {bs / be:.1f}x faster (best/best), {ms / me:.1f}x by medians; estimates {est_s:.4f} / {est_e:.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000, 20000])
    p.add_argument("--dims", type=int, nargs="+", default=[384])
    p.add_argument("--ks", type=int, nargs="+", default=[2, 20])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--twonn-n", type=int, default=8000)
    p.add_argument("--npy", help="an (N, d) array of hidden states instead of synthetic data")
    p.add_argument("--quick", action="store_true", help="n = 5k only")
    args = p.parse_args()
    native = _hardware.bf16_native()
    print(f"CPU: {_hardware.cpu_name()}; bf16 {'native' if native else 'EMULATED (bf16 paths skipped)'}; "
          f"{torch.get_num_threads()} torch threads; load {os.getloadavg()[0]:.1f}; torch {torch.__version__}")
    t = time.perf_counter()
    knn(np.random.default_rng(9).standard_normal((300, 8)), 2)
    print(f"first k-NN call of the process (numba import, cached code load): {time.perf_counter() - t:.2f} s")
    for d in args.dims:
        t = time.perf_counter()
        info = knn(np.random.default_rng(9).standard_normal((300, d)), 2, return_info=True)[2]
        print(f"precision choice at d={d}: {info['precision']}, tile timings {info['tile_seconds']} "
              f"(call incl. choice {time.perf_counter() - t:.3f} s)")
    sizes = [5000] if args.quick else args.sizes
    for d in args.dims:
        for n in sizes:
            X = np.load(args.npy)[:n].astype(np.float64) if args.npy else data(n, d)
            for k in args.ks:
                bench_knn(X, k, args.repeat, native, compare=(k == 2 and d == args.dims[0]))
    bench_twonn(args.twonn_n, args.dims[0], args.repeat)
    print(f"load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
