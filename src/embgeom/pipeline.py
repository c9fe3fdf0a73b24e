"""analyze(): corpus x model -> streaming accumulators -> metrics -> Result."""
from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from . import __version__
from .errors import EmbgeomError
from .extract import decoder_inputs, forward_hidden
from .models import LoadedModel, load_model
from .progress import token_progress
from .results import Result, layers_frame
from .stats.moments import Moments, NonFiniteInput
from .windows import WindowPlan, iter_batches, iter_windows, pad_token_id, validate_plan


@dataclass
class AnalysisConfig:
    """Every option of one analysis (recorded in run.json)."""

    max_tokens: int | None = None
    seq_len: int = 512
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "float32"
    id_sample: int = 10000
    token_types: str = "id"
    seed: int = 0
    exclude_special: bool = False
    exclude_positions: tuple = ()
    outlier_factor: float = 10.0
    text_field: str | None = None
    encoding_errors: str = "strict"
    min_count: int = 10
    max_count: int = 100000

    def validate(self) -> None:
        def positive_int(name, v, allow_none=False):
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise EmbgeomError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")

        positive_int("max_tokens", self.max_tokens, allow_none=True)
        positive_int("seq_len", self.seq_len)
        positive_int("batch_size", self.batch_size)
        if isinstance(self.id_sample, bool) or not isinstance(self.id_sample, (int, np.integer)) or self.id_sample < 0:
            raise EmbgeomError(f"--id-sample must be a non-negative integer, got {self.id_sample!r}")
        if self.token_types not in ("id", "string"):
            raise EmbgeomError(f"--token-types must be 'id' or 'string', got {self.token_types!r}")
        if not (isinstance(self.outlier_factor, (int, float)) and math.isfinite(self.outlier_factor) and self.outlier_factor > 1):
            raise EmbgeomError(f"--outlier-factor must be a number greater than 1, got {self.outlier_factor!r}")
        if self.encoding_errors not in ("strict", "replace", "ignore"):
            raise EmbgeomError(f"--encoding-errors must be strict, replace or ignore, got {self.encoding_errors!r}")
        if self.min_count < 1 or self.max_count < self.min_count:
            raise EmbgeomError(f"--min-count/--max-count must satisfy 1 <= min <= max, got {self.min_count}, {self.max_count}")


def _documents(corpus, cfg: AnalysisConfig):
    if isinstance(corpus, (list, tuple)):
        if not all(isinstance(d, str) for d in corpus):
            raise EmbgeomError("a corpus given as a list must hold strings (documents)")
        docs = [d for d in corpus if d.strip()]
        if not docs:
            raise EmbgeomError("the corpus list holds no non-blank document")
        return lambda: iter(docs)
    from .corpus import read_documents

    return lambda: read_documents(corpus, text_field=cfg.text_field, encoding_errors=cfg.encoding_errors)


def _versions() -> dict:
    import numpy
    import pandas
    import transformers

    return {
        "embgeom": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "pandas": pandas.__version__,
    }


class LayerStatistics:
    """The accumulators of one model: per stack, per layer (one per view)."""

    def __init__(self, n_layers: dict, width: int, device):
        self.moments = {
            stack: [Moments(width, device=device) for _ in range(n + 1)] for stack, n in n_layers.items()
        }

    def update(self, stack: str, hidden: Sequence[torch.Tensor], counted: torch.Tensor) -> None:
        idx = counted.reshape(-1).nonzero().squeeze(1)
        for layer, h in enumerate(hidden):
            x = h.reshape(-1, h.shape[-1]).index_select(0, idx)
            try:
                self.moments[stack][layer].update(x)
            except NonFiniteInput:
                raise EmbgeomError(
                    f"hidden states of {stack} layer {layer} are not finite (NaN or inf); "
                    "the model overflows in this dtype: try --dtype float32"
                ) from None


def _counted_decoder(plan: WindowPlan, model, batch) -> torch.Tensor:
    """The decoder stack's counted mask: its own input ids (shifted right)."""
    ids = decoder_inputs(model, batch.input_ids)
    mask = batch.attention_mask.bool().clone()
    if plan.exclude_special and plan.special_ids:
        mask &= ~torch.isin(ids, torch.tensor(sorted(plan.special_ids), device=ids.device))
    lengths = batch.attention_mask.sum(1)
    for p in plan.exclude_positions:
        if p >= 0:
            if p < mask.shape[1]:
                mask[:, p] = False
        else:
            rows = torch.arange(mask.shape[0], device=mask.device)
            q = lengths + p
            ok = q >= 0
            mask[rows[ok], q[ok]] = False
    # The start token is the decoder's own special token.
    if plan.exclude_special:
        mask[:, 0] = False
    return mask


