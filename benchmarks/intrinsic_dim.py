"""Benchmark: embgeom's exact-k-NN intrinsic-dimension estimators against scikit-dimension.

    python benchmarks/intrinsic_dim.py                    # synthetic data, n = 5k, 10k, 20k
    python benchmarks/intrinsic_dim.py --npy layer.npy    # real hidden states, (N, d) array

For each n it times ``embgeom.metrics.intrinsic_dim.twonn`` against
``skdim.id.TwoNN()`` and ``mle_id`` against ``skdim.id.MLE(K=20)`` on the same
float64 data (best of ``--repeat`` runs for both, embgeom's median printed too; scikit-dimension once where one run
takes longer than ``--skdim-repeat-below`` seconds; the first embgeom call of the
process, which loads its compiled loops, is timed and printed apart), prints the ratio of the
times and the relative difference of the estimates, times ``twonn`` once more with the
compiled k-NN loops switched off (the torch path, as on a GPU or without numba), says
whether the compiled path ran its tiles on two lanes (``_LANES`` in
``embgeom.metrics.neighbors``), and reports this machine's float32 and bfloat16 matrix-multiply throughput
(torch.mm of 4096², the ceilings) next to the throughput the k-NN achieves. It also
checks the k-NN itself: the bf16 candidate path against the float32 one (both exact:
the difference must be 0), how many rows the bf16 bound could not certify (those take
the float64 fallback), and skdim's TwoNN given embgeom's exact distances. With
``faiss-cpu`` installed it times faiss's exact float32 ``IndexFlatL2`` as well (float32
distances, not exact; shown for speed only). For the k = 20 k-NN it prints the peak
memory as well: the largest resident set beyond the data's own float64 copy, measured in
a fresh child process per n (so that nothing the parent did earlier shows up in it),
after one small call that loads the compiled code.
Prints only; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import numpy as np
import torch

from embgeom.metrics import neighbors as nbmod
from embgeom.metrics.intrinsic_dim import intrinsic_dimensions, mle_id, twonn
from embgeom.metrics.neighbors import knn_distances
from embgeom.stats import _kernels as kmod

# Time the compiled loops from the first call, not the default "auto" rule (which
# keeps the torch path until its extra time repays loading numba).
kmod.ENABLED = True


_MEDIAN = [float("nan")]  # median of the last _best's runs


def _best(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    _MEDIAN[0] = float(np.median(times))
    return min(times), out


def matmul_gflops(size=4096, repeat=5, dtype=torch.float32):
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    t, _ = _best(lambda: torch.mm(a, b), repeat)
    return 2 * size**3 / t / 1e9


def knn_flops(n, d, block=2048, split=False):
    """Float32 multiply-add flops the k-NN performs: the upper triangle of
    block × block tiles (each tile serves its rows and its columns); with ``split``
    (the compiled path) a diagonal block of at least 2 × ``_SPLIT_MIN`` points is two
    diagonal tiles of its halves and the tile between them. (The compiled path's two
    lanes use blocks of ``_LANE_BLOCK``: pass that as ``block``.)"""
    group = 16
    n_pad = -(-n // group) * group
    b = max(group, block // group * group)
    sizes = [min(b, n_pad - s) for s in range(0, n_pad, b)]
    total = 0
    for i, si in enumerate(sizes):
        if split and si >= 2 * nbmod._SPLIT_MIN:
            h = si // 2 // group * group
            total += 2 * (h * h + (si - h) ** 2 + h * (si - h)) * d
        else:
            total += 2 * si * si * d
        for sj in sizes[i + 1 :]:
            total += 2 * si * sj * d
    return total


def _status_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/self/status")


def _peak_child(path, k, threads):
    """Child process: load the (n, d) float64 array, make one small k-NN call (which
    loads the compiled code), then run the k-NN once and report the peak resident set
    beyond what was resident before that call. The peak is the
    kernel's high-water mark (VmHWM, reset first through /proc/self/clear_refs), or,
    where that cannot be reset, the maximum of VmRSS sampled every 0.2 ms."""
    if threads:
        torch.set_num_threads(threads)
    X = torch.from_numpy(np.load(path))
    m = min(len(X), 64)  # a small call (several tiles) loads the compiled loops first
    knn_distances(X[:m], min(k, max(1, m - 1)), block_size=16)
    before = _status_mib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm = _status_mib("VmHWM") <= before + 1
    except OSError:
        hwm = False
    peak, stop = [before], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _status_mib("VmRSS"))
            time.sleep(0.0002)

    th = None if hwm else threading.Thread(target=sample, daemon=True)
    if th:
        th.start()
    t = time.perf_counter()
    knn_distances(X, k)
    elapsed = time.perf_counter() - t
    if th:
        stop.set()
        th.join()
    top = _status_mib("VmHWM") if hwm else peak[0]
    print(json.dumps(dict(transient_mib=top - before, x_mib=X.numel() * 8 / 2**20, seconds=elapsed,
                          method="VmHWM" if hwm else "VmRSS sampling")))


def knn_peak_memory(X, k, threads=0):
    """Peak memory of one ``knn_distances(X, k)`` call (float64 X) in a fresh process:
    a dict with ``transient_mib`` (beyond X itself), ``x_mib``, ``seconds``, ``method``;
    None where it cannot be measured (no /proc)."""
    if not os.path.exists("/proc/self/status"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.npy")
        np.save(path, np.ascontiguousarray(X, dtype=np.float64))
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--peak-child", path,
                              "--peak-k", str(k), "--threads", str(threads)],
                             capture_output=True, text=True)
    if res.returncode != 0:
        print(f"  (peak-memory child failed: {res.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def synthetic(n, d=576, intrinsic=12, seed=0):
    """A curved 12-dimensional manifold in R^576 that looks a little like hidden states:
    a smooth nonlinear map of a 12-d Gaussian, an offset mean far from the origin, a few
    high-variance coordinates, and isotropic noise."""
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, intrinsic))
    W1 = rng.standard_normal((intrinsic, 64)) / np.sqrt(intrinsic)
    W2 = rng.standard_normal((64, d)) / np.sqrt(64)
    X = np.tanh(Z @ W1 * 1.5) @ W2 * 4.0
    X[:, :4] *= 8.0  # a few dominant directions
    X += rng.standard_normal(d) * 3.0  # mean far from the origin
    X += 0.05 * rng.standard_normal((n, d))
    return X


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--npy", help="(N, d) array of real hidden states (rows are tokens)")
    ap.add_argument("--sizes", default="5000,10000,20000", help="comma-separated n (default 5000,10000,20000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of embgeom per timing (best is reported)")
    ap.add_argument("--skdim-repeat-below", type=float, default=5.0,
                    help="time scikit-dimension once when one run takes longer than this many seconds")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads for torch and for numpy's BLAS (scikit-dimension) alike (default: the libraries' choice)")
    ap.add_argument("--estimators", default="twonn,mle",
                    help="comma-separated estimators to compare: twonn, mle (default both)")
    ap.add_argument("--peak-child", help=argparse.SUPPRESS)  # internal: one peak-memory measurement
    ap.add_argument("--peak-k", type=int, default=20, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peak_child:
        return _peak_child(args.peak_child, args.peak_k, args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(args.threads)
        except ImportError:
            print("  (threadpoolctl not installed: numpy's BLAS threads are not limited)")
    try:
        import skdim
    except ImportError:
        skdim = None
    sizes = [int(s) for s in args.sizes.split(",") if s]

    print("embgeom intrinsic-dimension benchmark")
    print(f"  machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"  scikit-dimension: {getattr(skdim, '__version__', 'not installed')}")
    compiled = kmod.use_kernels(torch.device("cpu"))
    print(f"  embgeom k-NN on the CPU: {'compiled loops (numba)' if compiled else 'torch path (numba unavailable)'}")
    wanted = {e.strip().lower() for e in args.estimators.split(",") if e.strip()}
    ceiling = matmul_gflops()
    ceiling16 = matmul_gflops(dtype=torch.bfloat16)
    print(f"  matmul ceilings (torch.mm 4096x4096): float32 {ceiling:.0f} GFLOP/s, bfloat16 {ceiling16:.0f} GFLOP/s")
    try:
        import faiss
    except ImportError:
        faiss = None
    print(f"  faiss: {getattr(faiss, '__version__', 'not installed')}")

    if args.npy:
        data = np.load(args.npy, mmap_mode="r")
        if data.ndim != 2:
            raise SystemExit(f"--npy must hold a 2-d (N, d) array, got shape {data.shape}")
        print(f"  data: {args.npy}, {data.shape[0]} x {data.shape[1]} ({data.dtype}); a seeded random subset of n rows")
        rng = np.random.default_rng(0)
        pick = lambda n: np.asarray(data[np.sort(rng.choice(data.shape[0], size=min(n, data.shape[0]), replace=False))], dtype=np.float64)
    else:
        print("  data: SYNTHETIC - 12-d curved manifold in R^576 (tanh features, dominant axes, "
              "offset mean, noise 0.05); pass --npy for real hidden states")
        pick = lambda n: synthetic(n)
    print()
    hdr = (f"{'n':>6} {'d':>4} | {'estimator':<9} {'embgeom':>10} {'skdim':>10} {'speed-up':>8} | "
           f"{'estimate':>10} {'skdim est.':>10} {'rel. diff':>9}")
    print(hdr)
    print("-" * len(hdr))
    rows = []
    first = True
    for n in sizes:
        X = pick(n)
        n, d = X.shape
        Xt = torch.from_numpy(X)
        if first:
            t_cold, _ = _best(lambda: twonn(Xt), 1)
            print(f"{'':>6} {'':>4} | first embgeom call in this process (loads the compiled loops): {t_cold:.3f}s")
            first = False
        for key, name, ours, theirs in (
            ("twonn", "TwoNN", lambda: twonn(Xt), lambda: skdim.id.TwoNN().fit(X).dimension_ if skdim else None),
            ("mle", "MLE k=20", lambda: mle_id(Xt, 20), lambda: skdim.id.MLE(K=20).fit(X).dimension_ if skdim else None),
        ):
            if key not in wanted:
                continue
            t_ours, est = _best(ours, args.repeat)
            med_ours = _MEDIAN[0]
            t_sk, ref = float("nan"), None
            if skdim is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t_sk, ref = _best(theirs, 1)
                    if t_sk < args.skdim_repeat_below and args.repeat > 1:
                        t2, _ = _best(theirs, args.repeat - 1)
                        t_sk = min(t_sk, t2)
            once = " (1 run)" if t_sk >= args.skdim_repeat_below else ""
            rel = abs(est - ref) / abs(ref) if ref else float("nan")
            print(f"{n:>6} {d:>4} | {name:<9} {t_ours:>9.3f}s {t_sk:>9.2f}s{once:<0} {t_sk / t_ours:>7.1f}x | "
                  f"{est:>10.5f} {ref if ref is not None else float('nan'):>10.5f} {rel:>9.1e}")
            print(f"{'':>6} {'':>4} | {name}: embgeom median of {args.repeat} runs {med_ours:.3f}s = "
                  f"{t_sk / med_ours:.1f}x skdim's best")
            rows.append((n, name, t_ours, t_sk, rel))
            if key == "twonn" and compiled:
                kmod.ENABLED = False
                try:
                    t_torch, est_torch = _best(ours, args.repeat)
                finally:
                    kmod.ENABLED = True
                print(f"{'':>6} {'':>4} | TwoNN, compiled loops off (torch path): {t_torch:.3f}s = "
                      f"{t_sk / t_torch:.1f}x skdim; compiled/torch estimates differ by {abs(est_torch - est):.1e}")
        # the k-NN alone, and the pipeline path (one k = 20 k-NN for every estimate)
        t2, dist2 = _best(lambda: knn_distances(Xt, 2), args.repeat)
        info2 = dict(nbmod._LAST)
        t20, dist = _best(lambda: knn_distances(Xt, 20), args.repeat)
        info20 = dict(nbmod._LAST)
        tb, res = _best(lambda: intrinsic_dimensions(distances=dist), args.repeat)
        lanes = compiled and info20.get("lanes")
        fl = knn_flops(n, d, block=nbmod._LANE_BLOCK if lanes else 2048, split=compiled and nbmod._SPLIT_DIAG)
        ceil = ceiling16 if info20.get("precision") == "bf16" else ceiling
        pipe = "; two lanes: k=2 %s, k=20 %s" % (info2.get("lanes"), info20.get("lanes"))
        print(f"{'':>6} {'':>4} | k-NN ({info20.get('precision')} candidates{pipe if compiled else ''}) k=2: {t2:.3f}s = {fl / t2 / 1e9:.0f} GFLOP/s, "
              f"k=20: {t20:.3f}s = {fl / t20 / 1e9:.0f} GFLOP/s ({100 * fl / t20 / 1e9 / ceil:.0f}% of the "
              f"{info20.get('precision')} ceiling; {fl / 1e9:.1f} GFLOP in the symmetric tiles, "
              f"{2 * n * n * d / 1e9:.1f} in a full product)")
        mem = knn_peak_memory(X, 20, args.threads)
        if mem is not None:
            print(f"{'':>6} {'':>4} | k-NN k=20 peak memory (fresh process, {mem['method']}): "
                  f"{mem['transient_mib']:.0f} MiB beyond X's own float64 copy ({mem['x_mib']:.0f} MiB); "
                  f"that run took {mem['seconds']:.3f}s (after one call on 64 rows, which loads the compiled code)")
        t32, d32 = _best(lambda: knn_distances(Xt, 20, precision="fp32"), 1)
        print(f"{'':>6} {'':>4} | exactness: rows the bound could not certify (float64 fallback) k=2: "
              f"{info2.get('fallback_rows')}, k=20: {info20.get('fallback_rows')}; max |bf16 path - fp32 path| "
              f"= {float((d32 - dist).abs().max()):.1e} (fp32 path {t32:.3f}s)")
        if skdim is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = skdim.id.TwoNN(dist=True).fit(dist2.numpy()).dimension_
            ours = twonn(Xt)
            print(f"{'':>6} {'':>4} | skdim TwoNN(dist=True) on embgeom's exact distances: {ref:.10f}, "
                  f"embgeom {ours:.10f}, rel. diff {abs(ours - ref) / abs(ref):.1e}")
        if faiss is not None:
            X32 = np.ascontiguousarray(X, dtype=np.float32)

            def flat(kk):
                index = faiss.IndexFlatL2(d)
                index.add(X32)
                return index.search(X32, kk + 1)

            tf2, _ = _best(lambda: flat(2), args.repeat)
            tf20, _ = _best(lambda: flat(20), args.repeat)
            print(f"{'':>6} {'':>4} | faiss IndexFlatL2 (float32, not exact): k=2 {tf2:.3f}s, k=20 {tf20:.3f}s")
        print(f"{'':>6} {'':>4} | pipeline (one k=20 k-NN + all id_* columns): {t20 + tb:.3f}s -> "
              f"twonn {res['id_twonn']:.4f}, twonn_ml {res['id_twonn_ml']:.4f} "
              f"[{res['id_twonn_ml_low']:.4f}, {res['id_twonn_ml_high']:.4f}], mle {res['id_mle']:.4f}, n {res['id_n']}")
    print()
    if skdim is not None and rows:
        for est in ("TwoNN", "MLE k=20"):
            sel = [r for r in rows if r[1] == est]
            if sel:
                print(f"{est}: speed-ups " + ", ".join(f"n={r[0]} {r[3] / r[2]:.1f}x" for r in sel)
                      + f" (target 10x); largest relative difference of the estimates {max(r[4] for r in sel):.1e}")


if __name__ == "__main__":
    main()
