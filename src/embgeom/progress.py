"""rich progress bars on stderr: counted tokens while streaming (done, tokens per
second, time left), then layers while the end-of-run metrics are computed."""
from __future__ import annotations

from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _TokensPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} tok/s" if speed else "- tok/s", style="progress.data.speed")


@contextmanager
def _bar(columns, total: int, enabled: bool, description: str):
    """Yield `advance(n)`; draws the bar when enabled."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console

    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def token_progress(total: int, enabled: bool = True, description: str = "tokens"):
    """Counted tokens streamed: done of total, tokens per second, elapsed, left."""
    return _bar((TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                 _TokensPerSecond(), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn()),
                total, enabled, description)


def layer_progress(total: int, enabled: bool = True, description: str = "metrics"):
    """Layers whose end-of-run metrics (spectra, per-type tables, intrinsic
    dimension) are done: for wide models these take minutes after the stream."""
    return _bar((TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("layers"),
                 TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn()),
                total, enabled, description)
