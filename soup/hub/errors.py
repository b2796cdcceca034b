"""What a failed hub call means: retry it (no answer, 5xx, 429, 408) or report it as one line.

``retrying`` is soup's one retry layer for the hub: it calls a hub function with exponential backoff
while the failure is transient, honours ``Retry-After``, and prints one line per retry. ``hub_error``
turns anything else (and a transient failure that outlived its retries) into one ``HubError`` line
that names the repo and revision and never contains a token (``soup.errors.redact``).

Nothing waits forever and nothing retries twice: ``guard_client`` (called by ``retrying``) gives
huggingface_hub a client (``huggingface_hub.set_client_factory``, public) whose every request has a
timeout, and which hands a request that got no answer, or a 408/429/5xx answer, straight to
``retrying`` (as ``HubUnanswered`` / ``HubBusy``) instead of letting huggingface_hub's own backoff
retry it again underneath (5 more tries each, printing raw "Retrying in Ns" lines). A call therefore
ends after at most ``tries`` tries, each request waiting at most ``timeout`` seconds for the hub to
answer, with at most ``max_delay`` seconds (or a ``Retry-After`` up to ``max_retry_after``) between tries.

Everything here reads huggingface_hub's public exceptions (``huggingface_hub.errors``); the one thing
it lacks a public name for, its HTTP client library (httpx, httpx2...), is found from
``huggingface_hub.utils.get_session()`` in ``_client_library``.
"""

from __future__ import annotations

import email.utils
import functools
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from soup.errors import HubError, redact

__all__ = ["DEFAULT_RETRY", "RetryPolicy", "HubBusy", "HubUnanswered", "guard_client", "hub_error", "retrying",
           "status_code", "transport_errors"]

TOKEN_HELP = "check your token (HF_TOKEN or `hf auth login`)"

T = TypeVar("T")


RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})  # answers worth another try (as huggingface_hub's)
CONNECT_TIMEOUT = 10.0  # seconds to open a connection


@dataclass(frozen=True)
class RetryPolicy:
    """How transient hub failures (no answer, 5xx, 429, 408) are retried, and how long a request waits."""

    tries: int = 4  # attempts in all, the first included
    base_delay: float = 1.0  # seconds before the first retry; doubles after each
    max_delay: float = 8.0  # cap on one delay
    timeout: float = 60.0  # seconds a request waits for the hub (to answer, or to take or send each chunk)
    max_retry_after: float = 60.0  # a longer Retry-After ends the retries at once (the hub is busy for long)


DEFAULT_RETRY = RetryPolicy()


class HubUnanswered(Exception):
    """A hub request got no answer (refused, reset, timed out); its cause is the HTTP library's error."""


class HubBusy(Exception):
    """The hub answered 408, 429 or 5xx: worth another try, after ``Retry-After`` when it says so."""

    def __init__(self, response: Any) -> None:
        self.response = response  # read by status_code() and hub_error()
        super().__init__(f"HTTP {response.status_code} from {_url(response.request)}")


_local = threading.local()  # .policy: the RetryPolicy of the retrying() call running in this thread


def retrying(fn: Callable[[], T], policy: RetryPolicy | None = None) -> T:
    """Call ``fn``; retry transient failures with exponential backoff (or the hub's ``Retry-After``),
    printing one line on stderr per retry; re-raise anything else, or the last failure."""
    guard_client()
    policy = policy or DEFAULT_RETRY
    previous = getattr(_local, "policy", None)
    _local.policy = policy
    try:
        delay = policy.base_delay
        for attempt in range(1, max(policy.tries, 1) + 1):
            try:
                return fn()
            except Exception as err:
                if attempt >= policy.tries or not _transient(err):
                    raise
                after = _retry_after(err)
                if after is not None and after > policy.max_retry_after:
                    raise
                wait = max(delay, after or 0.0)
                print(redact(f"warning: hub: {_reason(err)}; retrying in {wait:g}s (try {attempt + 1} of "
                             f"{policy.tries})"), file=sys.stderr, flush=True)
            time.sleep(wait)
            delay = min(delay * 2, policy.max_delay)
        raise AssertionError("unreachable")
    finally:
        _local.policy = previous


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
        cause = next(e for e in chain if _unanswered(e))
        msg = f"hub: cannot reach the hub for {where} ({type(cause).__name__}), still failing after retries"
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
    lib = _client_library()
    if lib is not None:
        proxy = getattr(lib, "ProxyError", None)
        return (lib.TransportError,), ((proxy,) if isinstance(proxy, type) else ())
    return (ConnectionError, TimeoutError), ()


