"""An independent reference: every window run alone (no padding, no batching) with
`output_hidden_states`, the counted vectors gathered, statistics in two passes."""
from __future__ import annotations

import numpy as np
import torch


def windows_of(texts, tok, seq_len, prefix, suffix):
    step = seq_len - len(prefix) - len(suffix)
    out = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids), step):
            out.append(list(prefix) + ids[s : s + step] + list(suffix))
    return out


def limit(windows, counted_fn, max_tokens):
    """Windows up to the one where max_tokens is reached, and a counted_fn that counts
    only the first max_tokens counted positions overall."""
    kept, masks, total = [], [], 0
    for w in windows:
        m = counted_fn(w).copy()
        if total + m.sum() >= max_tokens:
            m &= np.cumsum(m) <= max_tokens - total
            kept.append(w)
            masks.append(m)
            break
        kept.append(w)
        masks.append(m)
        total += int(m.sum())
    it = iter(masks)
    return kept, lambda w: next(it)


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


def hidden_vectors_with_ids(model, windows):
    """Like hidden_vectors for a single-stack model, also returning the token ids."""
    per_layer, ids = None, []
    with torch.no_grad():
        for w in windows:
            hs = model(input_ids=torch.tensor([w]), output_hidden_states=True).hidden_states
            if per_layer is None:
                per_layer = [[] for _ in hs]
            for layer, h in enumerate(hs):
                per_layer[layer].append(h[0].double().numpy())
            ids.extend(w)
    return [np.concatenate(v) for v in per_layer], np.asarray(ids)


def per_type(X: np.ndarray, types: np.ndarray) -> tuple[dict, dict]:
    """({type: (n, Q, M, V)}, {V, V_within, V_between}) in two passes."""
    mu = X.mean(0)
    out, within, between = {}, 0.0, 0.0
    for t in np.unique(types):
        Xt = X[types == t]
        mt = Xt.mean(0)
        Vt = float(np.mean(np.sum((Xt - mt) ** 2, 1)))
        out[int(t)] = (len(Xt), float(np.mean(np.sum(Xt * Xt, 1))), float(mt @ mt), Vt)
        within += len(Xt) * Vt
        between += len(Xt) * float((mt - mu) @ (mt - mu))
    n = len(X)
    return out, {"V": float(np.mean(np.sum((X - mu) ** 2, 1))), "V_within": within / n, "V_between": between / n}
