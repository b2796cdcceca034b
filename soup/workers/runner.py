"""Evaluating queued trials: ``_Runner`` claims candidates from a ``_Queue`` and evaluates them on a
local Scorer (one slot per evaluator), beating for them and registering its process as a worker.
Used by ``soup worker`` and by the coordinator's own local worker.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from soup.soups.cache import display_url
from soup.errors import SoupError, redact
from soup.progress import Reporter
from soup.soups.evaluate import Score, mean_score
from soup.soups.examples import soup_keywords
from soup.workers.queue import _Queue
from soup.workers.settings import _me, _trial_id

if TYPE_CHECKING:
    from soup.soups.scorer import Scorer


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
        self._held: dict[int, list[tuple[str, Any]]] = {}  # slot -> its last candidates built for parts
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
            method = attrs.get("method") or None
            key = attrs.get("candidate") or attrs["key"]
            if len(weights) != len(sc.checkpoints) or sc.key(weights, groups, method) != key:
                raise SoupError(f"{name}: this worker builds another candidate than the coordinator "
                                f"(its ingredients, rules or dtype differ)")
            extra: dict[str, Any] = {}
            if attrs.get("indices") is not None:  # a part of a race: per-example scores on these examples
                score, cached, extra = self._part(slot, key, weights, name, groups, method, attrs["indices"])
            else:
                score, cached = sc._evaluate(weights, name, groups=groups, method=method, evaluator=slot)
        except Exception as e:  # the evaluator's failure: the coordinator reports it
            self.queue.fail(trial, redact(str(e)) or type(e).__name__)
            if not self.coordinator:
                self.reporter.warn(f"{name}: {redact(str(e))}")
        else:
            if self.queue.complete(trial, score, cached=cached, seconds=time.monotonic() - start, **extra):
                self.evaluated += 1
            else:
                self.reporter.warn(f"{name}: finished after it was handed to another worker "
                                   "(its score is in the cache; the queue keeps the other result)")
        with self._lock:
            self._claimed.pop(_trial_id(trial), None)
            self._free.append(slot)

    def _part(self, slot: int, key: str, weights: list[float], name: str, groups: Any, method: Any,
              indices: Any) -> tuple[Score, bool, dict[str, Any]]:
        """Score a candidate on some examples (a part of a race): ``(mean, cached, {values, evaluated})``.
        The slot keeps its last two candidates built, so a race's next batches reuse them."""
        sc = self.scorer
        n = sc.example_count()
        if n is None or not isinstance(indices, list) or \
                not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in indices):
            raise SoupError(f"{name}: this worker's evaluator has other examples than the coordinator's "
                            f"({n if n is not None else 'no'} per-example scores)")
        known = sc.known_examples(key, indices)
        fresh = sum(1 for i in dict.fromkeys(indices) if i not in known)
        held = self._held.setdefault(slot, [])
        cand = next((c for k, c in held if k == key), None)
        if cand is None:
            cand = sc.candidate(weights, name, **soup_keywords(groups, method))
            held.append((key, cand))
            while len(held) > 2:
                held.pop(0)[1].close()
        values = sc.score_examples(weights, name, indices, groups=groups, method=method, candidate=cand,
                                   evaluator=slot)
        return Score(mean_score(values), {"score": mean_score(values)}, "score"), fresh == 0, \
            {"values": values, "evaluated": fresh}

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
        for held in self._held.values():  # the candidates a slot kept across a race's batches
            for _, cand in held:
                cand.close()
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
