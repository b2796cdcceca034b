"""An exclusive, non-blocking lock on an open file, released by the kernel when its process dies.

``flock`` on POSIX, ``msvcrt.locking`` (one byte) on Windows. soup's output lock (``soup.engine.output``)
and a worker's scratch folder (``soup.workers.scratch``) use it on a file they create, unlink while
still holding it and re-check by inode; a library lock (``filelock``) keeps its file in place after
release, which would leave a lock file beside every output, so this stays one function.
"""

from __future__ import annotations

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["try_lock"]


def try_lock(fd: int) -> bool:
    """Lock the open file ``fd`` exclusively; False at once if another process holds it."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    import msvcrt  # noqa: PLC0415  (Windows only)

    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True
