"""Evaluating on several machines: an evaluation queue on an optuna study, drained by ``soup worker``.

With a storage URL given by the user (``soup run RECIPE --storage URL``, ``cook(storage=...)``) the
coordinator's ``Scorer.score`` / ``score_many`` do not evaluate candidates in-process: each candidate
becomes a WAITING trial of a *queue study* in that storage (its weights as params; its cache key,
name, weights and per-pattern groups as user attributes), and the coordinator waits until a trial
with that key is COMPLETE. ``soup worker RECIPE --storage URL``, on any number of machines, claims
WAITING trials one at a time, evaluates each with its own evaluator (through its own score cache)
and completes the trial with the score.

- **One queue per run identity.** The study's name is derived from the ingredients' content
  fingerprints, the evaluator's identity, the rules and the dtype (``queue_name``): a worker given
  the same recipe computes the same name. The coordinator creates the study (retrying the race of a
  first creation); workers wait for it, and say what differs when they find a study for another
  identity (a copied ingredient with another modification time, another evaluator argument).
- **Dead workers.** A worker records optuna's trial heartbeat while it evaluates; a trial whose
  heartbeat stops (a preempted node, an OOM kill, SIGKILL) is failed as stale by the next worker or
  the coordinator (``optuna.storages.fail_stale_trials``), and ``RetryHeartbeatStaleTrialCallback``
  puts a copy back in the queue, at most ``max_retry`` times. A worker told to stop (SIGTERM,
  Ctrl-C) hands its trial back at once instead.
- **Never counted twice.** The coordinator takes the first COMPLETE trial per key. A worker that
  was only slow cannot complete a trial that was handed on (optuna refuses to update a finished
  trial); its score still lands in the score cache, under the same content key, which is harmless.
- **Done.** Each coordinator run writes ``run:<id>`` into the study's user attributes and marks it
  done when it needs no more evaluations (its queued trials that nobody took are cancelled). A
  worker exits when every run it has seen is done, or after ``idle_timeout`` seconds with nothing to
  do. Workers register as ``worker:<id>`` (host, pid, devices, last seen): ``Scorer.parallelism``
  counts the live ones, and optuna-dashboard shows them.
- **The coordinator evaluates too** unless told not to (``local_worker=False``,
  ``--no-local-worker``): while it waits it takes queued trials itself, on its own devices, so a
  coordinator alone (``soup run --storage sqlite:///x.db``) always finishes.

The heartbeat settings are the coordinator's (environment variables ``SOUP_HEARTBEAT_INTERVAL``,
default 30 s, ``SOUP_HEARTBEAT_GRACE``, default 120 s, and ``SOUP_MAX_RETRY``, default 3); it writes
them into the study and workers adopt them, so every machine judges staleness alike.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cache import ScoreCache, display_url
from .errors import EvaluatorError, SoupError, redact
from .evaluate import Score
from .progress import Reporter, RichReporter

if TYPE_CHECKING:
    import optuna

    from .recipe import Recipe
    from .scorer import Scorer

__all__ = ["worker", "WorkerResult", "EvaluationQueue", "QueueSettings", "queue_name", "queue_identity",
           "shared_cache"]

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
    """What a queue study is for: ingredients (label, fingerprint), evaluator identity, rules, dtype."""
    return _jsonable({"ingredients": [{"label": c.label, "fingerprint": c.fingerprint} for c in scorer.checkpoints],
                      "evaluator": scorer.identity, "rules": [r.to_dict() for r in scorer.rules],
                      "dtype": scorer.dtype})


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


# --- the storage -----------------------------------------------------------------------------------

def _open_storage(url: str, settings: QueueSettings | None = None, claims: _Claims | None = None) -> Any:
    """An optuna RDBStorage on ``url``; with ``settings`` (and ``claims``), the heartbeat and the
    retry of stale trials."""
    import optuna
    from optuna.storages import RDBStorage

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}  # several processes on one file
    with warnings.catch_warnings():  # optuna marks the heartbeat API experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if settings is not None:
            kwargs.update(heartbeat_interval=settings.heartbeat, grace_period=settings.grace,
                          heartbeat_stale_trial_callback=_RetryOnce(claims, settings.max_retry))
        try:
            return RDBStorage(url, **kwargs)
        except ImportError as e:
            raise SoupError(f"storage {display_url(url)}: the database driver is not installed ({e.__cause__ or e}); "
                            "for PostgreSQL install psycopg[binary]") from None
        except ValueError as e:  # not a URL SQLAlchemy understands
            raise SoupError(f"storage {display_url(url)}: {e}") from None


def _retrying(what: str, url: str, fn: Callable[[], Any], *, attempts: int = 8) -> Any:
    """Run ``fn``, retrying the races of first use (two processes creating optuna's tables or the
    same study at once); a lasting failure is one SoupError line (password masked)."""
    import optuna
    import sqlalchemy

    for attempt in range(attempts):
        try:
            return fn()
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
            if attempt == attempts - 1:
                cause = getattr(e, "__cause__", None) or e
                text = str(getattr(cause, "orig", None) or cause).strip().splitlines()
                raise SoupError(f"{what} in {display_url(url)}: {text[0] if text else type(e).__name__}") from None
            time.sleep(0.1 * (attempt + 1))


class _Claims:
    """First come, first served, on every database: one row per claim in the table ``soup_claims``
    (its primary key), beside optuna's tables. ``trial:ID``: the worker that evaluates a trial;
    ``retry:ID``: the process that queues a stale trial's copy.

    optuna's state changes (WAITING -> RUNNING, RUNNING -> FAIL) are exclusive only where the database
    locks rows (PostgreSQL, MySQL: ``SELECT ... FOR UPDATE``); sqlite takes no row lock, and two
    processes can both see their change succeed (optuna's own queue has the same race there).
    """

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        from .cache import engine, ensure_table

        self._sa = sa
        self.table = sa.Table("soup_claims", sa.MetaData(),
                              sa.Column("claim", sa.String(64), primary_key=True),
                              sa.Column("worker", sa.Text, nullable=False),
                              sa.Column("claimed", sa.String(32), nullable=False))
        self.engine = engine(url)
        ensure_table(self.engine, self.table)

    def take(self, claim: str, who: str) -> bool:
        """True if this process is the first to take ``claim``."""
        try:
            with self.engine.begin() as conn:
                conn.execute(self._sa.insert(self.table).values(claim=claim, worker=who, claimed=_now()))
        except self._sa.exc.IntegrityError:
            return False
        return True

    def close(self) -> None:
        self.engine.dispose()


class _RetryOnce:
    """optuna's ``RetryHeartbeatStaleTrialCallback`` (a WAITING copy of a stale trial, at most
    ``max_retry`` times), run by exactly one of the processes that found the trial stale."""

    def __init__(self, claims: _Claims | None, max_retry: int) -> None:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        self.claims = claims
        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.claims is None or self.claims.take(f"retry:{_trial_id(trial)}", _me()):
            self.retry(study, trial)


def _me() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"


class _Queue:
    """A queue study opened in a storage: claim, complete, fail and hand back trials; read its state."""

    def __init__(self, url: str, storage: Any, study: optuna.Study, settings: QueueSettings, claims: _Claims) -> None:
        self.url, self.storage, self.study, self.settings, self.claims = url, storage, study, settings, claims
        self.name = study.study_name

    def attrs(self) -> dict[str, Any]:
        return self.study.user_attrs

    def trials_by_key(self) -> dict[str, list[optuna.trial.FrozenTrial]]:
        """Every queued candidate's trials, by cache key, oldest first."""
        out: dict[str, list[Any]] = {}
        for t in self.study.get_trials(deepcopy=False):
            key = t.user_attrs.get("key")
            if key is not None:
                out.setdefault(key, []).append(t)
        return out

    def waiting(self) -> list[optuna.trial.FrozenTrial]:
        from optuna.trial import TrialState

        return [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)) if "key" in t.user_attrs]

    def claim(self, who: str) -> optuna.trial.FrozenTrial | None:
        """Take the oldest WAITING candidate (RUNNING, by this worker), or None if there is none."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        for t in self.waiting():
            tid = _trial_id(t)
            # the first heartbeat goes before the claim: a claimed trial is never without one, so a
            # worker killed right after claiming still leaves a trial that goes stale and is retried
            self.storage.record_heartbeat(tid)
            try:
                if not self.storage.set_trial_state_values(tid, TrialState.RUNNING):
                    continue  # another worker was first
            except UpdateFinishedTrialError:
                continue  # cancelled meanwhile
            if not self.claims.take(f"trial:{tid}", who):
                continue  # both changed it to RUNNING (sqlite): the other worker's claim came first
            try:
                self.storage.set_trial_user_attr(tid, "worker", who)
            except UpdateFinishedTrialError:
                continue  # cancelled meanwhile
            return t
        return None

    def close(self) -> None:
        self.claims.close()
        self.storage.remove_session()

    def complete(self, trial: optuna.trial.FrozenTrial, score: Score, *, cached: bool, seconds: float) -> bool:
        """Store ``score`` as the trial's value; False if the trial was handed on meanwhile."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        tid = _trial_id(trial)
        try:
            for k, v in (("metrics", dict(score.metrics)), ("primary", score.primary), ("cached", cached),
                         ("seconds", round(seconds, 3))):
                self.storage.set_trial_user_attr(tid, k, v)
            self.storage.set_trial_state_values(tid, TrialState.COMPLETE, [float(score.value)])
        except UpdateFinishedTrialError:
            return False
        return True

    def fail(self, trial: optuna.trial.FrozenTrial, error: str) -> None:
        """The evaluator failed on this candidate: the coordinator reports ``error`` (no retry)."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        tid = _trial_id(trial)
        try:
            self.storage.set_trial_user_attr(tid, "error", error)
            self.storage.set_trial_state_values(tid, TrialState.FAIL)
        except UpdateFinishedTrialError:
            pass

    def hand_back(self, trial: optuna.trial.FrozenTrial) -> None:
        """This worker stops: fail its trial and queue a copy at once, as for a stale one."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        tid = _trial_id(trial)
        try:
            if not self.storage.set_trial_state_values(tid, TrialState.FAIL):
                return
        except UpdateFinishedTrialError:
            return  # completed, cancelled or already failed as stale (and retried)
        callback = self.storage.get_heartbeat_stale_trial_callback()
        if callback is not None:
            callback(self.study, self.storage.get_trial(tid))

    def fail_stale(self) -> None:
        """Fail trials whose worker stopped beating; the storage's callback queues their copies."""
        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)

    def runs(self) -> dict[str, dict[str, Any]]:
        return {k[4:]: v for k, v in self.attrs().items() if k.startswith("run:") and isinstance(v, dict)}

    def live_devices(self) -> int:
        """How many devices registered workers offer (those seen within the grace period)."""
        now = time.time()
        return sum(int(v.get("devices", 1)) for k, v in self.attrs().items()
                   if k.startswith("worker:") and isinstance(v, dict) and not v.get("stopped")
                   and now - float(v.get("seen", 0)) <= self.settings.grace)


