"""Anonymous-memory sampling shared by the benchmarks: ``RssAnon`` read from /proc, and a sampler
thread that keeps the peak seen while a block runs (every millisecond)."""

from __future__ import annotations

import threading
import time
from pathlib import Path


def rss_anon() -> int:
    """This process's anonymous resident memory, in bytes (file-backed pages, e.g. mmaps, excluded)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler:
    """The highest RssAnon seen while the block runs (sampled every millisecond)."""

    def __enter__(self) -> PeakSampler:
        self.peak, self._stop = rss_anon(), False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, rss_anon())
