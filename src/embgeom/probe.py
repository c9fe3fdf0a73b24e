"""Geometry during training: measure a model held in memory on a fixed probe corpus.

* `measure(model, tokenizer, corpus, step)`: one measurement, returns a Result;
* `GeometryProbe(corpus, tokenizer, out=...)`: call it as `probe(model, step)` from a
  plain PyTorch loop; it keeps every measurement (`probe.layers`) and rewrites
  `out/layers.csv` after each one.

The Trainer integration, `GeometryCallback`, is in embgeom.callback.

The model is measured where it is (its device and dtype), in eval mode (no
dropout) and without gradients; the train/eval mode of every submodule is restored
afterwards and `requires_grad` flags are never touched. Rows carry the `step`
column, the `revision` column `step<N>` (so every measurement is its own series in
`embgeom plot`), and `train_loss`: the training loss given for that step, or the
latest one logged before it.
"""
from __future__ import annotations

import bisect
import math
import time
import weakref
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from ._lock import acquire, release
from ._names import display_name
from .errors import EmbgeomError
from .results import LAYER_COLUMNS, SPECTRUM_TABLE_COLUMNS, Result, combine, prepare_out_dir

TRAIN_LOSS = "train_loss"
LOG_KEYS = ("loss", "learning_rate", "grad_norm", "epoch")  # kept from a training log, with the step

# Facts about a model (layer count, width, norm placement...) are measured once per
# model object with two tiny forward passes; later measurements reuse them.
_FACTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _signature(model, tokenizer) -> tuple:
    p = next(model.parameters())
    return (str(p.dtype), str(p.device), sum(q.numel() for q in model.parameters()), id(tokenizer))


def _facts(model, tokenizer):
    from .models import inspect_model

    sig = _signature(model, tokenizer)
    try:
        cached = _FACTS.get(model)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and cached[0] == sig:
        return cached[1]
    facts = inspect_model(model, tokenizer, source="object", path=model_name(model))
    try:
        _FACTS[model] = (sig, facts)
    except TypeError:
        pass
    return facts


def model_name(model, default: str | None = None) -> str:
    """The `model` column for an in-memory model: the display name (as `embgeom run`
    gives it) of the path or Hub id it was loaded from, else `default`, else its
    class name."""
    path = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "").rstrip("/")
    if path:
        return display_name(path)
    return default or type(model).__name__


def step_label(step) -> str:
    return "" if step is None else f"step{int(step)}"


def measure(model, tokenizer, corpus, step: int | None = None, *, name: str | None = None, **options) -> Result:
    """Measure the geometry of `model` (in memory, e.g. while it trains) over `corpus`.

    The model runs in eval mode without gradients; the train/eval mode of every
    submodule is restored afterwards (also when the analysis fails), and
    `requires_grad` flags are not touched. `options` are those of `embgeom.analyze`
    (max_tokens, seq_len, batch_size, id_sample, ...); `device` and `dtype` do not
    apply: the model is measured where it is, in its dtype.
    """
    from .models import LoadedModel
    from .pipeline import analyze

    if tokenizer is None:
        raise EmbgeomError("measuring a model in memory needs its tokenizer; pass tokenizer=...")
    if not hasattr(model, "parameters") or not hasattr(model, "modules"):
        raise EmbgeomError(f"measure() needs a torch model, got {type(model).__name__}")
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        loaded = LoadedModel(model=model, tokenizer=tokenizer, name=name or model_name(model),
                             facts=_facts(model, tokenizer))
        return analyze(loaded, corpus, step=step, revision=step_label(step) or None, name=loaded.name, **options)
    finally:
        for m, training in modes:
            m.training = training


def log_spaced_steps(last: int, count: int, first: int = 1) -> list[int]:
    """About `count` distinct steps from `first` to `last`, evenly spaced in log(step):
    early training, where the geometry moves fastest, gets most of them."""
    if last < first or count < 1:
        return []
    grid = np.geomspace(first, last, num=count)
    return sorted({int(round(x)) for x in grid})


def _sorted_log(entries) -> list[dict]:
    """Loss entries ({"step", "loss", ...}) by step, one per step (the last logged wins)."""
    by_step = {}
    for e in entries:
        if e.get("loss") is not None and e.get("step") is not None:
            by_step[int(e["step"])] = dict(e, step=int(e["step"]))
    return [by_step[k] for k in sorted(by_step)]