# --- evaluating queued trials ----------------------------------------------------------------------

class _Runner:
    """Claims queued candidates and evaluates them on a local Scorer: one slot per evaluator.

    With one evaluator a claimed candidate is evaluated in the calling (main) thread, so a stop
    signal interrupts the evaluation itself; with several, each runs in a daemon thread (a stopped
    worker hands its candidates back and exits without waiting for them). A heartbeat thread beats
    for every claimed trial and keeps this worker's registration fresh.
    """

    def __init__(self, queue: _Queue, scorer: Scorer, reporter: Reporter, *, coordinator: bool = False) -> None:
        self.queue, self.scorer, self.reporter = queue, scorer, reporter
        self.coordinator = coordinator  # the coordinator's own worker: it raises the failures it reports
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"  # pids are reused: a suffix
        self.evaluated = 0
        self._lock = threading.Lock()
        self._free = list(range(len(scorer.evaluators)))[::-1]
        self._claimed: dict[int, Any] = {}  # trial id -> FrozenTrial, while evaluated here
        self._threaded = len(self._free) > 1
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []  # raised in evaluation threads, re-raised by step()
        self._started = time.time()
        self._register()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._beat_loop, name="soup-heartbeat", daemon=True)
        self._beat.start()

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._claimed)

    def step(self) -> bool:
        """Collect finished evaluations, claim queued candidates for free slots and start them;
        True if anything was claimed or finished."""
        did = self._harvest()
        while True:
            with self._lock:
                if not self._free:
                    break
            trial = self.queue.claim(_me())
            if trial is None:
                break
            did = True
            with self._lock:
                slot = self._free.pop()
                self._claimed[_trial_id(trial)] = trial
            if not self._threaded:
                self._run(trial, slot)
                break  # back to the caller's loop (results, stale trials) after each evaluation here
            thread = threading.Thread(target=self._run_in_thread, args=(trial, slot), daemon=True,
                                      name=f"soup-evaluate-{slot}")
            self._threads.append(thread)
            thread.start()
        return did

    def _harvest(self) -> bool:
        done = [t for t in self._threads if not t.is_alive()]
        self._threads = [t for t in self._threads if t.is_alive()]
        if self._errors:
            raise self._errors[0]  # a storage failure in a thread surfaces here
        return bool(done)

    def _run_in_thread(self, trial: Any, slot: int) -> None:
        try:
            self._run(trial, slot)
        except BaseException as e:
            self._errors.append(e)

    def _run(self, trial: Any, slot: int) -> None:
        attrs = trial.user_attrs
        sc = self.scorer
        name = str(attrs.get("name", f"trial {trial.number}"))
        device = sc.devices[slot] if slot < len(sc.devices) else sc.devices[0]
        self.reporter.step(f"{name} on {device} (trial {trial.number} of {self.queue.name})")
        start = time.monotonic()
        try:
            weights = [float(w) for w in attrs["weights"]]
            groups = attrs.get("groups") or None
            if len(weights) != len(sc.checkpoints) or sc.key(weights, groups) != attrs["key"]:
                raise SoupError(f"{name}: this worker builds another candidate than the coordinator "
                                f"(its ingredients, rules or dtype differ)")
            score, cached = sc._evaluate(weights, name, groups=groups, evaluator=slot)
        except Exception as e:  # the evaluator's failure: the coordinator reports it
            self.queue.fail(trial, redact(str(e)) or type(e).__name__)
            if not self.coordinator:
                self.reporter.warn(f"{name}: {redact(str(e))}")
        else:
            if self.queue.complete(trial, score, cached=cached, seconds=time.monotonic() - start):
                self.evaluated += 1
            else:
                self.reporter.warn(f"{name}: finished after it was handed to another worker "
                                   "(its score is in the cache; the queue keeps the other result)")
        with self._lock:
            self._claimed.pop(_trial_id(trial), None)
            self._free.append(slot)

    def _register(self, **extra: Any) -> None:
        self.queue.study.set_user_attr(f"worker:{self.id}", {
            "host": socket.gethostname(), "pid": os.getpid(), "devices": len(self.scorer.evaluators),
            "started": self._started, "seen": time.time(), "evaluated": self.evaluated, "stopped": None, **extra})

    def _beat_loop(self) -> None:
        warned = False
        while not self._stop.wait(self.queue.settings.heartbeat):
            try:
                with self._lock:
                    claimed = list(self._claimed)
                for tid in claimed:
                    self.queue.storage.record_heartbeat(tid)
                self._register()
            except Exception as e:  # the database hiccuped: beat again next time (a long outage: stale)
                if not warned:
                    self.reporter.warn(f"heartbeat to {display_url(self.queue.url)} failed: {e}")
                    warned = True

    def close(self) -> None:
        """Stop: candidates still evaluated here are handed back to the queue (another worker takes
        them at once); normally there are none."""
        self._stop.set()
        with self._lock:
            claimed = list(self._claimed.values())
        for trial in claimed:
            try:
                self.queue.hand_back(trial)
                self.reporter.warn(f"handed {trial.user_attrs.get('name', trial.number)} back to the queue")
            except Exception as e:  # the database is gone too: the trial goes stale and is retried
                self.reporter.warn(f"could not hand back trial {trial.number}: {e}")
        try:
            self._register(stopped=time.time())
        except Exception:
            pass


