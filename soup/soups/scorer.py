"""The scorer: how strategies taste candidates. Builds candidates (weighted means of the resolved
ingredients), scores them through the cache, and runs independent evaluations concurrently, one
evaluator per device. Its public methods are the scorer contract documented on ``SoupStrategy``.

Candidates are built by the merge engine (in memory for ``candidate.state_dict``, straight into a
resident model for ``candidate.load_into``, in a temp folder for ``candidate.path``) with every
option that changes a soup's bytes (``merge_arguments``), exactly as the final soup is written: one
construction for every strategy, every number of evaluators and the soup itself, so a score is the
score of the bytes the user ships, and the cache key (``key``) names everything that changes them.

With an evaluator that gives per-example scores, ``race`` decides a comparison (greedy's candidate
against its pool) on shared examples and stops as soon as the decision is clear (``soup.soups.racing``);
per-example scores are cached like whole scores (``ScoreCache.get_examples``). Every record says how
many examples it used (``examples`` of ``of``) and why it stopped (``stopped``).
"""

from __future__ import annotations

import hashlib
import json
import threading
from contextlib import nullcontext
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from soup.soups.cache import ScoreCache, candidate_key, evaluator_key
from soup.io.checkpoint import Checkpoint
from soup.soups.evaluate import Candidate, Evaluator, Score, mean_score, run_aggregate, run_evaluator
from soup.soups.examples import ExampleScores, soup_keywords
from soup.soups.racing import STOP_CACHED, STOP_FULL, Race, Racing, Ranking, run_race, run_rank
from soup.merging import merge
from soup.soups.construction import byte_options, first_nonzero, math_device, merge_arguments, write_candidate
from soup.methods.spec import method_spec
from soup.progress import Reporter
from soup.engine.rules import Rule

__all__ = ["Scorer", "Race", "merge_arguments"]


