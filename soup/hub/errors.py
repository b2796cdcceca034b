"""What a failed hub call means: retry it (connection errors, 5xx, 429) or report it as one line.

``retrying`` calls a hub function with exponential backoff while the failure is transient;
``hub_error`` turns anything else (and a transient failure that outlived its retries) into one
``HubError`` line that names the repo and revision and never contains a token (``soup.errors.redact``).
Everything here reads huggingface_hub's public exceptions (``huggingface_hub.errors``); the one thing
it lacks a public name for, its HTTP client's "no response" exceptions, is found in ``transport_errors``.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from soup.errors import HubError, redact

__all__ = ["DEFAULT_RETRY", "RetryPolicy", "hub_error", "retrying", "status_code", "transport_errors"]

TOKEN_HELP = "check your token (HF_TOKEN or `hf auth login`)"

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How transient hub failures (connection errors, 5xx, 429) are retried."""

    tries: int = 4  # attempts in all, the first included
    base_delay: float = 1.0  # seconds before the first retry; doubles after each
    max_delay: float = 8.0  # cap on one delay


DEFAULT_RETRY = RetryPolicy()


def retrying(fn: Callable[[], T], policy: RetryPolicy | None = None) -> T:
    """Call ``fn``; retry transient failures with exponential backoff, re-raise anything else."""
    policy = policy or DEFAULT_RETRY
    delay = policy.base_delay
    for attempt in range(1, max(policy.tries, 1) + 1):
        try:
            return fn()
        except Exception as err:
            if attempt >= policy.tries or not _transient(err):
                raise
        time.sleep(delay)
        delay = min(delay * 2, policy.max_delay)
    raise AssertionError("unreachable")


def hub_error(err: BaseException, where: str, *, token: str | bool | None = None,
              offline: bool = False) -> HubError:
    """One clear line for a failed hub call, naming ``where`` (``owner/name[@revision]``); never a token."""
    if isinstance(err, HubError):
        return err
    status = next((s for s in map(status_code, _causes(err)) if s is not None), None)
    chain = list(_causes(err))

    def has(kind: type[BaseException] | tuple[type[BaseException], ...]) -> bool:
        return any(isinstance(e, kind) for e in chain)

    if offline and status is None:
        msg = (f"hub: {where} is not in the local cache and HF_HUB_OFFLINE=1 forbids downloads; "
               "pull it once online (pinned to a sha)")
    elif has(GatedRepoError):
        msg = f"hub: {where} is gated: accept its conditions on the hub, then {TOKEN_HELP}"
    elif status == 401:
        msg = f"hub: 401 Unauthorized for {where}: {TOKEN_HELP}"
    elif status == 403:
        msg = f"hub: 403 Forbidden for {where}: your token cannot access or write to it; {TOKEN_HELP}"
    elif has(RevisionNotFoundError):
        msg = f"hub: revision not found: {where}"
    elif has(RepositoryNotFoundError):
        msg = f"hub: repository not found: {where} (if it is private or gated, {TOKEN_HELP})"
    elif has(RemoteEntryNotFoundError):
        msg = f"hub: file not found in {where}: {_first_line(err)}"
    elif status is not None and (status >= 500 or status == 429):
        msg = f"hub: {status} server error for {where}, still failing after retries; try again later"
    elif any(_unanswered(e) for e in chain):
        msg = f"hub: cannot reach the hub for {where} ({type(err).__name__}), still failing after retries"
    elif has((OfflineModeIsEnabled, LocalEntryNotFoundError)):
        msg = f"hub: {where} is not in the local cache and the hub cannot be used: {_first_line(err)}"
    elif isinstance(err, ValueError) and "README.md" in str(err):
        msg = f"hub: the model card of {where} was rejected: {' '.join(str(err).split()[:40])}"
    elif status is not None:
        msg = f"hub: HTTP {status} for {where}: {_first_line(err)}"
    else:
        msg = f"hub: {where}: {type(err).__name__}: {_first_line(err)}"
    return HubError(redact(msg, token if isinstance(token, str) else None))


def status_code(err: BaseException) -> int | None:
    """The HTTP status of an ``HfHubHTTPError`` (or anything with a ``response``); None without one."""
    return getattr(getattr(err, "response", None), "status_code", None)


# ---- the gap in huggingface_hub's public API -----------------------------------------------------------
@functools.cache
def transport_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """``(unanswered, not_retried)``: the exception classes huggingface_hub's HTTP client raises for a
    request that got no response (refused, reset, timed out), and those among them that waiting
    cannot fix (a misconfigured proxy).

    Why this exists: huggingface_hub turns every HTTP *status* into a public ``HfHubHTTPError``, but
    lets its HTTP client's own exceptions through when no response came, and exports no name for
    them; the client itself has changed between releases (requests, httpx, httpx2). Importing the
    client library directly would pin us to one release and add an undeclared dependency. So ask the
    client that huggingface_hub uses (``huggingface_hub.utils.get_session()``, public) which library
    it comes from, and take that library's ``TransportError`` / ``ProxyError`` (the httpx family);
    the built-in ``ConnectionError`` / ``TimeoutError`` stand in for a client without them.
    """
    from huggingface_hub.utils import get_session

    for cls in type(get_session()).__mro__:
        lib = sys.modules.get(cls.__module__.partition(".")[0])
        unanswered = getattr(lib, "TransportError", None)
        if isinstance(unanswered, type) and issubclass(unanswered, BaseException):
            proxy = getattr(lib, "ProxyError", None)
            return (unanswered,), ((proxy,) if isinstance(proxy, type) else ())
    return (ConnectionError, TimeoutError), ()


# ---- helpers -----------------------------------------------------------------------------------------
def _causes(err: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:  # __cause__/__context__ may form a cycle
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _unanswered(err: BaseException) -> bool:
    """The request got no response (offline mode is not a network failure)."""
    return isinstance(err, transport_errors()[0]) and not isinstance(err, OfflineModeIsEnabled)


def _transient(err: BaseException) -> bool:
    """A connection error, a 5xx or a 429 anywhere in the exception chain."""
    for e in _causes(err):
        if isinstance(e, OfflineModeIsEnabled):
            return False
        if _unanswered(e) and not isinstance(e, transport_errors()[1]):
            return True
        status = status_code(e)
        if status is not None:
            return status >= 500 or status == 429
    return False


def _first_line(err: BaseException) -> str:
    server = getattr(err, "server_message", None)
    text = server or str(err) or type(err).__name__
    return " ".join(text.strip().splitlines()[:1])[:300]