# --- the coordinator's side ------------------------------------------------------------------------

class EvaluationQueue:
    """The coordinator's evaluation queue: ``Scorer`` sends its candidates here when its storage is
    shared with ``soup worker`` processes.

    Args:
        url: an optuna storage URL (``sqlite:///study.db``, ``postgresql+psycopg://user@host/db``).
        scorer: the coordinator's scorer (its identity names the queue; with ``local_worker`` its
            evaluators take queued candidates too while the coordinator waits).
        local_worker: also evaluate here (default); False: only enqueue and wait for workers.

    Raises:
        SoupError: the storage cannot be reached or the study created.
    """

    def __init__(self, url: str, scorer: Scorer, *, local_worker: bool = True) -> None:
        import optuna

        self.url, self.scorer = url, scorer
        self.settings = QueueSettings.from_env()
        self.name = queue_name(scorer)
        claims = _retrying("creating table soup_claims", url, lambda: _Claims(url))
        storage = _retrying("opening the storage", url, lambda: _open_storage(url, self.settings, claims))
        with _quiet_optuna():
            study = _retrying(f"creating study {self.name}", url, lambda: optuna.create_study(
                storage=storage, study_name=self.name, direction=scorer.direction, load_if_exists=True))
        self.queue = _Queue(url, storage, study, self.settings, claims)
        study.set_user_attr("soup", {"identity": queue_identity(scorer), "settings": asdict(self.settings)})
        self.run_id = uuid.uuid4().hex[:12]
        self._run = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(), "done": False}
        self._forget_dead_runs()
        study.set_user_attr(f"run:{self.run_id}", self._run)
        self.runner = _Runner(self.queue, scorer, scorer.reporter, coordinator=True) if local_worker else None
        self._last_stale_check = 0.0
        self._parallelism = (0.0, 1)

    def parallelism(self) -> int:
        """Devices of the live workers (this process's included), read at most once per poll period."""
        at, value = self._parallelism
        if time.monotonic() - at > POLL_MAX:
            local = len(self.scorer.evaluators) if self.runner is not None else 0
            try:
                value = max(1, local, self.queue.live_devices())
            except Exception:
                value = max(1, local)
            self._parallelism = (time.monotonic(), value)
        return value

    def score_many(self, candidates: Sequence[tuple], *, steps: Sequence[str] | None = None) -> list[Score]:
        """Score ``(weights, name[, groups])`` candidates through the queue; results in the order given.

        Scores already in the cache (or COMPLETE in the queue from an earlier run) are not queued
        again. The first failure propagates; scores received before it stay in the cache. ``steps``
        (progress lines) are not printed here: each result is, with the worker that evaluated it.
        """
        sc, q = self.scorer, self.queue
        items = [(list(c[0]), c[1], c[2] if len(c) > 2 else None) for c in candidates]
        keys = [sc.key(w, g) for w, _, g in items]
        results: dict[str, tuple[Score, bool]] = {}
        for key in dict.fromkeys(keys):
            hit = sc.cache.get(sc._ekey, key)
            if hit is not None:
                results[key] = (hit, True)
        want = {k: keys.index(k) for k in dict.fromkeys(keys) if k not in results}  # key -> first candidate
        if want:
            trials = q.trials_by_key()
            queued = 0
            for key, k in want.items():
                if not any(self._usable(t) for t in trials.get(key, [])):
                    self._enqueue(key, *items[k])
                    queued += 1
            if len(want) > 1:  # one candidate: its caller announced it
                before = f" ({len(want) - queued} queued before)" if len(want) > queued else ""
                sc.reporter.step(f"queued {queued} candidate(s) in study {q.name}{before}")
            self._wait(want, items, results)
        for (w, name, _), key in zip(items, keys):
            score, cached = results[key]
            sc._record(name, w, score, cached=cached)
        return [results[key][0] for key in keys]

    def _usable(self, t: Any) -> bool:
        """A trial that gives (or will give) this key's score: done, queued or being evaluated."""
        from optuna.trial import TrialState

        return t.state in (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)

    def _enqueue(self, key: str, weights: Sequence[float], name: str,
                 groups: Mapping[str, Sequence[float]] | None) -> None:
        import optuna
        from optuna.distributions import FloatDistribution
        from optuna.trial import TrialState

        params = {lab: float(w) for lab, w in zip(self.scorer.labels, weights)}
        dists = {lab: FloatDistribution(min(0.0, w), max(1.0, w)) for lab, w in params.items()}
        attrs = {"key": key, "name": name, "weights": [float(w) for w in weights],
                 "groups": {p: [float(x) for x in g] for p, g in (groups or {}).items()}, "run": self.run_id}
        self.queue.study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params=params,
                                                             distributions=dists, user_attrs=attrs))

    def _wait(self, want: dict[str, int], items: list[tuple], results: dict[str, tuple[Score, bool]]) -> None:
        """Poll the queue until every wanted key has a COMPLETE trial (evaluating here meanwhile)."""
        from optuna.trial import TrialState

        sc, q = self.scorer, self.queue
        orphaned: dict[str, float] = {}  # key -> when it was first seen with no live trial
        pause = POLL_MIN
        while want:
            for key, trials in q.trials_by_key().items():
                if key not in want:
                    continue
                k = want[key]
                name = items[k][1]
                done = next((t for t in trials if t.state == TrialState.COMPLETE), None)
                if done is not None:
                    score = Score(float(done.value), dict(done.user_attrs.get("metrics") or {"score": done.value}),
                                  str(done.user_attrs.get("primary", "score")))
                    sc.cache.put(sc._ekey, key, score, name=name, identity=sc.identity)
                    ours = done.user_attrs.get("run") == self.run_id
                    results[key] = (score, bool(done.user_attrs.get("cached")) or not ours)
                    del want[key]
                    orphaned.pop(key, None)
                    sc.reporter.step(f"{name}: {score.value:.6g} (by {done.user_attrs.get('worker', '?')})")
                    continue
                mine = [t for t in trials if t.user_attrs.get("run") == self.run_id]
                failed = next((t for t in mine if t.state == TrialState.FAIL and t.user_attrs.get("error")), None)
                if failed is not None:
                    raise EvaluatorError(f"{failed.user_attrs['error']} (on worker "
                                         f"{failed.user_attrs.get('worker', '?')})")
                if any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in trials):
                    orphaned.pop(key, None)
                    continue
                # every trial of this key failed without an error: its workers died or stopped
                lost = [t for t in mine if t.state == TrialState.FAIL and not t.user_attrs.get("cancelled")]
                if len(lost) > self.settings.max_retry:
                    raise SoupError(f"{name}: its worker died or stopped {len(lost)} times (last: "
                                    f"{lost[-1].user_attrs.get('worker', '?')}); see study {q.name} "
                                    f"in {display_url(self.url)}")
                # the retry callback queues a copy at once; if none came (its process died in
                # between), queue one after the grace period
                first = orphaned.setdefault(key, time.monotonic())
                if time.monotonic() - first > self.settings.grace:
                    self._enqueue(key, *items[k])
                    orphaned.pop(key)
            if not want:
                return
            if time.monotonic() - self._last_stale_check >= self.settings.heartbeat:
                q.fail_stale()  # workers do it too; the coordinator does it when they are all gone
                self._last_stale_check = time.monotonic()
            if self.runner is not None and self.runner.step():
                pause = POLL_MIN
                continue
            time.sleep(pause)
            pause = min(POLL_MAX, pause * 1.5)

    def _forget_dead_runs(self) -> None:
        """Mark done the runs of coordinators on this host that were killed (their pid is gone)."""
        for rid, run in self.queue.runs().items():
            if not run.get("done") and run.get("host") == socket.gethostname() and not _alive(run.get("pid")):
                self.queue.study.set_user_attr(f"run:{rid}", {**run, "done": True, "finished": _now(),
                                                                "abandoned": True})

    def close(self) -> None:
        """This run needs no more evaluations: hand back what is evaluated here, cancel its queued
        candidates nobody took, and mark the run done (workers with nothing else to do then exit)."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        if self.runner is not None:
            self.runner.close()
            self.runner = None
        storage = self.queue.storage
        try:
            for t in self.queue.waiting():
                if t.user_attrs.get("run") != self.run_id:
                    continue
                try:
                    storage.set_trial_user_attr(_trial_id(t), "cancelled", True)
                    storage.set_trial_state_values(_trial_id(t), TrialState.FAIL)
                except UpdateFinishedTrialError:
                    pass
            self.queue.study.set_user_attr(f"run:{self.run_id}", {**self._run, "done": True, "finished": _now()})
        except Exception as e:  # the database is unreachable: workers stop after their idle timeout
            self.scorer.reporter.warn(f"could not mark the run done in {display_url(self.url)}: {e}")
        finally:
            self.queue.close()


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Without optuna's INFO lines ("A new study created..."): soup reports its own progress."""
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


