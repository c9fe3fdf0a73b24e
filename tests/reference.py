"""An independent reference: every window run alone (no padding, no batching) with
`output_hidden_states`, the counted vectors gathered, statistics in two passes."""
from __future__ import annotations

import numpy as np
import torch


def windows_of(texts, tok, seq_len, prefix, suffix, max_tokens=None):
    step = seq_len - len(prefix) - len(suffix)
    out, total = [], 0
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids), step):
            w = list(prefix) + ids[s : s + step] + list(suffix)
            if max_tokens is not None and total + len(w) >= max_tokens:
                w = w[: len(prefix) + max(0, max_tokens - total - len(prefix) - len(suffix))] + list(suffix)
                out.append(w)
                return out
            out.append(w)
            total += len(w)
    return out


def hidden_vectors(model, windows, counted_fn=None, encoder_decoder=False):
    """{stack: [per-layer (n, d) float64 arrays]} of the counted positions."""
    per_stack: dict = {}
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            if encoder_decoder:
                dec = torch.tensor([[model.config.decoder_start_token_id] + w[:-1]])
                out = model(input_ids=ids, decoder_input_ids=dec, output_hidden_states=True)
                stacks = {"encoder": out.encoder_hidden_states, "decoder": out.decoder_hidden_states}
            else:
                out = model(input_ids=ids, output_hidden_states=True)
                stacks = {"main": out.hidden_states}
            keep = np.ones(len(w), dtype=bool) if counted_fn is None else counted_fn(w)
            for stack, hs in stacks.items():
                per = per_stack.setdefault(stack, [[] for _ in hs])
                for layer, h in enumerate(hs):
                    per[layer].append(h[0].double().numpy()[keep])
    return {s: [np.concatenate(v) for v in layers] for s, layers in per_stack.items()}


def two_pass(X: np.ndarray) -> dict:
    mu = X.mean(0)
    Xc = X - mu
    C = Xc.T @ Xc / len(X)
    lam = np.clip(np.linalg.eigvalsh(C)[::-1], 0, None)
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    s = U.sum(0)
    return {
        "n_tokens": len(X),
        "Q": float(np.mean(np.sum(X * X, 1))),
        "M": float(mu @ mu),
        "V": float(np.mean(np.sum(Xc * Xc, 1))),
        "anisotropy": float(lam[0] / lam.sum()),
        "mean_cosine": float((s @ s - len(X)) / (len(X) * (len(X) - 1))),
    }
