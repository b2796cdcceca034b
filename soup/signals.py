"""How soup ends when it is told to stop: SIGINT, SIGTERM and SIGHUP become an exception.

``timeout``, Slurm, Kubernetes, systemd and ``docker stop`` send SIGTERM (a closed terminal sends
SIGHUP); by default Python dies on them without running a single ``finally``, leaving temp folders
and child processes behind. Inside ``graceful()`` each of these signals raises ``Interrupted`` in
the main thread instead, so the normal unwinding runs: temp folders are removed, a benchmark's
process group is killed, the output lock is released. SIGKILL cannot be caught; the next run on the
same output removes what a killed run left (see ``soup.engine.output``).

``Interrupted`` subclasses ``KeyboardInterrupt`` so code that already treats Ctrl-C as "stop now"
treats every stop signal alike. ``received()`` tells a real signal from a plug-in that raised
``KeyboardInterrupt`` itself (that is a plug-in error, not a user's request to stop).

Child processes die with soup, however soup dies: ``child_process`` starts one in a process group of
its own (killed as one by the caller on a timeout or a stop signal) and, on POSIX, beside it a tiny
watchdog that waits on a pipe only soup holds: when soup is gone (SIGKILL, the OOM killer), the pipe
closes and the watchdog sends SIGTERM, then SIGKILL 3 s later, to the whole group, grandchildren
included. On Linux the child also gets a parent-death signal (``PR_SET_PDEATHSIG``), in case soup dies
before its watchdog is running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Interrupted", "graceful", "received", "exit_code", "child_process"]

_SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None))
                 if s is not None)
_state: dict[str, int | None] = {"received": None, "depth": 0}


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread when a stop signal arrives inside ``graceful()``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _handler(signum: int, frame: object) -> None:
    first = _state["received"] is None
    _state["received"] = signum
    if first:  # a second signal while unwinding must not interrupt the cleanup itself
        raise Interrupted(signum)


@contextmanager
def graceful() -> Iterator[None]:
    """Turn SIGINT/SIGTERM/SIGHUP into ``Interrupted`` while the block runs (main thread only; nests).

    Outside the main thread (or when nested) it does nothing: signals are delivered to the main
    thread, whose own ``graceful()`` block does the unwinding.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _state["depth"]:
        _state["depth"] += 1
        try:
            yield
        finally:
            _state["depth"] -= 1
        return
    previous = {s: signal.getsignal(s) for s in _SIGNALS}
    _state["received"], _state["depth"] = None, 1
    for s in _SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _state["depth"] = 0


def received() -> int | None:
    """The stop signal received inside the current (or last) ``graceful()`` block, if any."""
    return _state["received"]


def exit_code(exc: BaseException) -> int:
    """The shell's convention: 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""
    signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
    return 128 + int(signum)


# ---- children that die with soup ---------------------------------------------------------------------

GRACE = 3.0  # seconds between SIGTERM and SIGKILL when the watchdog stops an orphaned group

# the watchdog: no imports beyond the interpreter's own (started with -I -S: fast, never the user's code);
# it ignores stop signals (soup handles those and kills the group itself) and acts only when the pipe
# closes without soup saying the child is done
_WATCHDOG = f"""
import os, signal, sys, time
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
group = int(sys.argv[1])
try:
    done = os.read(0, 1)
except OSError:
    done = b""
if not done:
    try:
        os.killpg(group, signal.SIGTERM)
        end = time.monotonic() + {GRACE}
        while time.monotonic() < end:
            time.sleep(0.05)
            os.killpg(group, 0)
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
"""


@contextmanager
def child_process(argv: list[str], **popen: Any) -> Iterator[subprocess.Popen]:
    """``subprocess.Popen(argv, **popen)`` in a process group of its own that dies with soup.

    The caller waits for it and kills its group (``os.killpg(proc.pid, ...)``) on a timeout or a stop
    signal, as before; what this adds is the case where soup itself is killed: a watchdog process then
    stops the group (SIGTERM, then SIGKILL after ``GRACE`` seconds), and on Linux the child gets SIGTERM
    from the kernel when soup's thread that started it dies. Leaving the block tells the watchdog the
    child has ended.

    Raises:
        OSError: the command cannot be started (``FileNotFoundError`` when it does not exist).
    """
    if os.name != "posix":
        with subprocess.Popen(argv, **popen) as proc:
            yield proc
        return
    proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=_die_with_parent(), **popen)
    watchdog = _watch(proc.pid)
    try:
        yield proc
    finally:
        if watchdog is not None:
            fd, guard = watchdog
            try:
                os.write(fd, b"x")  # the child has ended: nothing to stop
            except OSError:
                pass
            os.close(fd)
            try:
                guard.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _watch(group: int) -> tuple[int, subprocess.Popen] | None:
    """Start the watchdog of process group ``group``; (the pipe soup holds, the watchdog) or None."""
    r, w = os.pipe()  # neither end is inherited by other children soup starts (PEP 446)
    try:
        guard = subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHDOG, str(group)], stdin=r,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        os.close(w)
        return None
    finally:
        os.close(r)
    return w, guard


def _die_with_parent() -> Any:
    """A ``preexec_fn`` that asks Linux to send SIGTERM to the child when its parent dies (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:  # runs in the child between fork and exec: nothing that allocates or locks
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # soup died before the signal was armed
            os._exit(1)

    return arm
