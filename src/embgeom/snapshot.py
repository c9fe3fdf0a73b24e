"""Crash-safe snapshots of a run in progress, and resuming from them.

A snapshot holds every accumulator's `state_dict` and the stream position (the index
of the next batch, in the deterministic batch order every run of the same command
forms), plus a fingerprint of everything that decides the result: options, model,
corpus contents, number of ranks. It is written to a temporary name and renamed
(atomic), so a kill at any moment leaves either the previous snapshot or the new
one, never half of one. Each rank keeps its own file; ranks never wait for each
other to snapshot, because their accumulators are independent until the end.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path

import torch

from .errors import EmbgeomError

SNAPSHOT_DIR = "snapshots"


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
        return Path(directory) / f"rank{rank}-of-{world}.pt"

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every

    def save(self, state: dict) -> None:
        """Write `state` (torch.save-able) atomically: temporary file, fsync, rename."""
        t0 = time.perf_counter()
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                torch.save({"fingerprint": self.fingerprint, "state": state}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise EmbgeomError(
                f"writing the snapshot {self.path} failed ({exc.strerror or exc})"
                + ("; the disk is full: free space, or pass a larger --snapshot-every" if full else
                   "; check that --out is writable")
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
        others = sorted(p.name for p in directory.glob("rank*-of-*.pt")) if directory.is_dir() else []
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
            saved = torch.load(self.path, map_location="cpu", weights_only=False)
            fingerprint, state = saved["fingerprint"], saved["state"]
        except Exception as exc:  # noqa: BLE001 - a damaged file can fail in many ways
            raise EmbgeomError(
                f"--resume: the snapshot {self.path} cannot be read ({type(exc).__name__}); "
                "run again without --resume"
            ) from None
        if fingerprint != self.fingerprint:
            diff = describe_difference(fingerprint, self.fingerprint)
            shown = "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
            raise EmbgeomError(
                f"--resume: the snapshot in {self.directory} was made by a different run ({shown}); "
                "rerun the original command with --resume, or drop --resume to start over"
            )
        self._last = time.monotonic()
        return state

    def clear(self) -> None:
        """Remove this run's snapshot directory (after its results are written)."""
        shutil.rmtree(self.directory, ignore_errors=True)
