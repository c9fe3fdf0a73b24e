"""The targets of a checkpoint sweep: what the user names (Hub revisions, a Trainer
output directory, model directories) expanded into `Target`s ordered by step; see
``embgeom.sweep`` for the sweep itself.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ._names import display_name, slug
from .errors import EmbgeomError

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
