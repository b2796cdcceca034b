"""The coordinator's side: ``EvaluationQueue`` creates the queue study, enqueues the Scorer's
candidates as WAITING trials, waits for their scores (evaluating queued candidates here meanwhile,
unless ``local_worker=False``) and marks its run done on ``close()``.

A race's batches go through it too (``examples_many``): a trial then asks for one candidate's scores
on some examples (a *part*: ``indices`` and ``candidate`` in its user attributes, ``values`` when done),
so the workers share one comparison as well as whole candidates.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from soup.soups.cache import display_url
from soup.errors import EvaluatorError, SoupError
from soup.soups.evaluate import Score
from soup.workers.queue import _Claims, _open_storage, _Queue, _retrying
from soup.workers.runner import _Runner
from soup.workers.settings import (POLL_MAX, POLL_MIN, QueueSettings, _me, _now, _trial_id, queue_identity,
                                   queue_name)

if TYPE_CHECKING:
    from soup.soups.scorer import Scorer

PART = 16  # the fewest examples a part of one request (a trial) is given


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

    def score_many(self, candidates: Sequence[tuple], *, steps: Sequence[str] | None = None,
                   record: bool = True) -> list[Score]:
        """Score ``(weights, name[, groups[, method]])`` candidates through the queue; results in the order given.

        Scores already in the cache (or COMPLETE in the queue from an earlier run) are not queued
        again. The first failure propagates; scores received before it stay in the cache. ``steps``
        (progress lines) are not printed here: each result is, with the worker that evaluated it.
        ``record``: each is recorded in the scorer's history (False: a race's full score, recorded by it).
        """
        sc, q = self.scorer, self.queue
        items = [(list(c[0]), c[1], c[2] if len(c) > 2 else None, c[3] if len(c) > 3 else None) for c in candidates]
        keys = [sc.key(w, g, m) for w, _, g, m in items]
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
        n = sc.example_count() or 0
        for (w, name, _, _), key in zip(items, keys):
            score, cached = results[key]
            if record:
                sc.examples_full += 0 if cached else n
                sc._record(name, w, score, cached=cached)
        return [results[key][0] for key in keys]

    def examples_many(self, requests: Sequence[tuple]) -> list[list[float]]:
        """Per-example scores of ``(weights, name, indices, {groups, method})`` requests (one side of a
        comparison's batch each) through the queue; results in the order given.

        The examples not yet known (this run, the cache) are queued, one trial per part: a request's
        are split into parts when the live devices outnumber the requests (at least ``PART`` examples
        each), so one comparison's batch runs on every worker at once; each worker builds the
        candidates it takes (and keeps its last two built across the batches of a comparison).
        """
        sc, q = self.scorer, self.queue
        per = max(1, -(-self.parallelism() // max(1, len(requests))))
        items: list[tuple] = []
        want: dict[str, int] = {}
        keys = [sc.key(weights, extra.get("groups"), extra.get("method")) for weights, _, _, extra in requests]
        for (weights, name, indices, extra), key in zip(requests, keys):
            groups, method = extra.get("groups"), extra.get("method")
            have = sc.known_examples(key, indices)
            missing = list(dict.fromkeys(i for i in indices if i not in have))
            parts = min(per, -(-len(missing) // PART))
            for p in range(parts):
                part = missing[p * len(missing) // parts:(p + 1) * len(missing) // parts]
                task = f"{key}#{hashlib.sha256(json.dumps(part).encode()).hexdigest()[:16]}"
                if task not in want:
                    want[task] = len(items)
                    items.append((list(weights), name, groups, method, part, key))
        if want:
            trials = q.trials_by_key()
            for task, k in want.items():
                if not any(self._usable(t) for t in trials.get(task, [])):
                    self._enqueue(task, *items[k])
            self._wait(dict(want), items, {})
        known = [sc.known_examples(key, indices) for (_, _, indices, _), key in zip(requests, keys)]
        return [[have[i] for i in indices] for (_, _, indices, _), have in zip(requests, known)]

    def _usable(self, t: Any) -> bool:
        """A trial that gives (or will give) this key's score: done, queued or being evaluated."""
        from optuna.trial import TrialState

        return t.state in (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)

    def _enqueue(self, key: str, weights: Sequence[float], name: str,
                 groups: Mapping[str, Sequence[float]] | None, method: Mapping[str, Any] | None = None,
                 indices: Sequence[int] | None = None, candidate: str | None = None) -> None:
        """Queue a WAITING trial: the candidate whole, or (``indices``) its scores on those examples
        (``key`` then names the part; ``candidate`` is the candidate's key)."""
        import optuna
        from optuna.distributions import FloatDistribution
        from optuna.trial import TrialState

        params = {lab: float(w) for lab, w in zip(self.scorer.labels, weights)}
        dists = {lab: FloatDistribution(min(0.0, w), max(1.0, w)) for lab, w in params.items()}
        attrs = {"key": key, "name": name, "weights": [float(w) for w in weights],
                 "groups": {p: [float(x) for x in g] for p, g in (groups or {}).items()}, "run": self.run_id,
                 "method": dict(method) if method else None}
        if indices is not None:
            attrs.update(indices=[int(i) for i in indices], candidate=candidate)
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
                if done is not None and len(items[k]) > 4:  # a part: its per-example scores
                    self._take_part(done, items[k])
                    del want[key]
                    orphaned.pop(key, None)
                    continue
                if done is not None:
                    score = Score(float(done.value), dict(done.user_attrs.get("metrics") or {"score": done.value}),
                                  str(done.user_attrs.get("primary", "score")))
                    sc.cache.put(sc._ekey, key, score, name=name, identity=sc.identity)
                    ours = done.user_attrs.get("run") == self.run_id
                    results[key] = (score, bool(done.user_attrs.get("cached")) or not ours)
                    if not results[key][1] and done.user_attrs.get("worker") != _me():  # counted here if here
                        sc.count_evaluated(sc.example_count() or 0)  # a whole evaluation: every example
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

    def _take_part(self, done: Any, item: tuple) -> None:
        """A COMPLETE part's per-example scores, checked, into the scorer's memo and cache."""
        name, indices, key = item[1], item[4], item[5]
        values = done.user_attrs.get("values")
        if not isinstance(values, list) or len(values) != len(indices) or \
                not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise EvaluatorError(f"{name}: worker {done.user_attrs.get('worker', '?')} returned no per-example "
                                 f"scores for its {len(indices)} examples")
        ours = done.user_attrs.get("run") == self.run_id and done.user_attrs.get("worker") != _me()
        fresh = 0 if done.user_attrs.get("cached") or not ours else int(done.user_attrs.get("evaluated", len(values)))
        self.scorer.store_examples(key, dict(zip(indices, map(float, values))), evaluated=fresh)

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