def analyze(
    model,
    corpus,
    *,
    revision: str | None = None,
    step: int | None = None,
    progress: bool = False,
    cache_dir=None,
    **options,
) -> Result:
    """Measure the geometry of `model`'s hidden states over `corpus`, layer by layer.

    Parameters
    ----------
    model : str or LoadedModel
        A local Hugging Face directory, a `.gguf` file or a Hub id (see `load_model`).
    corpus : str, Path, or list of str
        A corpus file or directory (see `embgeom.corpus.read_documents`) or documents.
    revision : Hub revision (branch, tag or commit), for Hub ids.
    step : training step recorded in the `step` column (parsed from checkpoint names by sweeps).
    progress : show a progress bar.
    **options : the fields of `AnalysisConfig` (max_tokens, seq_len, batch_size,
        device, dtype, id_sample, token_types, seed, exclude_special,
        exclude_positions, outlier_factor, text_field, encoding_errors, min_count,
        max_count).
    """
    unknown = set(options) - set(AnalysisConfig.__dataclass_fields__)
    if unknown:
        raise EmbgeomError(f"unknown option(s) {sorted(unknown)}; known: {sorted(AnalysisConfig.__dataclass_fields__)}")
    cfg = AnalysisConfig(**options)
    cfg.exclude_positions = tuple(int(p) for p in (cfg.exclude_positions or ()))
    cfg.validate()
    docs = _documents(corpus, cfg)
    t0 = time.perf_counter()
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        if not isinstance(corpus, (list, tuple)) and not Path(corpus).exists():
            raise EmbgeomError(f"corpus {corpus} does not exist; pass a .txt, .jsonl, .csv, .parquet file or a datasets directory")
        loaded = load_model(model, revision=revision, dtype=cfg.dtype, device=cfg.device, cache_dir=cache_dir)
    t_load = time.perf_counter() - t0
    facts = loaded.facts
    tok = loaded.tokenizer
    plan = WindowPlan(
        seq_len=cfg.seq_len,
        prefix=tuple(facts.special_prefix),
        suffix=tuple(facts.special_suffix),
        special_ids=frozenset(int(i) for i in getattr(tok, "all_special_ids", []) or []),
        exclude_special=cfg.exclude_special,
        exclude_positions=cfg.exclude_positions,
        max_tokens=cfg.max_tokens,
    )
    validate_plan(plan, facts.max_length)

    # Pre-pass with the tokenizer alone: validates the corpus before any model work
    # and gives the progress bar its total.
    t1 = time.perf_counter()
    n_windows = n_counted = 0
    docs_used = set()
    for w in iter_windows(docs(), tok, plan):
        n_windows += 1
        n_counted += int(w.counted.sum())
        docs_used.add(w.doc)
    if n_counted == 0:
        raise EmbgeomError("no token is counted: the corpus is empty after tokenization or every position is excluded")
    t_count = time.perf_counter() - t1

    device = loaded.device
    is_ed = facts.kind == "encoder-decoder"
    stats = LayerStatistics(facts.n_layers, facts.width, device)
    pad = pad_token_id(tok)
    t2 = time.perf_counter()
    n_seen = {stack: 0 for stack in facts.n_layers}
    n_padded = 0
    with token_progress(n_counted, enabled=progress, description=loaded.name) as advance, torch.inference_mode():
        for batch in iter_batches(iter_windows(docs(), tok, plan), cfg.batch_size, pad):
            b = batch.to(device)
            hidden = forward_hidden(loaded.model, b.input_ids, b.attention_mask, is_ed, single_stack=facts.kind)
            n_padded += int(b.input_ids.numel())
            for stack, hs in hidden.items():
                counted = _counted_decoder(plan, loaded.model, b) if stack == "decoder" and is_ed else b.counted
                stats.update(stack, hs, counted)
                n_seen[stack] += int(counted.sum())
            advance(batch.n_counted)
    t_stream = time.perf_counter() - t2

    rows, spectrum_rows = [], []
    name = loaded.name
    for stack, per_layer in stats.moments.items():
        L = facts.n_layers[stack]
        for layer, m in enumerate(per_layer):
            lam: list = []
            metrics = m.metrics(eigenvalues_out=lam)
            row = dict(
                model=name, revision=revision or "", step=step, stack=stack, layer=layer, n_layers=L,
                depth=layer / L, view="all", n_tokens=m.n, **metrics,
            )
            rows.append(row)
            for rank, value in enumerate(lam[0], start=1):
                spectrum_rows.append(dict(model=name, revision=revision or "", step=step, stack=stack,
                                          layer=layer, view="all", rank=rank, eigenvalue=float(value)))
    import pandas as pd

    layers = layers_frame(rows)
    spectrum = pd.DataFrame(spectrum_rows)
    run = {
        "versions": _versions(),
        "config": {**asdict(cfg), "model": str(model) if not isinstance(model, LoadedModel) else facts.path,
                   "revision": revision, "step": step},
        "corpus": _corpus_record(corpus),
        "counts": {
            "windows": n_windows,
            "documents": len(docs_used),
            "tokens_counted": n_counted,
            "tokens_per_stack": n_seen,
            "padding_fraction": 1.0 - sum(n_seen.values()) / max(1, n_padded * len(n_seen)) if n_padded else 0.0,
        },
        "model": facts.to_dict(),
        "accumulator_bytes": int(sum(m.nbytes for ms in stats.moments.values() for m in ms)),
        "timings_s": {"load": t_load, "count": t_count, "stream": t_stream, "total": time.perf_counter() - t0},
        "device": str(device),
    }
    return Result(layers=layers, spectrum=spectrum, run=run)


def _corpus_record(corpus) -> dict:
    if isinstance(corpus, (list, tuple)):
        import hashlib

        h = hashlib.sha256()
        for d in corpus:
            h.update(d.encode("utf-8", "replace"))
            h.update(b"\0")
        return {"format": "list", "documents": len(corpus), "sha256": h.hexdigest()}
    from .corpus import corpus_fingerprint

    return corpus_fingerprint(corpus)