@functools.cache
def _client_library() -> Any:
    """The HTTP library of huggingface_hub's client (its ``Client``, ``Timeout``, ``TransportError``), or None."""
    from huggingface_hub.utils import get_session

    for cls in type(get_session()).__mro__:
        lib = sys.modules.get(cls.__module__.partition(".")[0])
        unanswered = getattr(lib, "TransportError", None)
        if (isinstance(unanswered, type) and issubclass(unanswered, BaseException)
                and isinstance(getattr(lib, "Client", None), type) and hasattr(lib, "Timeout")):
            return lib
    return None


_guard_lock = threading.Lock()
_guarded = False  # set once guard_client has installed soup's client factory


def guard_client() -> None:
    """Give huggingface_hub a client that never waits forever and never retries underneath ``retrying``
    (idempotent; the first call replaces huggingface_hub's client factory).

    The client is huggingface_hub's default one (its request hooks, which refuse requests in offline
    mode, redirects, proxies from the environment) plus, for every request: a timeout wherever none is
    set (``CONNECT_TIMEOUT`` to connect, the running ``retrying`` call's ``RetryPolicy.timeout`` for the
    rest); a request that got no answer raises ``HubUnanswered``, a 408/429/5xx answer ``HubBusy``.
    Neither is an exception huggingface_hub's own backoff retries, so ``retrying`` is the one layer.

    Why a client factory: huggingface_hub's default client has no timeout and its call sites pass
    ``timeout=None`` (wait forever); ``set_client_factory`` is its public way to configure the client.
    A client factory set by the caller before soup's first hub call is replaced (its hooks are kept).
    """
    global _guarded
    if _guarded:
        return
    with _guard_lock:
        if _guarded:
            return
        from huggingface_hub import set_client_factory
        from huggingface_hub.utils import get_session

        lib = _client_library()
        if lib is not None:
            base = get_session()
            hooks = {kind: list(fns) for kind, fns in base.event_hooks.items()}
            follow = base.follow_redirects
            guarded = _guarded_client_class(lib)
            # timeout=None here: GuardedClient.send fills in every timeout a request leaves unset
            set_client_factory(lambda: guarded(event_hooks={k: list(v) for k, v in hooks.items()},
                                               follow_redirects=follow, timeout=None))
        _guarded = True


def _guarded_client_class(lib: Any) -> type:
    class GuardedClient(lib.Client):
        """huggingface_hub's client with soup's timeouts, handing transient failures to ``retrying``."""

        def send(self, request: Any, **kwargs: Any) -> Any:
            policy = getattr(_local, "policy", None) or DEFAULT_RETRY
            want = {"connect": CONNECT_TIMEOUT, "read": policy.timeout, "write": policy.timeout,
                    "pool": policy.timeout}
            given = request.extensions.get("timeout") or {}
            request.extensions = {**request.extensions, "timeout": {
                k: given.get(k) if given.get(k) is not None else v for k, v in want.items()}}
            try:
                response = super().send(request, **kwargs)
            except lib.TransportError as err:
                raise HubUnanswered(f"no answer from {_url(request)} ({type(err).__name__})") from err
            if response.status_code in RETRIED_STATUS:
                response.close()
                raise HubBusy(response)
            return response

    return GuardedClient


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
    """No answer (but not a proxy error), a 5xx, a 429 or a 408 anywhere in the exception chain."""
    for e in _causes(err):
        if isinstance(e, OfflineModeIsEnabled):
            return False
        if _unanswered(e) and not isinstance(e, transport_errors()[1]):
            return True
        status = status_code(e)
        if status is not None:
            return status >= 500 or status in (429, 408)
    return False


def _retry_after(err: BaseException) -> float | None:
    """Seconds the hub asked to wait (``Retry-After``: seconds or an HTTP date), if it did."""
    for e in _causes(err):
        headers = getattr(getattr(e, "response", None), "headers", None)
        value = headers.get("Retry-After") if headers is not None else None
        if value is None:
            continue
        value = value.strip()
        if value.isdigit():
            return float(value)
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError, IndexError):
            return None
    return None


def _reason(err: BaseException) -> str:
    """Why a try failed, for the retry line: the status or the HTTP library's error, and the URL."""
    for e in _causes(err):
        if isinstance(e, (HubBusy, HubUnanswered)):
            return str(e)
        status = status_code(e)
        if status is not None:
            return f"HTTP {status}"
        if _unanswered(e):
            return f"no answer ({type(e).__name__})"
    return type(err).__name__


def _url(request: Any) -> str:
    """``scheme://host/path`` of a request, without its query (which may be long)."""
    try:
        url = request.url
        return f"{url.scheme}://{url.netloc.decode() if isinstance(url.netloc, bytes) else url.netloc}{url.path}"
    except Exception:
        return "the hub"


def _first_line(err: BaseException) -> str:
    server = getattr(err, "server_message", None)
    text = server or str(err) or type(err).__name__
    return " ".join(text.strip().splitlines()[:1])[:300]