# --- the worker ------------------------------------------------------------------------------------

@dataclass
class WorkerResult:
    """What a worker did."""

    study: str  # the queue study's name
    evaluated: int  # candidates evaluated (and completed) by this worker
    reason: str  # why it stopped: "done" (every run it saw is done) or "idle" (idle_timeout passed)
    seconds: float


def worker(recipe: str | Path | Recipe | Mapping[str, Any], *, storage: str, devices: Sequence[str] | None = None,
           cache: ScoreCache | str | Path | None = "default", idle_timeout: float = 600.0,
           progress: bool | Reporter = False, endpoint: str | None = None) -> WorkerResult:
    """Join a coordinator's evaluation queue and evaluate candidates until its runs are done.

    Start one on each machine (or GPU) with the recipe the coordinator (``soup run RECIPE --storage
    URL``, or ``cook(..., storage=URL)``) was given: the same ingredients (the same files), evaluator
    and rules name the same queue. Example::

        import soup
        soup.worker("recipe.yaml", storage="postgresql+psycopg://soup@db-host/soup", devices=["cuda:0"])

    Args:
        recipe: a recipe file, a ``Recipe``, or a recipe mapping (its strategy and output are not used).
        storage: the coordinator's optuna storage URL.
        devices: evaluate on these devices concurrently, one evaluator each (default: the recipe's).
        cache: the score cache: "default" (the recipe's; when that is the default, the storage's own
            database, shared by every machine), a path or URL, a ScoreCache, or None for none.
        idle_timeout: stop after this many seconds with nothing to do (also while waiting for the
            coordinator to create the queue).
        progress: progress lines on stderr.
        endpoint: hub endpoint for ``hf://`` ingredients (default: the recipe's).

    Returns:
        WorkerResult: the study, how many candidates this worker evaluated, why it stopped.

    Raises:
        SoupError: a bad recipe, unreachable storage, no queue after ``idle_timeout``; SIGTERM or
            Ctrl-C (``KeyboardInterrupt``) stop it after handing its candidate back.
    """
    from .signals import graceful

    if not isinstance(idle_timeout, (int, float)) or isinstance(idle_timeout, bool) or not idle_timeout > 0:
        raise SoupError(f"idle_timeout: {idle_timeout!r} must be a number of seconds > 0")
    if not isinstance(storage, str) or "://" not in storage:
        raise SoupError(f"storage: {storage!r} must be an optuna storage URL (sqlite:///..., postgresql://...)")
    started = time.monotonic()
    reporter = progress if isinstance(progress, Reporter) else (RichReporter() if progress else Reporter())
    r = _recipe(recipe)
    if r.evaluator is None:
        raise SoupError("evaluator: a worker needs the recipe's evaluator")
    chosen = shared_cache(r.cache if isinstance(cache, str) and cache == "default" else cache, storage)
    with graceful():
        scorer, evs, store = _local_scorer(r, devices, chosen, reporter, endpoint)
        try:
            with _Scratch(reporter) as scratch:
                scorer.scratch = scratch
                queue = _join(storage, scorer, idle_timeout, reporter)
                evaluated, reason = _drain(queue, scorer, idle_timeout, reporter)
        finally:
            for ev in evs:
                ev.close()
            if not isinstance(chosen, ScoreCache):
                store.close()
    return WorkerResult(queue.name, evaluated, reason, time.monotonic() - started)


