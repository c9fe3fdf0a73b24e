"""Accuracy of `Moments` with float32 products against a float64 two-pass reference
(not a test; tests/test_precision.py asserts the bounds on small cases).

For each case the same vectors go through `Moments(precision="auto")` (float32
products for model-precision input) and `Moments(precision="float64")`, in batches
of varying sizes split over two accumulators that are merged (different reference
rows), and every metric is compared with the two-pass float64 formulas on the same
values. Prints the worst relative error per metric and case.

    .venv/bin/python benchmarks/precision.py [--tokens 8192] [--models minilm smollm2]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

METRICS = ["Q", "M", "V", "anisotropy", "anisotropy_uncentered", "mean_cosine", "isoscore", "effective_rank",
           "participation_ratio"]


def two_pass(X: np.ndarray) -> dict:
    """Every metric from its definition, float64, two passes (mean first)."""
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    mu = X.mean(0)
    Xc = X - mu
    lam = np.clip(np.linalg.eigvalsh(Xc.T @ Xc / n)[::-1], 0, None)
    lam_s = np.linalg.eigvalsh(X.T @ X / n)[::-1]
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    s = U.sum(0)
    p = lam[lam > 0] / lam.sum()
    sd = np.sqrt(d)
    delta = np.linalg.norm(sd * lam / np.linalg.norm(lam) - 1) / np.sqrt(2 * (d - sd))
    return {
        "Q": np.mean(np.sum(X * X, 1)), "M": mu @ mu, "V": np.mean(np.sum(Xc * Xc, 1)),
        "anisotropy": lam[0] / lam.sum(), "anisotropy_uncentered": lam_s[0] / lam_s.sum(),
        "mean_cosine": (s @ s - n) / (n * (n - 1.0)),
        "isoscore": ((d - delta**2 * (d - sd)) ** 2 - d) / (d * (d - 1)),
        "effective_rank": np.exp(-np.sum(p * np.log(p))),
        "participation_ratio": lam.sum() ** 2 / np.sum(lam**2),
    }


def streamed(X: torch.Tensor, precision: str, seed: int = 0) -> dict:
    """Metrics of X through two accumulators (batches of 1 to 3000 rows, alternating)
    merged into one."""
    from embgeom.stats.moments import Moments

    rng = np.random.default_rng(seed)
    parts = [Moments(X.shape[1], precision=precision) for _ in range(2)]
    start, i = 0, 0
    while start < len(X):
        nb = int(rng.integers(1, 3000))
        parts[i % 2].update(X[start:start + nb])
        start += nb
        i += 1
    return parts[0].merge(parts[1]).metrics()


def worst(cases: dict) -> dict:
    """{case: {metric: relative error}} for both precisions."""
    out = {}
    for name, X in cases.items():
        ref = two_pass(X.double().numpy())
        for precision in ("auto", "float64"):
            got = streamed(X, precision)
            out[(name, precision)] = {k: abs(got[k] - ref[k]) / abs(ref[k]) for k in METRICS}
    return out


def synthetic(n: int, d: int = 384) -> dict:
    g = torch.Generator().manual_seed(0)
    scales = torch.linspace(0.1, 1.0, d, dtype=torch.float64)
    X = 1e3 + torch.randn(n, d, generator=g, dtype=torch.float64) * scales
    X[:, :8] += 5 * torch.randn(n, 1, generator=g, dtype=torch.float64)  # one dominant direction
    return {"offset 1e3, spread 0.1-1, float32": X.float(), "same, bfloat16": X.bfloat16(),
            "same, float16": X.half()}


def hidden_states(model: str, n: int) -> dict:
    """Every layer's float32 hidden states of `n` tokens of the demo corpus, stacked per
    model as one case per layer (and the same values rounded to bfloat16)."""
    import tempfile
    from pathlib import Path

    from embgeom.corpus import read_documents
    from embgeom.extract import forward_hidden
    from embgeom.models import load_model
    from embgeom.packaged import minilm_path, smollm2_gguf_path
    from embgeom.wiki import write_demo_corpus
    from embgeom.windows import WindowPlan, iter_batches, iter_windows, pad_token_id

    path = {"minilm": minilm_path, "smollm2": smollm2_gguf_path}[model]()
    lm = load_model(str(path), device="cpu")
    corpus = write_demo_corpus(Path(tempfile.mkdtemp()) / "c.txt", max_words=int(n * 1.2) + 2000)
    plan = WindowPlan(seq_len=128, prefix=tuple(lm.facts.special_prefix), suffix=tuple(lm.facts.special_suffix),
                      max_tokens=n)
    layers = None
    with torch.no_grad():
        for b in iter_batches(iter_windows(read_documents(str(corpus)), lm.tokenizer, plan), 16,
                              pad_token_id(lm.tokenizer)):
            hs = next(iter(forward_hidden(lm.model, b.input_ids, b.attention_mask, False, "main").values()))
            keep = b.counted.reshape(-1)
            rows = [h.reshape(-1, h.shape[-1])[keep].float() for h in hs]
            layers = [[r] for r in rows] if layers is None else [a + [r] for a, r in zip(layers, rows)]
    return {f"{model} layer {i}": torch.cat(v) for i, v in enumerate(layers)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--models", nargs="*", default=["minilm", "smollm2"])
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    table = worst(synthetic(args.tokens))
    for model in args.models:
        layers = hidden_states(model, args.tokens)
        for dtype in (torch.float32, torch.bfloat16):
            errs = worst({k: v.to(dtype) for k, v in layers.items()})
            for precision in ("auto", "float64"):
                per = [e for (_, p), e in errs.items() if p == precision]
                label = f"{model}, all {len(layers)} layers, {str(dtype)[6:]}"
                table[(label, precision)] = {k: max(e[k] for e in per) for k in METRICS}
    print(f"worst relative error against the float64 two-pass reference ({args.tokens} vectors per case)")
    print("case | precision | " + " | ".join(METRICS) + " | worst")
    for (case, precision), e in table.items():
        print(f"{case} | {precision} | " + " | ".join(f"{e[k]:.1e}" for k in METRICS) + f" | {max(e.values()):.1e}")


if __name__ == "__main__":
    main()