class GeometryProbe:
    """Measure a model in memory again and again on one probe corpus; keep every row.

    `probe.layers` holds every row (the columns of layers.csv and `train_loss`). With
    `out`, the tables are rewritten after each measurement (layers.csv last,
    atomically), so they can be watched while training runs. A step measured again
    replaces its rows.

    Parameters
    ----------
    corpus : a corpus file (see `embgeom.corpus.read_documents`) or a list of texts;
        small (a few thousand tokens), so a measurement costs a few forward passes.
    tokenizer : the model's tokenizer (or pass it at the first call).
    out : a directory for the tables and, at `finish`, the training figures.
    name : the `model` column (default: the name of the path the model was loaded
        from, else its class name).
    keep_tokens : keep each step's per-type table (tokens.parquet).
    **options : those of `embgeom.analyze`, `protocol="paper-a"` or `"paper-b"`
        included (each paper's own way of computing its numbers).

    >>> import torch
    >>> from transformers import AutoTokenizer, BertConfig, BertModel
    >>> from embgeom import GeometryProbe
    >>> from embgeom.packaged import minilm_path
    >>> tok = AutoTokenizer.from_pretrained(minilm_path())
    >>> _ = torch.manual_seed(0)
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                              intermediate_size=64))  # a tiny untrained BERT
    >>> probe = GeometryProbe(["The cat sat on the mat.", "Layers change the states."], tok, id_sample=0)
    >>> for step in (0, 10):  # ... training between the measurements ...
    ...     _ = probe(model, step, train_loss=1.0 / (step + 1))
    >>> rows = probe.layers.query("view == 'all'")  # 3 hidden states per step
    >>> rows["step"].tolist(), rows["train_loss"].round(3).tolist()
    ([0, 0, 0, 10, 10, 10], [1.0, 1.0, 1.0, 0.091, 0.091, 0.091])
    """

    def __init__(self, corpus, tokenizer=None, *, out=None, name: str | None = None, keep_tokens: bool = False,
                 **options):
        from .pipeline import AnalysisConfig

        if isinstance(corpus, (str, Path)):
            if not Path(corpus).exists():
                raise EmbgeomError(f"probe corpus {corpus} does not exist; pass a corpus file or a list of texts")
            corpus = str(corpus)
        elif isinstance(corpus, Iterable):
            corpus = list(corpus)
            if not corpus or not all(isinstance(d, str) for d in corpus):
                raise EmbgeomError("a probe corpus given as a list must hold strings (documents)")
        else:
            raise EmbgeomError(f"the probe corpus must be a path or a list of texts, got {type(corpus).__name__}")
        AnalysisConfig.from_options(**options)  # bad options fail here, not at the first measurement
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.out = Path(out) if out is not None else None
        self.name = name
        self.keep_tokens = keep_tokens
        self.options = options
        self.training_log: list[dict] = []  # {"step", "loss", ...} as the trainer logged them, by step
        self._log_steps: list[int] = []  # the steps of training_log, for bisection
        self._results: dict = {}  # step -> Result (tokens dropped unless keep_tokens)
        self._loss_given: dict = {}  # step -> loss passed to __call__
        self.seconds: dict = {}  # step -> wall seconds the measurement took
        self._previous: Result | None = None  # rows of an earlier run in `out` (resumed training)
        if self.out is not None:  # writable now, not after the first measurement; keep what is there
            prepare_out_dir(self.out, keep_finished=True)
            # Held until `finish`: another process's probe or run cannot write here meanwhile.
            self._locked = acquire(self.out, "out")

    # ------------------------------------------------------------------ measuring
    @property
    def steps(self) -> list:
        return sorted(self._results, key=lambda s: (s is None, s or 0))

    def __call__(self, model, step: int | None = None, *, tokenizer=None, train_loss: float | None = None) -> Result:
        """Measure `model` at `step`; append (or replace) its rows; rewrite `out`."""
        tok = tokenizer or self.tokenizer
        if tok is None:
            raise EmbgeomError("GeometryProbe needs the model's tokenizer (tokenizer=...)")
        self.tokenizer = tok
        if self.name is None:
            self.name = model_name(model)
        step = None if step is None else int(step)
        t0 = time.perf_counter()
        res = measure(model, tok, self.corpus, step, name=self.name, **self.options)
        self.seconds[step] = time.perf_counter() - t0  # what each measurement cost the training run
        for table in (res.layers, res.spectrum, res.tokens):
            if table is not None and "step" in table.columns:
                table["step"] = pd.array([step] * len(table), dtype="Int64")
        if train_loss is not None:
            self._loss_given[step] = float(train_loss)
        kept = Result(layers=res.layers, spectrum=res.spectrum, tokens=res.tokens if self.keep_tokens else None,
                      outliers=res.outliers, run=res.run)
        self._results[step] = kept
        if self.out is not None:
            self.save()
        return res

    def set_log(self, entries: list[dict]) -> bool:
        """Replace the training log ({"step", "loss", ...} entries, as in the Trainer's
        log_history); True if the loss of a measured step changed."""
        before = [self._loss(s) for s in self._results]
        self.training_log = _sorted_log(entries)
        self._log_steps = [e["step"] for e in self.training_log]
        after = [self._loss(s) for s in self._results]
        return not np.array_equal(np.asarray(before, dtype=float), np.asarray(after, dtype=float), equal_nan=True)

    def add_log_entry(self, entry: dict) -> bool:
        """Add one logged loss; True if it is the loss of a measured step."""
        if entry.get("loss") is None or entry.get("step") is None:
            return False
        entry = dict(entry, step=int(entry["step"]))
        i = bisect.bisect_left(self._log_steps, entry["step"])
        if i < len(self._log_steps) and self._log_steps[i] == entry["step"]:
            self.training_log[i] = entry
        else:
            self._log_steps.insert(i, entry["step"])
            self.training_log.insert(i, entry)
        return entry["step"] in self._results

    def _loss(self, step) -> float:
        """The loss given for `step`, else the one logged at `step`, else the latest
        one logged before it, else NaN."""
        if step in self._loss_given:
            return self._loss_given[step]
        if step is None:
            return math.nan
        i = bisect.bisect_right(self._log_steps, step) - 1
        return float(self.training_log[i]["loss"]) if i >= 0 else math.nan

    def keep_previous(self, before_step: int) -> int:
        """Resumed training: keep the rows an earlier run wrote to `out` for steps
        before `before_step`. Returns how many steps were kept."""
        if self.out is None or not (self.out / "layers.csv").exists():
            return 0
        try:
            prev = Result.load(self.out)
        except (EmbgeomError, OSError, ValueError):
            return 0

        def before(df):
            if df is None or "step" not in df.columns:
                return df
            s = pd.to_numeric(df["step"], errors="coerce")
            return df[s.notna() & (s < before_step)].reset_index(drop=True)

        layers = before(prev.layers)
        if layers is None or layers.empty:
            return 0
        self._previous = Result(layers=layers, spectrum=before(prev.spectrum), tokens=before(prev.tokens),
                                outliers=None, run={})
        training = prev.run.get("training", {}) if isinstance(prev.run, dict) else {}
        if not self.training_log and training.get("log"):
            self.set_log([e for e in training["log"] if e.get("step", math.inf) < before_step])
        return int(layers["step"].nunique())

    # ------------------------------------------------------------------ tables
    @property
    def layers(self) -> pd.DataFrame:
        """Every row measured so far (earlier rows of a resumed run first), with `train_loss`."""
        return self.result().layers

    def result(self) -> Result:
        """Every measurement as one Result (the tables of layers.csv and friends)."""
        parts = []
        if self._previous is not None:
            parts.append(self._previous)
        for step in self.steps:
            r = self._results[step]
            layers = r.layers.copy()
            layers[TRAIN_LOSS] = self._loss(step)
            parts.append(Result(layers=layers, spectrum=r.spectrum, tokens=r.tokens, outliers=r.outliers, run=r.run))
        if not parts:
            return Result(layers=pd.DataFrame(columns=LAYER_COLUMNS + [TRAIN_LOSS]),
                          spectrum=pd.DataFrame(columns=SPECTRUM_TABLE_COLUMNS))
        res = combine(parts) if len(parts) > 1 else Result(layers=parts[0].layers, spectrum=parts[0].spectrum,
                                                            tokens=parts[0].tokens, outliers=parts[0].outliers,
                                                            run={"runs": [parts[0].run]})
        if TRAIN_LOSS not in res.layers.columns:
            res.layers[TRAIN_LOSS] = np.nan
        res.layers["step"] = pd.array(pd.to_numeric(res.layers["step"], errors="coerce"), dtype="Int64")
        res.run = {
            "training": {
                "model": self.name,
                "steps": [None if s is None else int(s) for s in self.steps],
                "log": self.training_log,
            },
            "runs": [p.run for p in parts if p.run],
        }
        return res

    def save(self, out=None, figures: bool = False) -> Path:
        """Write the tables and training_log.csv (and with `figures`, the training
        figures) to `out`, layers.csv last; the previous layers.csv stays readable
        until the new one replaces it."""
        from .output import save_run
        from .plots_training import plot_training

        out = Path(out) if out is not None else self.out
        if out is None:
            raise EmbgeomError("GeometryProbe.save needs an output directory")
        extra = {"training_log.csv": pd.DataFrame(self.training_log)} if self.training_log else None
        return save_run(self.result(), out, figures=figures, report=False, draw=plot_training, extra_tables=extra,
                        rewrite=True)

    def finish(self, figures: bool = True) -> Result:
        """Write the final tables and the training figures (when `out` is set); return everything."""
        if self.out is not None:
            self.save(figures=figures)
            if getattr(self, "_locked", None) is not None:
                release(self._locked)
                self._locked = None
        return self.result()
