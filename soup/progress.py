"""Progress on stderr with rich: a step line and a bar with bytes/s and ETA; silent when quiet."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)

__all__ = ["Reporter", "RichReporter"]


class Reporter:
    """What the engine and strategies call to report progress; the base class does nothing."""

    def step(self, message: str) -> None:
        """A new step starts (``evaluating ingredient 3/8 (ft-ocr)``)."""

    def warn(self, message: str) -> None:
        print(f"warning: {message}", file=sys.stderr)

    @contextmanager
    def bytes_task(self, description: str, total: int) -> Iterator[callable]:
        """A byte-counting task; yields ``advance(n_bytes)``."""
        yield lambda n: None



class RichReporter(Reporter):
    """Rich progress bars and step lines on stderr."""

    def __init__(self) -> None:
        self.console = Console(stderr=True)

    def step(self, message: str) -> None:
        self.console.print(f"[bold]soup[/bold] {message}", highlight=False)

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)

    @contextmanager
    def bytes_task(self, description: str, total: int) -> Iterator[callable]:
        with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                      DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                      console=self.console, transient=False) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n: bar.advance(task, n)
