"""Snapshots of a run's accumulators, and resuming from one: a snapshot that does not
fit together, or was made by another run, is refused as damaged, never resumed from."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from .. import __version__
from ..distributed import Shard
from ..errors import EmbgeomError
from ..snapshot import Snapshots, model_files
from ..stats.layers import LayerStatistics
from .config import AnalysisConfig
from .prepare import corpus_contents


def _resumed(snaps: Snapshots, state: dict, progress_state: dict, device, type_capacity: int):
    """(statistics, progress) rebuilt from a snapshot's state, each checked: a state
    that does not fit together is refused as damaged, never resumed from."""
    try:
        progress = {k: state[k] for k in progress_state}
        for key in ("next_batch", "n_padded", "tokens_done"):  # a snapshot follows at least one batch
            low = 1 if key == "next_batch" else 0
            if isinstance(progress[key], bool) or not isinstance(progress[key], int) or progress[key] < low:
                raise snaps.damaged(f"{key} is {progress[key]!r}, not a count of at least {low}")
        if not isinstance(progress["n_seen"], dict) or set(progress["n_seen"]) != set(progress_state["n_seen"]):
            raise snaps.damaged("n_seen does not name this model's stacks")
        stats = LayerStatistics.from_state_dict(state["statistics"], device=device, type_capacity=type_capacity)
    except KeyError as exc:
        raise snaps.damaged(f"it lacks {exc}") from None
    except EmbgeomError as exc:
        if str(exc).startswith("--resume"):
            raise
        raise snaps.damaged(str(exc)) from None
    for stack, seen in progress["n_seen"].items():
        if stack not in stats.n_layers:
            raise snaps.damaged(f"its statistics lack the {stack} stack")
        counted = [a.moments.n + b.moments.n for a, b in zip(stats.inliers[stack], stats.outliers[stack])]
        sampled = [stats.samples[stack].n_seen] if stats.samples else []
        if any(c != seen for c in counted + sampled):
            raise snaps.damaged(f"{stack}: {seen} tokens counted, but its layers hold {sorted(set(counted))}")
    return stats, progress


def _check_skipped(snaps: Snapshots, skipped: int, progress: dict, in_stream: bool = True) -> None:
    """The batches a resumed run skips must hold the tokens its snapshot says were
    done (a snapshot whose stream position was changed is refused)."""
    if not in_stream or skipped != progress["tokens_done"]:
        raise snaps.damaged(f"next_batch {progress['next_batch']} does not match the {progress['tokens_done']} "
                            "tokens it says were done")


def _model_identity(facts) -> dict:
    """What a resumed run must share with the snapshot's run about the model: its
    facts, and for a directory the names, sizes and times of its files."""
    ident = {k: v for k, v in facts.to_dict().items() if k != "path"}
    ident["path"] = str(Path(facts.path).resolve()) if Path(facts.path).exists() else facts.path
    files = model_files(facts.path)
    if files:
        ident["files"] = files
    return ident


def open_snapshots(snapshot_dir, snapshot_every: float, shard: Shard, cfg: AnalysisConfig, facts, *, revision, step,
                   name, corpus_record: dict) -> Snapshots | None:
    """The snapshots of this run, fingerprinted by everything a resumed run must
    share with it; None without a snapshot directory."""
    if snapshot_dir is None:
        return None
    fingerprint = {"embgeom": __version__, "batching": 2, "config": asdict(cfg), "model": _model_identity(facts),
                   "revision": revision, "step": step, "name": name, "corpus": corpus_contents(corpus_record),
                   "processes": shard.world}
    return Snapshots(snapshot_dir, snapshot_every, shard.rank, shard.world, fingerprint)


def resume_state(snaps: Snapshots | None, resume, shard: Shard, n_layers: dict, device, type_capacity: int):
    """(statistics or None, progress, tokens counted before the snapshot or None):
    the snapshot's state when `resume` asks for one (every rank agrees on a
    problem), else a fresh start at the first batch."""
    progress_state = {"next_batch": 0, "n_seen": {stack: 0 for stack in n_layers}, "n_padded": 0,
                      "tokens_done": 0}
    stats = None
    resumed_from = None
    if resume:
        have = shard.all_gather(snaps.exists())
        problem = None
        state = None
        if resume is True or any(have):
            try:
                state = snaps.load()
                stats, progress_state = _resumed(snaps, state, progress_state, device, type_capacity)
            except EmbgeomError as exc:
                problem = str(exc)
        shard.check_all(problem)
        if state is not None:
            resumed_from = sum(shard.all_gather(int(state["tokens_done"])))
    return stats, progress_state, resumed_from
