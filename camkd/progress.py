"""Progress display: a rich bar on a terminal; elsewhere (CI logs, torchrun) a plain line at least every 30 s.

The bar shows only what the host already knows (items done, elapsed time, rate): reading a
loss from the device each step would stall a GPU pipeline, so the loop passes a status text
rarely (every few hundred steps at most).
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
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

HEARTBEAT_S = 30.0


class _Rate(ProgressColumn):
    """rich's own speed estimate of the task, in the bar's unit."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{task.speed:.0f} {self.unit}/s" if task.speed else "")


class Bar:
    """Progress over ``total`` items (a context manager)."""

    def __init__(self, description: str, total: int, *, enabled: bool = True, unit: str = "img") -> None:
        self.description, self.total, self.unit, self.done = description, total, unit, 0
        self.enabled = enabled
        self.live = enabled and sys.stderr.isatty()
        self.status = ""
        self._start = self._last_line = time.perf_counter()
        self._progress: Progress | None = None
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(unit),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                console=Console(stderr=True), transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(description, total=total, status="")

    def update(self, n: int = 1, status: str | None = None) -> None:
        self.done += n
        if status is not None:
            self.status = status
        if self._progress is not None:
            self._progress.update(self._task, advance=n, status=self.status)
        elif self.enabled and time.perf_counter() - self._last_line >= HEARTBEAT_S:
            self._last_line = time.perf_counter()
            elapsed = self._last_line - self._start
            log(f"{self.description}: {self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%), "
                f"{self.done / max(elapsed, 1e-9):.0f} {self.unit}/s, {elapsed:.0f} s {self.status}".rstrip())

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def log(msg: str) -> None:
    """One line to stderr (progress and summaries; stdout stays for results)."""
    print(msg, file=sys.stderr, flush=True)
