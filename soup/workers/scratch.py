"""A worker's scratch folder in the system temp folder, locked with ``flock`` while the worker lives;
folders left by killed workers are removed by the next worker on the machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from soup.locks import try_lock
from soup.progress import Reporter


class _Scratch:
    """The worker's scratch folder (candidates written for ``candidate.path()``), in the system temp
    folder: ``soup-worker-*`` holding a lock taken with ``flock``. A killed worker's folder keeps no
    lock (the kernel drops it), so the next worker on the machine removes it and says so."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.path: Path | None = None
        self._fd: int | None = None

    def __enter__(self) -> Path:
        base = Path(tempfile.gettempdir())
        for old in sorted(base.glob("soup-worker-*")):
            lock = old / ".lock"
            if not old.is_dir() or old.is_symlink() or not lock.is_file():
                continue
            try:
                fd = os.open(lock, os.O_RDWR)
            except OSError:
                continue
            try:
                if not try_lock(fd):
                    continue  # a live worker's
            except OSError:
                continue
            finally:
                os.close(fd)
            shutil.rmtree(old, ignore_errors=True)
            self.reporter.warn(f"removed {old}, left by a worker that was killed")
        self.path = Path(tempfile.mkdtemp(prefix=f"soup-worker-{os.getpid()}-", dir=base))
        self._fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try_lock(self._fd)  # a new folder: nobody else holds it
        return self.path

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