def _recipe(recipe: Any) -> Recipe:
    from .recipe import Recipe, load_recipe, parse_recipe

    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return parse_recipe(dict(recipe))
    return load_recipe(recipe)


def _local_scorer(r: Recipe, devices: Sequence[str] | None, cache: Any, reporter: Reporter,
                  endpoint: str | None) -> tuple[Scorer, list[Any], ScoreCache]:
    """The worker's own Scorer: the recipe's ingredients, evaluator (one per device), rules, dtype."""
    from .hub.precheck import precheck
    from .ingredients import HubOptions, resolve_all
    from .options import check_device
    from .pipeline import _evaluators
    from .rules import parse_rules
    from .scorer import Scorer

    devs = list(devices) if devices else list(r.devices or [])
    for i, d in enumerate(devs):
        check_device(d, where=f"devices[{i}]")
    from .registry import has_queries, resolve_ingredients

    if has_queries(r):  # as the coordinator does; a different answer here names another queue (and says so)
        import dataclasses

        pinned = resolve_ingredients(r)
        r = dataclasses.replace(r, ingredients=[p.spec() for p in pinned], labels=[p.label for p in pinned])
    hub = HubOptions(endpoint=endpoint or r.endpoint)
    specs = precheck(r.ingredients, labels=r.labels, hub=hub, allow_float_mix=r.dtype is not None)
    cks = resolve_all(specs, labels=r.labels, hub=hub)
    store = cache if isinstance(cache, ScoreCache) else ScoreCache(cache)
    try:
        evs = _evaluators(r.evaluator.name, r.evaluator.args, devs or None)
    except BaseException:
        store.close()
        raise
    scorer = Scorer(cks, evs, devices=devs or ["cpu"], cache=store,
                    rules=parse_rules(r.rules), dtype=r.dtype, reporter=reporter)
    return scorer, evs, store


