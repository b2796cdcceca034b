"""Progress on stderr with rich: a step line and a bar with bytes/s and ETA; silent when quiet.

Messages carry user text (paths, tensor names, rule strings): they are printed literally, never
read as rich markup (``[red]``) or emoji codes (``:fire:``), so they are passed as ``rich.text.Text``,
with control characters escaped (``soup.errors.printable``: a name from a file may hold escape sequences).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from collections.abc import Iterator

from rich.console import Console
from rich.text import Text
from rich.progress import (BarColumn, DownloadColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)

from soup.errors import printable

__all__ = ["Reporter", "RichReporter"]


class Reporter:
    """What the engine and strategies call to report progress; the base class does nothing."""

    def step(self, message: str) -> None:
        """A new step starts (``evaluating ingredient 3/8 (ft-ocr)``)."""

    def warn(self, message: str) -> None:
        print(f"warning: {printable(message)}", file=sys.stderr)

    @contextmanager
    def bytes_task(self, description: str, total: int) -> Iterator[callable]:
        """A byte-counting task; yields ``advance(n_bytes)``."""
        yield lambda n: None



class RichReporter(Reporter):
    """Rich progress bars and step lines on stderr."""

    def __init__(self) -> None:
        self.console = Console(stderr=True, emoji=False, highlight=False)

    def step(self, message: str) -> None:
        self.console.print(Text.assemble(("soup", "bold"), " ", printable(message)))

    def warn(self, message: str) -> None:
        self.console.print(Text.assemble(("warning:", "yellow"), " ", printable(message)))

    @contextmanager
    def bytes_task(self, description: str, total: int) -> Iterator[callable]:
        with Progress(TextColumn("{task.description}", markup=False), BarColumn(), TaskProgressColumn(),
                      DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                      console=self.console, transient=False) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n: bar.advance(task, n)
            bar.update(task, completed=total)  # done: a bar that finishes at 100% (the bytes counted may differ)
