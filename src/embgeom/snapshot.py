"""Crash-safe snapshots of a run in progress, and resuming from them.

A snapshot holds every accumulator's `state_dict` and the stream position (the index
of the next batch, in the deterministic batch order every run of the same command
forms), plus a fingerprint of everything that decides the result: options, model,
corpus contents, number of ranks. It is written to a temporary name and renamed
(atomic), so a kill at any moment leaves either the previous snapshot or the new
one, never half of one. Each rank keeps its own file; ranks never wait for each
other to snapshot, because their accumulators are independent until the end.

The file is not a pickle: it is written by `embgeom._statefile` (the safetensors
layout, tensors as raw bytes and everything else as JSON), so reading a snapshot
that someone else put in OUT can build tensors and numbers, never run code. A
SHA-256 of the contents is checked before anything is used, and the accumulators
validate what they are rebuilt from, so a damaged snapshot is refused, never
resumed into different numbers. Snapshots of older versions (torch pickles,
``rank0-of-1.pt``) are never opened.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path

from ._statefile import UnreadableState, read_state, write_state
from .errors import EmbgeomError

SNAPSHOT_DIR = "snapshots"
SUFFIX = ".safetensors"
_LEGACY_SUFFIX = ".pt"  # torch pickles of embgeom 0.1: never read


def model_files(path) -> list:
    """[name, size, mtime in ns] of a model's files (a directory's top-level files,
    or the file itself): what says that a model on disk is still the one a snapshot
    or a finished sweep checkpoint was made from (a checkpoint retrained in place
    has new times, and usually new sizes)."""
    p = Path(path)
    files = [f for f in p.iterdir() if f.is_file()] if p.is_dir() else [p] if p.is_file() else []
    return sorted([f.name, st.st_size, st.st_mtime_ns] for f, st in ((f, f.stat()) for f in files))


def _normalise(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def describe_difference(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two fingerprints ('option seq_len: 64 -> 128')."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key, "<absent>"), now.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_difference(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


def check_interval(every) -> float:
    if isinstance(every, bool) or not isinstance(every, (int, float)) or not every >= 0:
        raise EmbgeomError(f"--snapshot-every must be a number of seconds >= 0, got {every!r}")
    return float(every)


class Snapshots:
    """The snapshot file of one rank in `directory`.

    every : seconds between snapshots (0: after every batch).
    fingerprint : JSON-able dict; a snapshot whose fingerprint differs is refused.
    """

    def __init__(self, directory, every: float, rank: int, world: int, fingerprint: dict):
        self.directory = Path(directory)
        self.every = check_interval(every)
        self.rank, self.world = rank, world
        self.fingerprint = _normalise(fingerprint)
        self._last = time.monotonic()
        self.saved = 0
        self.seconds = 0.0  # time spent writing snapshots

    @property
    def path(self) -> Path:
        return self.file(self.directory, self.rank, self.world)

    @staticmethod
    def file(directory, rank: int, world: int) -> Path:
        """The snapshot file of rank `rank` of `world` in `directory`."""
        return Path(directory) / f"rank{rank}-of-{world}{SUFFIX}"

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every

    def save(self, state: dict) -> None:
        """Write `state` (nested dicts and lists of tensors, numbers, strings)
        atomically: temporary file, fsync, rename. On any failure the temporary file
        is removed and the previous snapshot stays as it was."""
        t0 = time.perf_counter()
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        if not self.saved:  # a killed writer's leftovers (the run dir is locked: none is alive)
            for old in self.directory.glob(self.path.name + ".tmp*"):
                if old != tmp:
                    old.unlink(missing_ok=True)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                write_state(fh, {"fingerprint": self.fingerprint, "state": state})
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except Exception as exc:  # noqa: BLE001 - a full disk shows as OSError or as a writer's RuntimeError
            try:
                tmp.unlink()
            except OSError:
                pass
            full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "space" in str(exc).lower()
            text = str(exc).strip()
            reason = getattr(exc, "strerror", None) or (text.splitlines()[0][:200] if text else type(exc).__name__)
            raise EmbgeomError(
                f"writing the snapshot {self.path} failed ({reason})"
                + ("; the disk is full: free space, or pass a larger --snapshot-every" if full else
                   "; check that --out is writable and its disk has free space")
                + (" (the previous snapshot is intact: rerun with --resume)" if self.path.exists() else "")
            ) from None
        self._last = time.monotonic()
        self.saved += 1
        self.seconds += time.perf_counter() - t0

    def exists(self) -> bool:
        return self.path.exists()

    @staticmethod
    def missing(directory, rank: int, world: int) -> str | None:
        """Why rank `rank` of `world` has nothing to resume from in `directory`, or None
        if its snapshot is there. Needs no fingerprint, so a run can be refused
        before its model loads."""
        directory = Path(directory)
        if Snapshots.file(directory, rank, world).exists():
            return None
        if Snapshots.file(directory, rank, world).with_suffix(_LEGACY_SUFFIX).exists():
            return (f"--resume: the snapshot in {directory} was written by an older embgeom as a pickle, which "
                    "is never read (it could run code); run again without --resume")
        others = sorted(p.name for p in directory.glob(f"rank*-of-*{SUFFIX}")) if directory.is_dir() else []
        if others:
            return (f"--resume: the snapshots in {directory} ({', '.join(others)}) were written by a run with "
                    f"another number of processes; resume with that number, or run again without --resume")
        return (f"--resume: no snapshot in {directory} (the run finished, or it was stopped before its "
                "first snapshot); run again without --resume")

    def load(self) -> dict:
        """The saved state; EmbgeomError if there is none or it was made differently."""
        problem = self.missing(self.directory, self.rank, self.world)
        if problem:
            raise EmbgeomError(problem)
        try:
            saved = read_state(self.path)
            fingerprint, state = saved["fingerprint"], saved["state"]
            if not isinstance(fingerprint, dict) or not isinstance(state, dict):
                raise UnreadableState("it does not hold a run's state")
        except (UnreadableState, KeyError, TypeError) as exc:
            raise self.damaged(str(exc) if isinstance(exc, UnreadableState) else "it does not hold a run's state")
        except OSError as exc:
            raise EmbgeomError(f"--resume: the snapshot {self.path} cannot be read ({exc.strerror or exc}); "
                               "check its permissions, or run again without --resume") from None
        if fingerprint != self.fingerprint:
            diff = describe_difference(fingerprint, self.fingerprint)
            shown = "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
            raise EmbgeomError(
                f"--resume: the snapshot in {self.directory} was made by a different run ({shown}); "
                "rerun the original command with --resume, or drop --resume to start over"
            )
        self._last = time.monotonic()
        return state

    def damaged(self, what: str) -> EmbgeomError:
        """The refusal of a snapshot that cannot be trusted (`what`: why)."""
        return EmbgeomError(f"--resume: the snapshot {self.path} is damaged ({what}); "
                            "run again without --resume (it starts over)")

    def clear(self) -> None:
        """Remove this run's snapshot directory (after its results are written)."""
        shutil.rmtree(self.directory, ignore_errors=True)