def _join(url: str, scorer: Scorer, wait: float, reporter: Reporter) -> _Queue:
    """Open the queue study the coordinator created (waiting up to ``wait`` seconds for it)."""
    import optuna

    name = queue_name(scorer)
    plain = _retrying("opening the storage", url, lambda: _open_storage(url))
    deadline = time.monotonic() + wait
    told: set[str] = set()
    while True:
        try:
            study = _retrying(f"loading study {name}", url, lambda: optuna.load_study(study_name=name, storage=plain))
            break
        except KeyError:  # not created yet
            pass
        if not told:
            reporter.step(f"waiting for a coordinator to create study {name} in {display_url(url)}")
            told.add("")
        for line in _mismatches(plain, scorer, told):
            reporter.warn(line)
        if time.monotonic() > deadline:
            raise SoupError(f"no study {name} in {display_url(url)} after {wait:g}s: start `soup run RECIPE "
                            "--storage URL` with the same recipe (same ingredient files, evaluator and rules)")
        time.sleep(POLL_MAX)
    settings = QueueSettings.from_attrs((study.user_attrs.get("soup") or {}).get("settings"))
    plain.remove_session()
    claims = _retrying("creating table soup_claims", url, lambda: _Claims(url))
    storage = _retrying("opening the storage", url, lambda: _open_storage(url, settings, claims))
    study = _retrying(f"loading study {name}", url, lambda: optuna.load_study(study_name=name, storage=storage))
    reporter.step(f"joined study {name} in {display_url(url)} (heartbeat {settings.heartbeat}s, "
                  f"grace {settings.grace}s)")
    return _Queue(url, storage, study, settings, claims)


