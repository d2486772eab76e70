"""Progress display: a rich bar on a terminal, a plain line per task elsewhere (CI logs)."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Bar:
    """A progress bar over ``total`` items with a free-form status text (loss, accuracy, speed)."""

    def __init__(self, description: str, total: int, *, enabled: bool = True) -> None:
        self.description, self.total, self.done = description, total, 0
        self.start = time.perf_counter()
        self.status = ""
        self.live = enabled and sys.stderr.isatty()
        self._progress: Progress | None = None
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
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

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def log(msg: str) -> None:
    """One line to stderr (progress and summaries; stdout stays for results)."""
    print(msg, file=sys.stderr, flush=True)
