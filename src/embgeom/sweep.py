"""Checkpoint sweeps: several checkpoints of one training run analysed into one table.

What the user names is expanded into `Target`s:

* a Hub id with `--revision R1 --revision R2 ...` (Pythia's `stepN`, BLOOM's
  `global_stepN`, OLMo's `stepN-tokensM`): one target per revision;
* a directory without `config.json` that holds `checkpoint-N` subdirectories (the
  Hugging Face Trainer's layout): one target per checkpoint (`--revision
  checkpoint-N` picks some of them);
* a list of model directories (`run/checkpoint-*`, or any model directories).

The `step` of a target is parsed from its revision or directory name
(`parse_step`), or given explicitly (`--step`). Targets are analysed in order of
step (unknown steps last, in the order given). Each finished target is saved under
`OUT/checkpoints/<slug>/`, so a sweep that is interrupted, or extended with more
checkpoints, and run again analyses only what is missing; the combined tables and
figures are written to `OUT/` last.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pandas as pd

from ._atomic import write_text
from ._lock import holding
from .errors import EmbgeomError
# Naming and ordering the targets lives in .sweep_targets; its public names are
# re-exported here, where callers import the sweep from.
from .sweep_targets import Target, checkpoint_dirs, expand_targets, is_sweep, parse_step

CHECKPOINTS_DIR = "checkpoints"
TARGET_FILE = "sweep-target.json"
# Options that change how fast an analysis runs, not what it measures: a finished
# checkpoint is reused when only these differ.
EXECUTION_OPTIONS = {"device", "device_map", "batch_size"}

# --------------------------------------------------------------------------- running


def _options_key(options: dict) -> dict:
    from .pipeline import AnalysisConfig

    cfg = asdict(AnalysisConfig.from_options(**options))
    cfg["exclude_positions"] = [int(p) for p in (cfg.get("exclude_positions") or ())]
    return {k: v for k, v in sorted(cfg.items()) if k not in EXECUTION_OPTIONS}


def _corpus_key(corpus) -> dict:
    from .pipeline import _corpus_record, corpus_contents

    if not isinstance(corpus, (list, tuple)) and not Path(corpus).exists():
        raise EmbgeomError(f"corpus {corpus} does not exist; pass a .txt, .jsonl, .csv, .parquet file or a datasets directory")
    return corpus_contents(_corpus_record(corpus))


def _hub_commit(spec: str, revision: str | None) -> str | None:
    """The commit a Hub id's revision resolves to in the local cache, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(spec, "config.json", revision=revision or "main",
                                       cache_dir=os.environ.get("HF_HUB_CACHE"))
    except Exception:  # noqa: BLE001 - not a valid repo id, no cache: nothing to say
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def content_fingerprint(t: Target) -> dict:
    """What says the checkpoint is still the one analysed: its files' names, sizes
    and modification times (what a snapshot checks), or for a Hub id the commit its
    revision resolves to in the local cache."""
    p = Path(os.path.expanduser(t.spec))
    if p.exists():
        from .snapshot import model_files

        return {"files": model_files(p)}
    return {"hub_commit": _hub_commit(t.spec, t.revision)}


def _target_record(t: Target, options_key: dict, corpus_key: dict) -> dict:
    return {
        "target": {"spec": t.location, "key": t.key, "revision": t.revision, "step": t.step, "name": t.name,
                   "label": t.label},
        "content": content_fingerprint(t),
        "options": options_key,
        "corpus": corpus_key,
    }


def _normalise_json(obj):
    return json.loads(json.dumps(obj, default=str))


def _comparable(record: dict) -> dict:
    """The parts of a target record that must match for a finished target to be reused:
    what was loaded (resolved path or Hub id, and revision) and its contents (a
    checkpoint retrained in place is analysed again), its labels, the options and
    the corpus contents; not how the path was spelled."""
    rec = _normalise_json(record)
    rec["target"] = {k: v for k, v in rec.get("target", {}).items() if k != "spec"}
    return rec


