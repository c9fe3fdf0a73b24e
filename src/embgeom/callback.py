"""Geometry during training through the Hugging Face Trainer.

`GeometryCallback(corpus, every=N, out=...)` is a `transformers.TrainerCallback`
that measures the model being trained (with a GeometryProbe, embgeom.probe) at the
start of training, every N optimiser steps and at the end, and logs headline
numbers to the Trainer's loggers (log_history, TensorBoard, W&B, the console). Rows
carry `train_loss`: the training loss the Trainer logged at that step, or the
latest one logged before it.

`GeometryProbe`, `measure`, `model_name` and `log_spaced_steps` are importable
from here too.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from transformers import TrainerCallback

from .errors import EmbgeomError
from .probe import LOG_KEYS, GeometryProbe, log_spaced_steps, measure, model_name
from .results import Result

__all__ = ["GeometryCallback", "GeometryProbe", "headline_metrics", "log_spaced_steps", "measure", "model_name"]


def headline_metrics(layers: pd.DataFrame, prefix: str = "geometry", per_layer: bool = True) -> dict:
    """Scalars for the trainer's loggers from one measurement's rows: anisotropy (all
    tokens and inliers) and TwoNN intrinsic dimension (when measured) per layer and
    averaged over layers. Keys look like `geometry/anisotropy/layer_03`,
    `geometry/anisotropy_inliers/mean`; a stack name is added for encoder-decoders."""
    out = {}
    stacks = list(dict.fromkeys(layers["stack"]))
    for stack in stacks:
        s = layers[layers["stack"] == stack]
        base = prefix if len(stacks) == 1 else f"{prefix}/{stack}"
        width = len(str(int(s["layer"].max()))) if len(s) else 1
        for metric, view, key in (("anisotropy", "all", "anisotropy"), ("anisotropy", "inliers", "anisotropy_inliers"),
                                  ("id_twonn", "all", "id_twonn")):
            if metric not in s.columns:
                continue
            rows = s[s["view"] == view].sort_values("layer")
            values = pd.to_numeric(rows[metric], errors="coerce").to_numpy(dtype=float)
            if not np.isfinite(values).any():
                continue
            out[f"{base}/{key}/mean"] = float(np.nanmean(values))
            if per_layer:
                for layer, v in zip(rows["layer"], values):
                    if np.isfinite(v):
                        out[f"{base}/{key}/layer_{int(layer):0{width}d}"] = float(v)
    return out


def _find_trainer(callback):
    """The Trainer whose callback handler is calling `callback` right now, if any.

    A TrainerCallback is not given its Trainer; walking up the call stack to the
    object whose `callback_handler` holds this callback finds it, so the metrics can
    go through `Trainer.log` (log_history and every logger) without asking the user
    to wire anything. Returns None when it is not found (then `attach` is the way).
    """
    frame = inspect.currentframe()
    try:
        f = frame.f_back if frame is not None else None
        for _ in range(16):
            if f is None:
                return None
            obj = f.f_locals.get("self")
            handler = getattr(obj, "callback_handler", None)
            if handler is not None and callable(getattr(obj, "log", None)) and \
                    any(cb is callback for cb in getattr(handler, "callbacks", ())):
                return obj
            f = f.f_back
        return None
    finally:
        del frame


class GeometryCallback(TrainerCallback):
    """A `transformers.TrainerCallback` that measures the geometry of the model being
    trained on a fixed probe corpus.

    Measures at the start of training (step 0, or the step training resumes from),
    every `every` optimiser steps, and at the end (unless the last step was just
    measured): with `every=2` and `max_steps=5`, steps 0, 2, 4, 5. `every=None`
    measures at the start and the end only. `at_steps` adds steps of your own, e.g.
    `log_spaced_steps(max_steps, 12)` to see the first steps of training closely.

    corpus: a corpus path (see `embgeom.corpus.read_documents`) or a list of texts;
    keep it small (a few thousand tokens) so a measurement costs a few forward passes.
    out: a directory for layers.csv (rewritten after every measurement, atomically),
    layers.parquet, spectrum.parquet, outliers.csv, training_log.csv, run.json and,
    at the end of training, figures/training_*.png. A resumed training keeps the rows
    an earlier run wrote there for earlier steps.
    tokenizer: default, the Trainer's `processing_class` (or `tokenizer`).
    name: the `model` column (default: the name of the path the model was loaded from,
    else its class name).
    keep_tokens: keep each step's per-type table (tokens.parquet).
    log: send headline numbers (see `headline_metrics`) to the Trainer's loggers;
    log_layers: per layer as well as the mean over layers.
    **options: those of `embgeom.analyze` (max_tokens, seq_len, batch_size,
    id_sample, token_types, exclude_special, exclude_positions, outlier_factor, protocol, ...).

    `callback.layers` holds every row so far; `callback.probe` is the GeometryProbe.
    Only the main process measures in distributed training; the model must not be
    sharded (FSDP/ZeRO-3) across processes.

    >>> import tempfile, torch
    >>> from transformers import (AutoTokenizer, BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling,
    ...                           Trainer, TrainingArguments)
    >>> from embgeom import GeometryCallback
    >>> from embgeom.packaged import minilm_path
    >>> tok = AutoTokenizer.from_pretrained(minilm_path())
    >>> _ = torch.manual_seed(0)
    >>> model = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                                    intermediate_size=64))  # a tiny untrained BERT
    >>> texts = ["The cat sat on the mat.", "Layers change the states."]
    >>> cb = GeometryCallback(texts, every=None, log=False, figures=False, id_sample=0)
    >>> args = TrainingArguments(tempfile.mkdtemp(), max_steps=1, report_to=[], save_strategy="no", use_cpu=True,
    ...                          disable_tqdm=True)
    >>> trainer = Trainer(model=model, args=args, train_dataset=[tok(t) for t in texts], processing_class=tok,
    ...                   data_collator=DataCollatorForLanguageModeling(tok), callbacks=[cb])
    >>> _ = trainer.train()  # doctest: +ELLIPSIS
    {...'train_loss': ...}
    >>> cb.steps, cb.layers.shape[0]  # measured at the start and the end: 2 steps x 3 layers x 2 views
    ([0, 1], 12)
    """

    def __init__(self, corpus, every: int | None = 100, out=None, tokenizer=None, *, at_steps: Iterable[int] = (),
                 name: str | None = None, log: bool = True, log_layers: bool = True, figures: bool = True,
                 keep_tokens: bool = False, **options):
        if every is not None and (isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1):
            raise EmbgeomError(f"every must be a positive number of steps or None, got {every!r}")
        self.every = None if every is None else int(every)
        try:
            self.at_steps = frozenset(int(s) for s in at_steps)
        except (TypeError, ValueError):
            raise EmbgeomError(f"at_steps must be a list of step numbers, got {at_steps!r}") from None
        self.probe = GeometryProbe(corpus, tokenizer, out=out, name=name, keep_tokens=keep_tokens, **options)
        self.log = log
        self.log_layers = log_layers
        self.figures = figures
        self._trainer = None
        self._measured_steps: set = set()

    # ------------------------------------------------------------------ public
    @property
    def layers(self) -> pd.DataFrame:
        return self.probe.layers

    @property
    def steps(self) -> list:
        return self.probe.steps

    def result(self) -> Result:
        return self.probe.result()

    @property
    def seconds(self) -> dict:
        """step -> wall seconds each measurement took."""
        return self.probe.seconds

    def attach(self, trainer):
        """Add this callback to `trainer` (if it is not there yet) and log through it."""
        if not any(cb is self for cb in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        self._trainer = trainer
        return trainer

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, processing_class=None, tokenizer=None, **kwargs):
        if self._trainer is None:
            self._trainer = _find_trainer(self)
        if self.probe.name is None:
            default = Path(str(getattr(args, "output_dir", "") or "")).name or None
            self.probe.name = model_name(model, default) if model is not None else default
        if state.global_step > 0:
            self.probe.keep_previous(state.global_step)
        self._measure(args, state, control, model, processing_class or tokenizer)

    def on_step_end(self, args, state, control, model=None, processing_class=None, tokenizer=None, **kwargs):
        if (self.every is not None and state.global_step % self.every == 0) or state.global_step in self.at_steps:
            self._measure(args, state, control, model, processing_class or tokenizer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and state.is_world_process_zero:
            entry = {k: logs[k] for k in LOG_KEYS if k in logs}
            if self.probe.add_log_entry(dict(entry, step=state.global_step)) and self.probe.out is not None:
                self.probe.save()

    def on_train_end(self, args, state, control, model=None, processing_class=None, tokenizer=None, **kwargs):
        if state.global_step not in self._measured_steps:
            self._measure(args, state, control, model, processing_class or tokenizer)
        if state.is_world_process_zero:
            self.probe.set_log(_training_log(state))
            if self.probe.out is not None:
                self.probe.finish(figures=self.figures)

    # ------------------------------------------------------------------ internals
    def _measure(self, args, state, control, model, tokenizer) -> None:
        if not state.is_world_process_zero:
            return
        if model is None:
            raise EmbgeomError("GeometryCallback was not given the model; use it through transformers.Trainer")
        if self.probe.tokenizer is None and tokenizer is None:
            raise EmbgeomError("GeometryCallback needs a tokenizer: pass tokenizer=... or give the Trainer "
                               "processing_class=tokenizer")
        step = int(state.global_step)
        self.probe.set_log(_training_log(state))
        res = self.probe(model, step, tokenizer=self.probe.tokenizer or tokenizer)
        self._measured_steps.add(step)
        if self.log:
            metrics = headline_metrics(res.layers, per_layer=self.log_layers)
            if metrics:
                if self._trainer is not None:
                    # Trainer.log clears control.should_log; keep the trainer's own
                    # decision to log this step (its loss) intact.
                    should_log = getattr(control, "should_log", False)
                    self._trainer.log(metrics)
                    if control is not None:
                        control.should_log = should_log
                else:
                    state.log_history.append({**metrics, "step": step})


def _training_log(state) -> list[dict]:
    return [{k: e[k] for k in ("step",) + LOG_KEYS if k in e} for e in getattr(state, "log_history", []) if "loss" in e]
