"""The evaluation queue's settings and identity: heartbeat / grace / retry settings, the queue
study's name (``queue_name``, from ``queue_identity``), the shared score cache, and small helpers
(timestamps, trial ids, this process's name) used by the other modules of ``soup.workers``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from soup.errors import SoupError

if TYPE_CHECKING:
    import optuna

    from soup.soups.scorer import Scorer


QUEUE_PREFIX = "soup-queue-"
POLL_MIN, POLL_MAX = 0.2, 1.0  # seconds between looks at the storage: fast while busy, backing off when idle


@dataclass(frozen=True)
class QueueSettings:
    """How dead workers are detected and retried; the coordinator's, adopted by every worker."""

    heartbeat: int = 30  # seconds between a worker's heartbeats for the trials it evaluates
    grace: int = 120  # a running trial whose last heartbeat is older than this is stale
    max_retry: int = 3  # how many times a stale trial is put back in the queue

    @classmethod
    def from_env(cls) -> QueueSettings:
        values = {}
        for field, var in (("heartbeat", "SOUP_HEARTBEAT_INTERVAL"), ("grace", "SOUP_HEARTBEAT_GRACE"),
                           ("max_retry", "SOUP_MAX_RETRY")):
            text = os.environ.get(var)
            if text is None or text == "":
                continue
            try:
                values[field] = int(text)
            except ValueError:
                raise SoupError(f"{var}: {text!r} must be a whole number of seconds") from None
            if values[field] < (0 if field == "max_retry" else 1):
                raise SoupError(f"{var}: {text!r} must be >= {0 if field == 'max_retry' else 1}")
        settings = cls(**values)
        if "grace" not in values and settings.grace < 2 * settings.heartbeat:
            settings = cls(settings.heartbeat, 4 * settings.heartbeat, settings.max_retry)
        if settings.grace <= settings.heartbeat:
            raise SoupError(f"SOUP_HEARTBEAT_GRACE: {settings.grace} must be more than the heartbeat interval "
                            f"({settings.heartbeat}s), or every running candidate looks dead")
        return settings

    @classmethod
    def from_attrs(cls, attrs: Any) -> QueueSettings:
        try:
            return cls(**{k: int(attrs[k]) for k in ("heartbeat", "grace", "max_retry")})
        except (TypeError, KeyError, ValueError):
            return cls()


# --- the queue's identity --------------------------------------------------------------------------

def queue_identity(scorer: Scorer) -> dict[str, Any]:
    """What a queue study is for: ingredients (label, fingerprint), evaluator identity, rules, dtype, and
    the options that change candidates' bytes (a merge method, a forced accumulation dtype), when set."""
    ident = {"ingredients": [{"label": c.label, "fingerprint": c.fingerprint} for c in scorer.checkpoints],
             "evaluator": scorer.identity, "rules": [r.to_dict() for r in scorer.rules], "dtype": scorer.dtype}
    options = scorer.byte_options()
    if options:
        ident["options"] = options
    return _jsonable(ident)


def queue_name(scorer: Scorer) -> str:
    """The queue study's name: the same for every process given the same ingredients, evaluator,
    rules and dtype (labels and devices do not count)."""
    ident = queue_identity(scorer)
    content = {**ident, "ingredients": [i["fingerprint"] for i in ident["ingredients"]]}
    return QUEUE_PREFIX + hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def shared_cache(cache: Any, storage: str | None) -> Any:
    """The score cache of a run sharing ``storage``: "default" becomes the storage's own database
    (table ``soup_scores``), so every machine reads and fills the same cache; anything else as given."""
    return storage if storage is not None and isinstance(cache, str) and cache == "default" else cache


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _trial_id(trial: optuna.trial.FrozenTrial) -> int:
    # optuna's storage API addresses trials by id, but FrozenTrial exposes only its number; the id is
    # a private attribute (optuna's own callbacks read it). The one place soup reads it.
    return trial._trial_id


def _me() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"
