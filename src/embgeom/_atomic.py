"""Write a file atomically: into a temporary name beside it, then rename.

Every file embgeom writes for a reader to pick up (tables, run.json, report.md, the
demo corpus) goes through `atomic_writer`, so a reader never sees half a file.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_writer(path, newline: str | None = None, binary: bool = False):
    """Yield a handle (text, or bytes with `binary`); on success the file appears at
    `path` whole, on any error nothing does (a half-written file is never left under
    the real name, and an earlier file there is kept)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        if binary:
            fh = os.fdopen(fd, "wb")
        else:
            fh = os.fdopen(fd, "w", encoding="utf-8", newline=newline)
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_text(path, text: str, newline: str | None = None) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_writer(path, newline=newline) as fh:
        fh.write(text)
    return Path(path)