def _mismatches(storage: Any, scorer: Scorer, told: set[str]) -> list[str]:
    """Why an active queue study of this storage is not ours: what differs (once per study)."""
    ours = queue_identity(scorer)
    lines = []
    try:
        studies = storage.get_all_studies()
    except Exception:
        return []
    for s in studies:
        theirs = (s.user_attrs.get("soup") or {}).get("identity")
        if not s.study_name.startswith(QUEUE_PREFIX) or s.study_name in told or not isinstance(theirs, dict):
            continue
        if not any(isinstance(v, dict) and not v.get("done") for k, v in s.user_attrs.items() if k.startswith("run:")):
            continue
        told.add(s.study_name)
        diffs = _differences(ours, theirs)
        if diffs:
            lines.append(f"study {s.study_name} (a coordinator is running) is for another identity: "
                         + "; ".join(diffs))
    return lines


def _differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    out = []
    a, b = ours.get("ingredients", []), theirs.get("ingredients", [])
    if len(a) != len(b):
        out.append(f"{len(a)} ingredients here, {len(b)} there")
    for x, y in zip(a, b):
        if x.get("fingerprint") != y.get("fingerprint"):
            out.append(f"ingredient {x.get('label')} differs from the coordinator's {y.get('label')} (fingerprint "
                       f"{str(x.get('fingerprint'))[:12]} here, {str(y.get('fingerprint'))[:12]} there: the same "
                       "files are needed, e.g. a shared filesystem or copies keeping their times, rsync -a)")
    for field in ("evaluator", "rules", "dtype"):
        if ours.get(field) != theirs.get(field):
            out.append(f"{field}: {json.dumps(ours.get(field), sort_keys=True)} here, "
                       f"{json.dumps(theirs.get(field), sort_keys=True)} there")
    return out


