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

import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pandas as pd

from ._atomic import write_text
from ._lock import holding
from ._names import display_name, slug
from .errors import EmbgeomError

CHECKPOINTS_DIR = "checkpoints"
TARGET_FILE = "sweep-target.json"
# Options that change how fast an analysis runs, not what it measures: a finished
# checkpoint is reused when only these differ.
EXECUTION_OPTIONS = {"device", "device_map", "batch_size"}

_STEP_RE = re.compile(
    r"(?<![a-z])(?:global[_-]?step|step|checkpoint|ckpt|iteration|iter)[_-]?(\d+)(?![a-z0-9])",
    re.IGNORECASE,
)
_CHECKPOINT_DIR_RE = re.compile(r"^checkpoint[-_](\d+)$")


def parse_step(name) -> int | None:
    """The training step a revision or checkpoint name stands for, or None.

    `step1000` -> 1000 (Pythia), `global_step200` -> 200 (BLOOM, DeepSpeed),
    `step1000-tokens4B` -> 1000 (OLMo), `checkpoint-500` -> 500 (Trainer),
    `iter_0001000` -> 1000 (Megatron), `1500` -> 1500; `main`, a commit hash or a
    name without such a number -> None.
    """
    if name is None:
        return None
    text = str(name).strip()
    m = _STEP_RE.search(text)
    if m:
        return int(m.group(1))
    if text.isdigit():
        return int(text)
    return None


@dataclass(frozen=True)
class Target:
    """One checkpoint to analyse.

    spec: what `load_model` reads (model directory, .gguf file or Hub id);
    revision: the Hub revision to load (None for local files);
    step: the training step written to the `step` column (None if unknown);
    name: the `model` column (None: the default display name of `spec`);
    label: the `revision` column (default: `revision`); local checkpoints put their
    folder name (`checkpoint-500`) here.
    """

    spec: str
    revision: str | None = None
    step: int | None = None
    name: str | None = None
    label: str | None = None

    @property
    def tag(self) -> str:
        return self.label if self.label is not None else (self.revision or "")

    @property
    def display(self) -> str:
        text = self.name or display_name(self.spec)
        return f"{text}@{self.tag}" if self.tag else text

    @property
    def slug(self) -> str:
        """Folder name under OUT/checkpoints/ (made unique by `run_sweep` if needed)."""
        return slug(self.display.replace("@", "_"))

    @property
    def location(self) -> str:
        """The resolved path of a local model, or the Hub id."""
        p = Path(os.path.expanduser(self.spec))
        return str(p.resolve()) if p.exists() else self.spec

    @property
    def key(self) -> str:
        """A short digest of what is loaded (location and revision)."""
        return hashlib.sha256(f"{self.location}\0{self.revision or ''}".encode()).hexdigest()[:8]


def checkpoint_dirs(path) -> list[tuple[int, Path]]:
    """(step, directory) of every `checkpoint-N` model directory directly under
    `path`, by step."""
    found = []
    p = Path(path)
    if not p.is_dir():
        return []
    for child in p.iterdir():
        m = _CHECKPOINT_DIR_RE.match(child.name)
        if m and child.is_dir() and (child / "config.json").exists():
            found.append((int(m.group(1)), child))
    return sorted(found)


def _is_checkpoint_parent(p: Path) -> bool:
    return p.is_dir() and not (p / "config.json").exists() and bool(checkpoint_dirs(p))


def expand_targets(
    models: Sequence[str],
    revisions: Sequence[str] = (),
    steps: Sequence[int] = (),
) -> list[Target]:
    """Turn what the user named into targets, ordered by step (None last, then in the
    order given).

    models: Hub ids, model directories, .gguf files, or directories of `checkpoint-N`
    subdirectories (expanded, one target per checkpoint).
    revisions: Hub revisions, applied to every Hub id / model; for a checkpoint
    directory they select checkpoints by folder name.
    steps: explicit training steps, one per target before ordering (models x
    revisions, checkpoints in step order); otherwise steps are parsed from names.
    """
    if isinstance(models, (str, os.PathLike)):
        models = [models]
    models = [str(m) for m in models]
    revisions = [str(r) for r in revisions or ()]
    if not models:
        raise EmbgeomError("name at least one MODEL")
    targets: list[Target] = []
    for spec in models:
        p = Path(os.path.expanduser(spec))
        if _is_checkpoint_parent(p):
            found = checkpoint_dirs(p)
            if revisions:
                by_name = {d.name: (s, d) for s, d in found}
                missing = [r for r in revisions if r not in by_name]
                if missing:
                    raise EmbgeomError(
                        f"{p} has no checkpoint folder {missing[0]!r}; it holds "
                        f"{', '.join(d.name for _, d in found[:8])}{' ...' if len(found) > 8 else ''}"
                    )
                found = [by_name[r] for r in revisions]
            run_name = p.resolve().name
            for step, d in found:
                targets.append(Target(spec=str(d), step=step, name=run_name, label=d.name))
            continue
        if p.is_dir() and not (p / "config.json").exists():
            raise EmbgeomError(
                f"model directory {p} has no config.json and no checkpoint-N subdirectories; pass a Hugging Face "
                "model directory or a training output directory"
            )
        if p.is_dir() and _CHECKPOINT_DIR_RE.match(p.name) and len(models) > 1:
            # One of several checkpoint folders named on the command line (run/checkpoint-*).
            parent = p.resolve().parent.name
            for rev in revisions or [None]:
                targets.append(Target(spec=spec, revision=rev, step=parse_step(p.name), name=parent,
                                      label=p.name if rev is None else f"{p.name}@{rev}"))
            continue
        for rev in revisions or [None]:
            step = parse_step(rev) if rev is not None else (parse_step(p.name) if p.exists() and len(models) > 1 else None)
            targets.append(Target(spec=spec, revision=rev, step=step))
    if steps:
        steps = [int(s) for s in steps]
        if len(steps) != len(targets):
            raise EmbgeomError(
                f"--step was given {len(steps)} time(s) but there are {len(targets)} checkpoints "
                f"({', '.join(t.display for t in targets[:6])}{' ...' if len(targets) > 6 else ''}); give one step each"
            )
        targets = [Target(t.spec, t.revision, s, t.name, t.label) for t, s in zip(targets, steps)]
    seen: dict = {}
    for t in targets:
        ident = (t.key, t.tag)
        if ident in seen:
            raise EmbgeomError(f"{t.display} is named twice; name each model or revision once")
        seen[ident] = t
    order = sorted(range(len(targets)), key=lambda i: (targets[i].step is None, targets[i].step or 0, i))
    return [targets[i] for i in order]


def is_sweep(targets: Sequence[Target], models: Sequence[str] = ()) -> bool:
    """Whether `embgeom run` writes the sweep layout (OUT/checkpoints/...): more than
    one target, or a training output directory (so it can be extended later)."""
    if len(targets) > 1:
        return True
    return any(_is_checkpoint_parent(Path(os.path.expanduser(str(m)))) for m in models)


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
def run_sweep(
    targets: Iterable[Target],
    corpus,
    out,
    *,
    progress: bool = True,
    figures: bool = True,
    cache_dir=None,
    say: Callable[[str], None] | None = _stderr,
    snapshot_every: float = 300.0,
    resume: bool = False,
    **options,
):
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
