"""A queue study in an optuna storage: opening the storage (heartbeat, retry of stale trials), retrying
the races of first use, first-come claims (table ``soup_claims``), and ``_Queue``, which claims,
completes, fails and hands back trials and reads the queue's state (runs, live workers).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from soup.soups.cache import check_db_place, display_url
from soup.errors import SoupError
from soup.soups.evaluate import Score
from soup.workers.settings import QueueSettings, _me, _now, _trial_id

if TYPE_CHECKING:
    import optuna


def _open_storage(url: str, settings: QueueSettings | None = None, claims: _Claims | None = None) -> Any:
    """An optuna RDBStorage on ``url``; with ``settings`` (and ``claims``), the heartbeat and the
    retry of stale trials."""
    import optuna
    from optuna.storages import RDBStorage

    check_db_place(url, "storage")  # an sqlite file in a missing folder: refused, never created
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

        from soup.soups.cache import engine, ensure_table

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

    def complete(self, trial: optuna.trial.FrozenTrial, score: Score, *, cached: bool, seconds: float,
                 **extra: Any) -> bool:
        """Store ``score`` as the trial's value (and ``extra`` user attributes: a part's ``values``,
        ``evaluated``); False if the trial was handed on meanwhile."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        tid = _trial_id(trial)
        try:
            for k, v in (("metrics", dict(score.metrics)), ("primary", score.primary), ("cached", cached),
                         ("seconds", round(seconds, 3)), *extra.items()):
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