class Scorer(ExampleScores):
    """Score candidates (weighted means of ``checkpoints``) with cached, possibly parallel, evaluations.

    Args:
        checkpoints: resolved ingredients.
        evaluators: one evaluator per device (``devices[i]`` goes with ``evaluators[i]``).
        devices: where candidates' state dicts are built for each evaluator.
        cache: the score cache (``ScoreCache(None)`` for none).
        rules, dtype: applied to every candidate, as to the final soup.
        storage: an optuna storage URL where strategies keep their study (search resumes from it);
        options: the merge options that change a soup's bytes, applied to every candidate exactly as to
            the final soup (``merge_arguments``): ``method`` (a ``MethodSpec``), ``accumulate``,
            ``normalize``, ``mixed_float``, ``strict``.
        queue: where evaluations run when not in this process alone: ``fn(scorer) -> queue``, called
            once here, e.g. ``soup.workers.EvaluationQueue`` on a storage shared with ``soup worker``
            processes (injected by the caller: the scorer knows nothing of workers). ``score`` and
            ``score_many`` then send candidates through it (``queue.score_many``, ``queue.parallelism``,
            ``queue.close``), and ``close()`` must be called when the run needs no more evaluations.
        scratch: where candidate folders and greedy's on-disk sums are written (default: the system
            temp folder); ``cook`` passes the output's work folder, so a killed run's debris is found.
    """


    def __init__(self, checkpoints: Sequence[Checkpoint], evaluators: Sequence[Evaluator], *,
                 devices: Sequence[str] = ("cpu",), cache: ScoreCache | None = None, rules: Sequence[Rule] = (),
                 dtype: str | None = None, reporter: Reporter | None = None, scratch: Path | None = None,
                 storage: str | None = None, queue: Callable[[Scorer], Any] | None = None,
                 options: Mapping[str, Any] | None = None) -> None:
        self.checkpoints = list(checkpoints)
        self.labels = [c.label for c in self.checkpoints]
        self.evaluators = list(evaluators)
        self.devices = list(devices)[: len(self.evaluators)] or ["cpu"]
        self.cache = cache or ScoreCache(None)
        self.rules = list(rules)
        self.dtype = dtype
        self.options = dict(options or {})
        self.reporter = reporter or Reporter()
        self.scratch = scratch
        self.storage = storage  # an optuna storage URL for strategies that keep a study (None: in memory)
        self.shared = queue is not None  # True: evaluations go through a queue shared with workers
        self.evaluator = self.evaluators[0]
        self.identity = self.evaluator.identity()
        self._ekey = evaluator_key(self.identity)
        self.records: list[dict[str, Any]] = []  # every evaluation, in order
        self._methods: dict[str, Any] = {}  # a candidate's own method (search trials) -> its MethodSpec
        self._queue: Any = queue(self) if queue is not None else None  # shared with `soup worker` processes
        self._example_memo: dict[str, dict[int, float]] = {}  # candidate key -> per-example scores seen
        self.examples_evaluated = 0  # examples scored in this run (a whole evaluation counts every example)
        self.examples_full = 0  # what evaluating every candidate whole would have scored (its cache hits excepted)
        self._count_lock = threading.Lock()
        self._memo_lock = threading.Lock()
        self._support_memo: dict[int, str | None] = {}  # ingredient -> digest of its support files

    @property
    def direction(self) -> str:
        return self.evaluator.direction

    @property
    def parallelism(self) -> int:
        """How many candidates ``score_many`` evaluates at once (evaluators over devices; with a shared
        storage, the devices of the live workers)."""
        return self._queue.parallelism() if self._queue is not None else len(self.evaluators)

    def rules_for(self, groups: Mapping[str, Sequence[float]] | None) -> list[Rule]:
        """The run's rules, then one per-pattern weight rule per group (the run's rules win)."""
        return self.rules + [Rule(pattern, "weights", weights=tuple(float(x) for x in w))
                             for pattern, w in (groups or {}).items()]

    def byte_options(self) -> dict[str, Any] | None:
        """The run's options that change a candidate's bytes (non-default ones only)."""
        return byte_options(self.options)

    def options_for(self, method: Mapping[str, Any] | None) -> dict[str, Any]:
        """The run's options with a candidate's own merge method (``{name, PARAMETER: VALUE...}``, e.g. a
        search trial's), checked once and kept; None: the run's method. The run's base and seed apply."""
        if method is None:
            return self.options
        text = json.dumps(dict(method), sort_keys=True, default=str)
        spec = self._methods.get(text)
        if spec is None:
            run = self.options.get("method")
            spec = method_spec(dict(method), n=len(self.checkpoints), base=run.base if run is not None else None,
                               seed=run.seed if run is not None else None)
            self._methods[text] = spec
        return dict(self.options, method=spec)

    def key(self, weights: Sequence[float], groups: Mapping[str, Sequence[float]] | None = None,
            method: Mapping[str, Any] | None = None) -> str:
        args = merge_arguments(weights, self.options_for(method))
        extra = byte_options(args)
        if self._vocab_digest() is not None:  # vocabularies that differ: the token alignment changes the bytes
            extra = dict(extra or {}, vocab_plan=self._vocab_digest())
        support = self._support_digest(args["weights"])
        if support is not None:  # the config, tokenizer and template files the candidate carries
            extra = dict(extra or {}, support=support)
        return candidate_key([c.fingerprint for c in self.checkpoints], args["weights"],
                             rules=[r.to_dict() for r in self.rules_for(groups)], dtype=self.dtype, extra=extra)

    def _support_digest(self, weights: Sequence[float]) -> str | None:
        """A digest of the files a candidate carries beside its weights (``support_files``: config,
        tokenizer, chat templates, processor files), which an evaluator reads as much as the weights:
        those of its config source (the first ingredient with a weight), and, when the vocabularies
        differ, every member's. Hashed once per ingredient; None when there are none."""
        first = next((j for j, w in enumerate(weights) if w), None)
        if first is None:
            return None
        members = [first] if self._vocab_digest() is None else [j for j, w in enumerate(weights) if w]
        digests = [d for d in (self._support_files_digest(j) for j in members) if d is not None]
        return hashlib.sha256("\0".join(digests).encode()).hexdigest() if digests else None

    def _support_files_digest(self, i: int) -> str | None:
        memo = self._support_memo
        if i not in memo:
            from soup.io.modelfiles import support_files

            root, digest = self.checkpoints[i].root, hashlib.sha256()
            names = support_files(root).files if root is not None and Path(root).is_dir() else []
            for name in names:
                digest.update(name.encode() + b"\0" + (Path(root) / name).read_bytes() + b"\0")
            memo[i] = digest.hexdigest() if names else None
        return memo[i]

    def _vocab_digest(self) -> str | None:
        """A digest of the token alignment when the ingredients' vocabularies differ (their tokenizer
        files are not in the weight files' fingerprints), computed once; None when they agree."""
        if not hasattr(self, "_vocab"):
            from soup.io.vocab import plan_vocab

            run = self.options.get("method")
            every = self.checkpoints + ([run.base] if run is not None and isinstance(run.base, Checkpoint) else [])
            plan = plan_vocab(every, self.options.get("vocab") or "union", n=len(self.checkpoints))
            self._vocab = None if plan is None else hashlib.sha256(json.dumps(
                [plan.tokens, plan.origin, plan.rows, sorted(plan.names)]).encode()).hexdigest()
        return self._vocab

    def candidate(self, weights: Sequence[float], name: str, groups: Mapping[str, Sequence[float]] | None = None,
                  method: Mapping[str, Any] | None = None) -> Candidate:
        """A candidate soup with these weights (one per ingredient; ``groups``: other weights for the
        tensors matching each glob pattern; ``method``: its own merge method), built lazily by the engine."""
        cks, w = self.checkpoints, list(weights)
        common = dict(merge_arguments(w, self.options_for(method)), rules=self.rules_for(groups), dtype=self.dtype,
                      config_from=first_nonzero(w))
        return Candidate(name, self.key(w, groups, method),
                         state_dict_fn=lambda device: merge(cks, None, device=device, **common).state_dict,
                         load_fn=lambda target: merge(cks, target, device=math_device(target), **common),
                         write_fn=lambda folder: write_candidate(cks, folder, common),
                         weights={lab: x for lab, x in zip(self.labels, w) if x}, tmp_dir=self.scratch)

    def score(self, weights: Sequence[float], name: str, *, groups: Mapping[str, Sequence[float]] | None = None,
              method: Mapping[str, Any] | None = None, evaluator: int = 0,
              make: Callable[[], Candidate] | None = None) -> Score:
        """Score the soup with ``weights`` (and per-pattern ``groups`` weights, and its own ``method``):
        from the cache, or evaluated now (and stored); with a shared storage, by whichever worker takes it."""
        if self._queue is not None:  # ``make`` is this process's shortcut; a worker builds the candidate itself
            return self._queue.score_many([(weights, name, groups, method)], steps=[f"evaluating {name}"])[0]
        score, cached = self._evaluate(weights, name, groups=groups, method=method, evaluator=evaluator, make=make)
        if not cached:
            self.examples_full += self._known_examples() or 0
        self._record(name, weights, score, cached=cached)
        return score

    def _evaluate(self, weights: Sequence[float], name: str, *, groups: Mapping[str, Sequence[float]] | None = None,
                  method: Mapping[str, Any] | None = None, evaluator: int = 0,
                  make: Callable[[], Candidate] | None = None) -> tuple[Score, bool]:
        """From the cache (True), or evaluated in this process now and stored (False); not recorded.
        ``soup.workers`` evaluates queued candidates with it."""
        key = self.key(weights, groups, method)
        hit = self.cache.get(self._ekey, key)
        if hit is not None:
            return hit, True
        ev, n = self.evaluators[evaluator], self._known_examples()
        # one evaluator whose score is built from its per-example scores (``aggregate``): those are evaluated
        # (the missing ones) and cached, for races to reuse; ``score``'s value by the evaluator's contract
        per_example = n is not None and self._from_examples(ev)
        with (make() if make is not None else self.candidate(weights, name, groups, method)) as cand:
            score = None
            if per_example:
                values = self.score_examples(weights, name, range(n), groups=groups, method=method, candidate=cand,
                                             evaluator=evaluator)
                own = type(ev).aggregate is not Evaluator.aggregate  # the evaluator's own: its metric names
                score = run_aggregate(ev, cand, values) if own or not ev.score_is_mean else \
                    Score(mean_score(values), {"score": mean_score(values)}, "score")
            if score is None:
                score = run_evaluator(ev, cand)
                self.count_evaluated(n or 0)
        self.verify("its score was not cached")  # a score never belongs to bytes that are gone
        self.cache.put(self._ekey, key, score, name=name, identity=self.identity)
        return score, False

    @staticmethod
    def _from_examples(ev: Evaluator) -> bool:
        """True if ``ev``'s score is built from its per-example scores (their mean, or its ``aggregate``)."""
        return bool(ev.score_is_mean) or type(ev).aggregate is not Evaluator.aggregate

    def verify(self, doing: str) -> None:
        """CheckpointError if an ingredient (or the method's base) changed on disk since it was opened."""
        method = self.options.get("method")
        for ck in self.checkpoints + ([method.base] if method is not None and isinstance(method.base, Checkpoint)
                                      else []):
            ck.verify(doing)

    def score_ingredients(self, what: str = "evaluating ingredient") -> list[Score]:
        """Score every ingredient alone (concurrently over the devices)."""
        n = len(self.checkpoints)
        one_hot = [[1.0 if j == i else 0.0 for j in range(n)] for i in range(n)]
        return self.score_many([(one_hot[i], self.labels[i]) for i in range(n)],
                               steps=[f"{what} {i + 1}/{n} ({self.labels[i]})" for i in range(n)])

    def score_many(self, candidates: Sequence[tuple], *, steps: Sequence[str] | None = None) -> list[Score]:
        """Score independent candidates ``(weights, name[, groups[, method]])``,
        concurrently over the devices (one evaluator each); results in the order given. The first
        failure propagates; scores finished before it stay in the cache."""
        steps = list(steps) if steps is not None else [f"evaluating {c[1]}" for c in candidates]
        if self._queue is not None:  # shared with `soup worker` processes
            return self._queue.score_many(candidates, steps=steps)
        if len(self.evaluators) == 1:
            out = []
            for c, step in zip(candidates, steps):
                self.reporter.step(step)
                out.append(self.score(c[0], c[1], groups=c[2] if len(c) > 2 else None,
                                      method=c[3] if len(c) > 3 else None))
            return out
        slots: list[int] = list(range(len(self.evaluators)))
        lock = threading.Lock()

        def job(k: int) -> Score:
            with lock:
                slot = slots.pop()
            try:
                self.reporter.step(f"{steps[k]} on {self.devices[slot]}")
                c = candidates[k]
                return self.score(c[0], c[1], groups=c[2] if len(c) > 2 else None,
                                  method=c[3] if len(c) > 3 else None, evaluator=slot)
            finally:
                with lock:
                    slots.append(slot)

        with ThreadPoolExecutor(max_workers=len(self.evaluators)) as pool:
            return list(pool.map(job, range(len(candidates))))

    # ---- per-example scores and racing (soup.soups.racing) -----------------------------------------

    def peek(self, weights: Sequence[float], groups: Mapping[str, Sequence[float]] | None = None,
             method: Mapping[str, Any] | None = None) -> Score | None:
        """The score cache's entry for the soup with ``weights``: nothing is evaluated or recorded."""
        return self.cache.get(self._ekey, self.key(weights, groups, method))

    def full_score(self, weights: Sequence[float], name: str, *, candidate: Candidate | None = None,
                   groups: Mapping[str, Sequence[float]] | None = None,
                   method: Mapping[str, Any] | None = None) -> tuple[Score, bool]:
        """The soup's score on every example, unrecorded: ``(score, evaluated)``; ``candidate``: the
        race's candidate object, used (not closed) if something must be evaluated. With a worker queue,
        the missing examples are spread over the workers and aggregated here (a score built from
        per-example scores), or a worker scores the candidate whole."""
        if self._queue is not None and self.peek(weights, groups, method) is None:
            n = self._known_examples()
            if n is None or not self._from_examples(self.evaluator):
                return self._queue.score_many([(weights, name, groups, method)], record=False)[0], True
            self.examples_many([(weights, name, range(n), soup_keywords(groups, method))])  # then all known here
        score, cached = self._evaluate(weights, name, groups=groups, method=method,
                                       make=(lambda: nullcontext(candidate)) if candidate else None)
        return score, not cached

    def race(self, candidate: Sequence[float], pool: Sequence[float], *, name: str, pool_name: str,
             keep: Callable[[float, float], bool], racing: Racing | None, tolerance: float = 0.0,
             pool_score: Score | None = None, **more: Any) -> Race:
        """Decide ``keep(candidate's score, pool's score)`` (greedy's rule), racing when it can.

        When both full scores are known (``pool_score``, the cache) the decision is made on them.
        Else, with ``racing`` and per-example scores (``example_count``), both are scored on the
        examples in the run's seeded order, ``racing.batch`` at a time, and after ``racing.min_examples``
        the race stops as soon as the confidence sequence of the mean paired difference (positive: the
        candidate is better) lies wholly above ``-tolerance`` (kept) or below it (not kept); for an
        evaluator whose score is not the mean of its per-example scores (``score_is_mean`` False) the
        scale of ``tolerance`` is unknown, so the threshold is 0 and, with a tolerance, only a keep is
        decided early. A race that uses every example decides on the two full scores: exactly the
        decision without racing. The candidate's evaluation is recorded (examples used, why it stopped).
        ``more``: ``early``, ``candidate_soup``, ``pool_soup`` (``run_race``: search prunes with them).
        """
        return run_race(self, candidate, pool, name=name, pool_name=pool_name, keep=keep, racing=racing,
                        tolerance=tolerance, pool_score=pool_score, **more)

    def race_ingredients(self, racing: Racing, *, top: int | None = None) -> Ranking:
        """Rank the ingredients by racing them on shared examples (``soup.soups.racing.run_rank``): a full
        order, or (``top`` = p) the top p; recorded. Needs ``example_count()``."""
        n = len(self.checkpoints)
        self.reporter.step(f"racing the {n} ingredients on shared examples")
        return run_rank(self, [([1.0 if j == i else 0.0 for j in range(n)], self.labels[i]) for i in range(n)],
                        racing=racing, top=top)

    def complete(self, weights: Sequence[float], name: str, score: Score | None = None, *,
                 groups: Mapping[str, Sequence[float]] | None = None,
                 method: Mapping[str, Any] | None = None) -> Score:
        """The soup's full score (a race may have stopped before it was known): from the cache, the
        per-example scores still missing, or a whole evaluation; recorded."""
        if score is not None:
            return score
        full, evaluated = self.full_score(weights, name, groups=groups, method=method)
        self._record(name, weights, full, cached=not evaluated)  # on every example
        return full

    def examples_line(self) -> str:
        """What the run printed about its examples: used against what whole evaluations would use."""
        used, full = self.examples_evaluated, self.examples_full
        share = f" ({used / full:.0%})" if full else ""
        return f"examples evaluated: {used:,} of the {full:,} a full evaluation of every candidate would use{share}"

    def rank(self, values: Sequence[Score | float]) -> list[int]:
        """Indices of ``values``, best first in the evaluator's direction (ties keep their order)."""
        sign = -1.0 if self.direction == "maximize" else 1.0
        plain = [v.value if isinstance(v, Score) else float(v) for v in values]
        return sorted(range(len(plain)), key=lambda i: (sign * plain[i], i))

    def better(self, a: float, b: float) -> bool:
        """True if score ``a`` is strictly better than ``b`` in the evaluator's direction."""
        return self.evaluator.better(a, b)

    def close(self) -> None:
        """The run needs no more evaluations: with a shared storage, the queue is marked done (its
        workers stop once idle) and candidates nobody took are cancelled. Idempotent."""
        queue, self._queue = self._queue, None
        if queue is not None:
            queue.close()

    def _record(self, name: str, weights: Sequence[float], score: Score, *, cached: bool,
                examples: int | None = None, of: int | None = None, stopped: str | None = None) -> None:
        record = {"candidate": name, "weights": {lab: w for lab, w in zip(self.labels, weights) if w},
                  "score": score.value, "metrics": score.metrics, "cached": cached}
        n = of if of is not None else self._known_examples()
        if n is not None:  # evaluators with per-example scores: how many examples, and why it stopped
            full = stopped in (None, STOP_FULL, STOP_CACHED)
            record.update(examples=(0 if cached else n) if full and examples is None else examples, of=n,
                          stopped=stopped or (STOP_CACHED if cached else STOP_FULL))
        self.records.append(record)
