"""Per-example scores of a ``Scorer``: how many examples its evaluator has, the scores known of a candidate
(this run's memo, the score cache), evaluating the missing ones, and a comparison's batches spread over
this process's devices or, with a worker queue, over every live worker's.

``ExampleScores`` is a mixin of ``soup.soups.scorer.Scorer`` (it uses the scorer's ``key``, ``candidate``,
``cache``, ``evaluators``, ``verify`` and queue); racing (``soup.soups.racing``) asks it for a batch of a
comparison with ``examples_many``, one request per side (a race) or per candidate (a ranking).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from soup.errors import EvaluatorError
from soup.soups.evaluate import Candidate, run_examples

__all__ = ["ExampleScores", "ExampleRequest", "spread", "soup_keywords"]

# one side of a comparison's batch: (weights, name, example indices, {groups, method} when set)
ExampleRequest = tuple[Sequence[float], str, Sequence[int], Mapping[str, Any]]

MEMO = 16  # candidates whose per-example scores are kept in memory: those of the current comparisons


class ExampleScores:
    """The per-example half of a scorer (see the module docstring)."""

    _example_memo: dict[str, dict[int, float]]
    _memo_lock: threading.Lock

    def example_count(self) -> int | None:
        """How many examples comparisons can race on: the evaluator's ``examples()`` (None: whole scores
        only). In this process a race's two sides and a ranking's candidates are spread over the devices;
        with a worker queue, over the live workers' devices (``examples_many``)."""
        return self._known_examples()

    def _known_examples(self) -> int | None:
        try:
            n = self.evaluator.examples()
        except Exception as e:  # a plug-in's own failure: named, like its other calls
            raise EvaluatorError(f"evaluator {self.evaluator.label}: examples() failed: {type(e).__name__}: {e}") from e
        if n is None:
            return None
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise EvaluatorError(f"evaluator {self.evaluator.label}: examples() returned {n!r}, "
                                 "expected a whole number >= 1 or None")
        return n

    def known_examples(self, key: str, indices: Sequence[int] = ()) -> dict[int, float]:
        """The per-example scores known of candidate ``key`` (this run's, the cache's): the live memo
        entry. ``indices`` that it lacks are looked up in the cache again (another process may have
        stored them since)."""
        with self._memo_lock:
            have = self._example_memo.get(key)
            fresh = have is None
            if fresh:
                have = self._example_memo[key] = {}
                while len(self._example_memo) > MEMO:
                    self._example_memo.pop(next(iter(self._example_memo)))
        if fresh or any(i not in have for i in indices):
            have.update(self.cache.get_examples(self._ekey, key))
        return have

    def store_examples(self, key: str, values: Mapping[int, float], *, evaluated: int = 0) -> None:
        """Keep per-example scores of candidate ``key`` (memo and cache); ``evaluated``: how many of them
        this run evaluated (its accounting)."""
        self.cache.put_examples(self._ekey, key, dict(values))
        self.known_examples(key).update(values)
        self.count_evaluated(evaluated)

    def count_evaluated(self, examples: int) -> None:
        """Count examples this run evaluated (here, or on a worker for it)."""
        with self._count_lock:  # a race's two sides may run on two devices at once
            self.examples_evaluated += examples

    def score_examples(self, weights: Sequence[float], name: str, indices: Sequence[int], *,
                       groups: Mapping[str, Sequence[float]] | None = None, method: Mapping[str, Any] | None = None,
                       candidate: Candidate | None = None, evaluator: int = 0) -> list[float]:
        """Per-example scores of the soup with ``weights`` on ``indices``, in this process: those already
        known are read, the others evaluated in one call (by ``evaluators[evaluator]``) and stored.
        ``candidate``: the candidate object to evaluate (kept across a race's batches)."""
        key = self.key(weights, groups, method)
        have = self.known_examples(key, indices)
        missing = list(dict.fromkeys(i for i in indices if i not in have))
        if missing:
            own = candidate is None
            cand = candidate if candidate is not None else self.candidate(weights, name, **soup_keywords(groups, method))
            try:
                values = run_examples(self.evaluators[evaluator], cand, missing)
            finally:
                if own:
                    cand.close()
            self.verify("its per-example scores were not cached")
            fresh = dict(zip(missing, values))
            self.store_examples(key, fresh, evaluated=len(missing))
            have.update(fresh)  # this entry, even if the memo let it go meanwhile
        return [have[i] for i in indices]

    def examples_many(self, requests: Sequence[ExampleRequest], *, candidates: Sequence[Candidate | None] = (),
                      slots: Sequence[int] = ()) -> list[list[float]]:
        """Per-example scores for each request (one side of a comparison's batch), all at once.

        In this process, request ``i`` runs on device ``slots[i] % devices`` (default ``i``) with
        ``candidates[i]`` (kept by the caller across a comparison, so its model is loaded once). With a
        worker queue the requests' missing examples are queued, split among the live devices when they
        outnumber the requests, and whichever workers take them evaluate them.
        """
        if self._queue is not None:
            return self._queue.examples_many(requests)
        objs = list(candidates) or [None] * len(requests)
        where = list(slots) or list(range(len(requests)))
        devices = len(self.evaluators)

        def one(i: int) -> list[float]:
            weights, name, indices, extra = requests[i]
            return self.score_examples(weights, name, indices, candidate=objs[i], evaluator=where[i] % devices,
                                       **dict(extra))

        got = spread(range(len(requests)), devices, lambda i: where[i] % devices, one)
        return [got[i] for i in range(len(requests))]


def soup_keywords(groups: Mapping[str, Sequence[float]] | None, method: Mapping[str, Any] | None) -> dict[str, Any]:
    """A candidate's other weights and method as scorer keywords, only those set (an adapter scorer
    takes no ``method``)."""
    out: dict[str, Any] = {}
    if groups:
        out["groups"] = dict(groups)
    if method is not None:
        out["method"] = dict(method)
    return out


def spread(items: Sequence[int], devices: int, device: Callable[[int], int],
           run: Callable[[int], list[float]]) -> dict[int, list[float]]:
    """``run(i)`` for each item, on ``device(i)``: the devices at once, each its own items in order."""
    if devices <= 1 or len(items) <= 1:
        return {i: run(i) for i in items}
    mine: dict[int, list[int]] = {}
    for i in items:
        mine.setdefault(device(i), []).append(i)
    with ThreadPoolExecutor(len(mine)) as ex:  # left once every device has finished, even on an error
        done = [ex.submit(lambda group=group: {i: run(i) for i in group}) for group in mine.values()]
        out: dict[int, list[float]] = {}
        for future in done:
            out.update(future.result())
    return out