def _finished(folder: Path, record: dict) -> bool:
    if not (folder / "layers.csv").exists() or not (folder / TARGET_FILE).exists():
        return False
    try:
        saved = json.loads((folder / TARGET_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and _comparable(saved) == _comparable(record)


def _relabel(result, t: Target):
    """Put the target's label into the `revision` column of every table."""
    if t.label is None:
        return result
    for table in (result.layers, result.spectrum, result.tokens, result.outliers):
        if table is not None and "revision" in table.columns:
            table["revision"] = t.label
    result.run.setdefault("config", {})["checkpoint"] = t.label
    return result


def _step_int(result):
    """Integer `step` columns (nullable), so tables read back identically."""
    for table in (result.layers, result.spectrum, result.tokens):
        if table is not None and "step" in table.columns:
            table["step"] = pd.array(pd.to_numeric(table["step"], errors="coerce"), dtype="Int64")
    return result


def slugs(targets: Sequence[Target]) -> list[str]:
    """Folder names under OUT/checkpoints/, one per target, unique."""
    base = [t.slug for t in targets]
    counts: dict = {}
    for b in base:
        counts[b] = counts.get(b, 0) + 1
    return [b if counts[b] == 1 else f"{b}-{t.key}" for b, t in zip(base, targets)]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@holding("out", "out")  # one sweep per output directory at a time
def run_sweep(targets: Iterable[Target], corpus, out, *, progress: bool = True, figures: bool = True, cache_dir=None,
              say: Callable[[str], None] | None = _stderr, snapshot_every: float = 300.0, resume: bool = False,
              **options):
    """Analyse every target over `corpus` into one output directory; return the
    combined Result.

    Each finished target is saved (tables, no figures) under
    `out/checkpoints/<slug>/` with a record of its options and corpus; a target
    already finished there with the same options and corpus is loaded instead of
    analysed again (`device` and `batch_size` may differ). The combined tables and
    the figures (training dynamics among them) are written to `out/`, `layers.csv`
    last. `options` are those of `embgeom.analyze`. The target being analysed keeps
    snapshots in its folder; with `resume` a killed sweep continues from them.
    Under torchrun every rank analyses together and rank 0 writes; the others
    return None.
    """
    from .distributed import Shard
    from .output import save_run
    from .pipeline import analyze, preflight
    from .results import Result, combine, prepare_out_dir
    from .snapshot import SNAPSHOT_DIR

    shard = Shard.from_environment(options.get("device", "auto"))
    say = (say or (lambda msg: None)) if shard.is_main else (lambda msg: None)
    targets = [t if isinstance(t, Target) else Target(str(t)) for t in targets]
    if not targets:
        raise EmbgeomError("the sweep has no checkpoint to analyse")
    options_key = _options_key(options)
    corpus_key = _corpus_key(corpus)
    out = prepare_out_dir(out)
    root = out / CHECKPOINTS_DIR
    folders = [root / name for name in slugs(targets)]
    records = [_target_record(t, options_key, corpus_key) for t in targets]
    finished = [_finished(folder, record) for folder, record in zip(folders, records)]
    # Every checkpoint still to analyse is found and checked before the first one is
    # analysed: a misspelled last one fails now, not after hours of work.
    for t, done in zip(targets, finished):
        if not done:
            preflight(t.spec, revision=t.revision, cache_dir=cache_dir, **options)
    results = []
    for i, (t, folder, record, done) in enumerate(zip(targets, folders, records, finished), 1):
        where = f"[{i}/{len(targets)}] {t.display}" + (f" (step {t.step})" if t.step is not None else "")
        if done:
            say(f"{where}: finished earlier, loading {folder}")
        else:
            if (folder / "layers.csv").exists():
                say(f"{where}: {folder} was made with other options, another corpus or other weights; "
                    "analysing again")
            else:
                say(f"{where}: analysing")
            res = analyze(t.spec, corpus, revision=t.revision, step=t.step, name=t.name, progress=progress,
                          cache_dir=cache_dir, snapshot_dir=folder / SNAPSHOT_DIR, snapshot_every=snapshot_every,
                          resume="auto" if resume else False, **options)
            if res is None:  # not rank 0: rank 0 writes
                continue
            res = _step_int(_relabel(res, t))
            if record["content"].get("hub_commit", "") is None:  # downloaded by the analysis: in the cache now
                record = _target_record(t, options_key, corpus_key)
            res.run["sweep_target"] = record["target"]
            prepare_out_dir(folder)  # drops a stale layers.csv before the new record goes in
            write_text(folder / TARGET_FILE, json.dumps(record, indent=2, default=str) + "\n")
            save_run(res, folder, figures=False)
            shutil.rmtree(folder / SNAPSHOT_DIR, ignore_errors=True)
        if not shard.is_main:
            continue
        # Read back what was saved, so a first run and a resumed run combine the same tables.
        results.append(_step_int(Result.load(folder)))
    if not shard.is_main:
        return None
    combined = combine(results)
    combined.run = dict(combined.run)
    combined.run["sweep"] = {
        "checkpoints_dir": CHECKPOINTS_DIR,
        "targets": [dict(r["target"], folder=f.name) for r, f in zip(records, folders)],
    }
    save_run(combined, out, figures=figures)
    return combined
