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
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Interrupted", "graceful", "received", "exit_code"]

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
