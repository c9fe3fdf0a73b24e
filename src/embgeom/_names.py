"""Names shown to the user and names used in paths: one rule each.

`display_name` gives the `model` column of a model named by a path or Hub id (the
command line, sweeps, a model loaded in memory); `slug` turns such names into a file
or folder name (figures, sweep checkpoints).
"""
from __future__ import annotations

import os
from pathlib import Path


def display_name(spec) -> str:
    """The `model` column for a model read from `spec`.

    A .gguf file: its stem; an existing directory: its name, or its parent's name
    when it is called `model` (a common layout); anything else (a Hub id such as
    `EleutherAI/pythia-70m`): `spec` as given.
    """
    p = Path(os.path.expanduser(str(spec)))
    if p.suffix.lower() == ".gguf":
        return p.stem
    if p.exists():
        return p.resolve().name if p.name not in ("model", "") else p.resolve().parent.name
    return str(spec)


def slug(*parts) -> str:
    """A file-name-safe tag: the non-empty `parts` joined by "_", every character but
    letters, digits and "-._" replaced by "-", no leading or trailing "-._"
    (a name never becomes hidden); "model" when nothing is left."""
    text = "_".join(str(p) for p in parts if p not in (None, ""))
    return "".join(c if c.isalnum() or c in "-._" else "-" for c in text).strip("-._") or "model"