def _drain(queue: _Queue, scorer: Scorer, idle_timeout: float, reporter: Reporter) -> tuple[int, str]:
    """Evaluate queued candidates until every run seen is done, or ``idle_timeout`` passes idle."""
    runner = _Runner(queue, scorer, reporter)
    seen: set[str] = set()
    last = time.monotonic()
    pause = POLL_MIN
    last_stale = 0.0
    try:
        while True:
            if time.monotonic() - last_stale >= queue.settings.heartbeat:
                queue.fail_stale()
                last_stale = time.monotonic()
            if runner.step():
                last, pause = time.monotonic(), POLL_MIN
                continue
            if runner.busy:  # evaluations in other threads
                time.sleep(POLL_MIN)
                continue
            runs = queue.runs()
            active = {rid for rid, run in runs.items() if not run.get("done")}
            if active:
                seen |= active
            elif seen and not queue.waiting():
                reporter.step(f"every run of study {queue.name} is done; {runner.evaluated} candidate(s) "
                              "evaluated here")
                return runner.evaluated, "done"
            if time.monotonic() - last > idle_timeout:
                reporter.step(f"nothing to do for {idle_timeout:g}s; {runner.evaluated} candidate(s) evaluated here")
                return runner.evaluated, "idle"
            time.sleep(pause)
            pause = min(POLL_MAX, pause * 1.5)
    finally:
        runner.close()
        queue.close()


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
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live worker's
            finally:
                os.close(fd)
            shutil.rmtree(old, ignore_errors=True)
            self.reporter.warn(f"removed {old}, left by a worker that was killed")
        self.path = Path(tempfile.mkdtemp(prefix=f"soup-worker-{os.getpid()}-", dir=base))
        self._fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return self.path

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
