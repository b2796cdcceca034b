"""Racing: compare candidates on shared examples and stop as soon as the decision is clear.

A greedy step asks one question: is the candidate (pool + one ingredient) at least as good as the pool?
With an evaluator that scores examples one by one (``Evaluator.examples`` / ``score_examples``), the
scorer answers it on a fixed, seeded order of the examples, ``batch`` at a time, and looks at the
*paired* differences ``d_i = candidate_i - pool_i`` (signed so that positive is better): paired on the
same examples they vary far less than two independent scores (most examples are right, or wrong, for
both). After at least ``min_examples``, the race stops when a confidence sequence for the mean of ``d``
over all examples excludes the decision's threshold (``-tolerance``), or when every example has been
used; then the decision is exactly today's: the two full scores compared by the strategy.

The confidence sequence (``soup.soups.confidence.BettingSequence``) is the hedged-capital betting CS
of Waudby-Smith & Ramdas ("Estimating means of bounded random variables by betting", JRSSB 2023) in its
form for sampling *without replacement* from a finite population. Why this one:

- anytime-valid: it holds at every look simultaneously with probability >= 1 - delta, so looking after
  every batch and stopping at the first separation costs nothing (a fixed-n test or a CLT interval
  looked at repeatedly would not hold its error rate);
- without replacement: the examples are a finite set drawn in a random order; the CS is for the mean
  over that set, exactly the quantity the full evaluation computes, and it tightens to it as the set
  is used up (the i.i.d. form would ignore that the remaining examples are fewer);
- betting: each example's evidence compounds, so it adapts to the small variance of paired differences
  (most ``d_i`` are 0 for accuracy) better than the closed-form empirical-Bernstein CS of the same
  papers (``BernsteinSequence``, which racing used before): measured in ``benchmarks/bench_confidence.py``,
  0.60-1.00x the examples to separate, both holding their error rate; the price, about 1 ms of CPU per
  batch of 64 on a grid of candidate means, is nothing beside scoring 64 examples with a model.

It needs the range of the differences: ``Evaluator.example_range`` (low, high) bounds each score, so
``|d_i| <= high - low``; an evaluator without one (perplexity's token losses) uses the range of the
per-example scores seen so far in the race, a plug-in (valid asymptotically, not in finite samples).
``delta`` is the error rate of one decision: a greedy soup of N ingredients takes N - 1 decisions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from soup.errors import RecipeError
from soup.soups.confidence import BettingSequence
from soup.soups.evaluate import Score, mean_score

__all__ = ["Racing", "Race", "Ranking", "parse_racing", "run_race", "run_rank", "example_order",
           "STOP_SEPARATED", "STOP_EXHAUSTED", "STOP_CACHED", "STOP_FULL"]

STOP_SEPARATED = "separated"  # the confidence sequence excluded the threshold
STOP_EXHAUSTED = "exhausted"  # every example was used: decided on the full scores
STOP_CACHED = "cached"  # both full scores were in the cache: decided on them, nothing evaluated
STOP_FULL = "full"  # not raced (racing off, or the evaluator gives no per-example scores)


@dataclass(frozen=True)
class Racing:
    """How a comparison races (recipe ``racing: {delta: 0.05, batch: 64, min_examples: 128}``)."""

    delta: float = 0.05  # error rate of one decision: the confidence sequence holds at 1 - delta
    batch: int = 64  # examples per look (each side of the comparison)
    min_examples: int = 128  # no early decision before this many examples
    seed: int = 0  # seeds the fixed order of the examples (the same order for every comparison of a run)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Race:
    """The outcome of ``Scorer.race``: the decision and the evidence for it."""

    kept: bool  # the strategy's decision (greedy: the candidate joins the pool)
    score: Score | None  # the candidate's full score, when known (None: stopped early, never a partial one)
    pool_score: Score | None  # the pool's full score, when known
    estimate: float  # the candidate's mean per-example score over the examples used (its full score if none)
    difference: tuple[float, float] | None  # the confidence interval of the mean paired difference at the end
    examples: int  # examples each side used (0: decided from cached full scores)
    of: int | None  # every example (None: the evaluator gives no per-example scores)
    stopped: str  # separated | exhausted | cached | full (``soup.soups.racing``)


def parse_racing(value: Any, where: str = "strategy.racing") -> Racing | None:
    """A strategy's ``racing`` option as a checked ``Racing`` (None: off), before any work.

    ``True`` (the default: on whenever the evaluator gives per-example scores) and ``{}`` are the
    defaults; ``False`` is off; a mapping overrides some of ``delta``, ``batch``, ``min_examples``, ``seed``.

    Raises:
        RecipeError: anything else, an unknown key or a bad value (one line naming the field).
    """
    if value is False:
        return None
    if value is True or value is None:
        return Racing()
    if isinstance(value, Racing):
        value = value.to_dict()
    if not isinstance(value, Mapping):
        raise RecipeError(f"{where}: {value!r} must be true, false or a mapping "
                          "{delta: 0.05, batch: 64, min_examples: 128}")
    known = set(Racing.__dataclass_fields__)
    bad = sorted(map(str, set(value) - known))
    if bad:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(bad)}; valid: {', '.join(Racing.__dataclass_fields__)}")
    got = dict(value)
    delta = got.get("delta", Racing.delta)
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise RecipeError(f"{where}.delta: {delta!r} must be a number between 0 and 1 (exclusive)")
    for key, low in (("batch", 1), ("min_examples", 0), ("seed", None)):
        v = got.get(key, getattr(Racing, key))
        if isinstance(v, bool) or not isinstance(v, int) or (low is not None and v < low):
            floor = f" >= {low}" if low is not None else ""
            raise RecipeError(f"{where}.{key}: {v!r} must be a whole number{floor}")
    return Racing(float(delta), got.get("batch", Racing.batch), got.get("min_examples", Racing.min_examples),
                  got.get("seed", Racing.seed))


def example_order(n: int, seed: int) -> list[int]:
    """The fixed order in which a run's comparisons use the ``n`` examples: a seeded permutation (a
    uniformly random order is what makes the sampling-without-replacement CS valid)."""
    order = list(range(n))
    random.Random(f"soup-racing-{seed}").shuffle(order)
    return order


def run_race(scorer: Any, candidate: Sequence[float], pool: Sequence[float], *, name: str, pool_name: str,
             keep: Callable[[float, float], bool], racing: Racing | None, tolerance: float = 0.0,
             pool_score: Score | None = None, early: str = "both", candidate_soup: Mapping[str, Any] | None = None,
             pool_soup: Mapping[str, Any] | None = None) -> Race:
    """``Scorer.race`` (its docstring says what it decides): the race itself, over ``scorer``'s
    per-example scores (``score_examples``, ``full_score``) and records. ``early``: which decisions may
    stop the race before every example is used (``both``; ``reject``: only "the candidate is worse",
    search's pruning, so a trial that may be the best always gets its full score); ``candidate_soup``,
    ``pool_soup``: each side's other weights (``{groups, method}``: a search trial's)."""
    n = scorer.example_count() if racing is not None else None
    cs_, ps_ = dict(candidate_soup or {}), dict(pool_soup or {})  # only given when set: AdapterScorer has no method
    cand_hit = scorer.peek(candidate, **cs_)
    pool_full = pool_score if pool_score is not None else scorer.peek(pool, **ps_)
    if n is None or (cand_hit is not None and pool_full is not None):
        s = scorer.score(candidate, name, **cs_)
        p = pool_full if pool_full is not None else scorer.score(pool, pool_name, **ps_)
        return Race(keep(s.value, p.value), s, p, s.value, None, 0 if cand_hit is not None else (n or 0),
                    n, STOP_CACHED if cand_hit is not None else STOP_FULL)
    if early not in ("both", "reject"):
        raise ValueError(f"run_race: early={early!r} must be 'both' or 'reject'")
    sign = 1.0 if scorer.direction == "maximize" else -1.0
    same_scale = bool(scorer.evaluator.score_is_mean)
    threshold = -float(tolerance) if same_scale else 0.0
    early_reject = same_scale or not tolerance
    bounds = scorer.evaluator.example_range
    scale = float(bounds[1]) - float(bounds[0]) if bounds is not None else None
    if scale is not None and not scale > 0:
        scale = None
    cs = BettingSequence(n, racing.delta, scale)
    order = example_order(n, racing.seed)
    seen_low, seen_high = float("inf"), float("-inf")
    used, stopped, kept = 0, STOP_EXHAUSTED, False
    cand_values: list[float] = []
    with scorer.candidate(candidate, name, **cs_) as c_obj, scorer.candidate(pool, pool_name, **ps_) as p_obj:
        while used < n:
            step = max(racing.min_examples, racing.batch) if used == 0 else racing.batch
            idx = order[used:used + step]
            # the pool's side on a second device (or worker) at the same time, each side keeping its device
            c, p = scorer.examples_many([(candidate, name, idx, cs_), (pool, pool_name, idx, ps_)],
                                        candidates=[c_obj, p_obj])
            used += len(idx)
            cand_values += c
            seen_low, seen_high = min([seen_low, *c, *p]), max([seen_high, *c, *p])
            cs.update([sign * (a - b) for a, b in zip(c, p)], scale=seen_high - seen_low)
            low, high = cs.interval
            if used >= n:
                break
            if used >= racing.min_examples and ((early == "both" and low > threshold) or (early_reject and high < threshold)):
                stopped, kept = STOP_SEPARATED, low > threshold
                break
        pool_full = score = None
        if stopped == STOP_EXHAUSTED:  # every example used: the decision is exactly today's
            score, _ = scorer.full_score(candidate, name, candidate=c_obj, **cs_)
            pool_full, _ = (pool_score, False) if pool_score is not None else \
                scorer.full_score(pool, pool_name, candidate=p_obj, **ps_)
            kept = keep(score.value, pool_full.value)
    estimate = mean_score(cand_values)
    scorer.examples_full += n
    shown = score if score is not None else Score(estimate, {"examples_mean": estimate}, "examples_mean")
    scorer._record(name, candidate, shown, cached=False, examples=used, of=n, stopped=stopped)
    return Race(kept, score, pool_full, estimate, cs.interval, used, n, stopped)


@dataclass(frozen=True)
class Ranking:
    """The outcome of ``run_rank``: an order (best first) and, per candidate, what is known of it."""

    order: list[int]  # candidate indices, best first (top-p: the first p are the top p, in order)
    scores: list[Score | None]  # full scores, when known (None: stopped early, never a partial score)
    estimates: list[float]  # each one's mean per-example score over the examples it used
    examples: list[int]  # examples each one used
    stopped: list[str]  # separated | exhausted | cached


def run_rank(scorer: Any, candidates: Sequence[tuple[Sequence[float], str]], *, racing: Racing,
             top: int | None = None) -> Ranking:
    """Rank candidates (ingredients alone) by racing them on the same examples: all are scored a batch
    at a time; a pair is decided when its confidence sequence (at ``delta`` over the number of pairs,
    a union bound) leaves 0, and a candidate stops once every decision it takes part in is made (a full
    order; with ``top`` = p: once it is surely in the top p, or surely out). Those never decided use
    every example and are ranked by their full scores, exactly as without racing; when every full
    score is already cached, they decide. Each candidate's evaluation is recorded."""
    from contextlib import ExitStack
    from functools import cmp_to_key

    k, n = len(candidates), scorer.example_count()
    cached = [scorer.peek(w) for w, _ in candidates]
    if all(c is not None for c in cached):  # a re-run: the full ranking, free
        scores = [scorer.score(w, name) for w, name in candidates]
        return Ranking(scorer.rank(scores), scores, [s.value for s in scores], [0] * k, [STOP_CACHED] * k)
    sign = 1.0 if scorer.direction == "maximize" else -1.0
    bounds = scorer.evaluator.example_range
    scale = float(bounds[1]) - float(bounds[0]) if bounds is not None and bounds[1] > bounds[0] else None
    pairs = {(i, j): BettingSequence(n, racing.delta / max(1, k * (k - 1) // 2), scale)
             for i in range(k) for j in range(i + 1, k)}
    decided: dict[tuple[int, int], int] = {}  # (i, j), i < j -> +1: i is better, -1: j is better
    values: list[list[float]] = [[] for _ in range(k)]
    active, used, low_seen, high_seen = set(range(k)), 0, math.inf, -math.inf
    examples, stopped = [n] * k, [STOP_EXHAUSTED] * k

    def settled(i: int) -> bool:
        above = sum(1 for (a, b), s in decided.items() if (a == i and s < 0) or (b == i and s > 0))
        below = sum(1 for (a, b), s in decided.items() if (a == i and s > 0) or (b == i and s < 0))
        return above + below == k - 1 if top is None else above >= top or below >= k - top

    order = example_order(n, racing.seed)
    with ExitStack() as stack:
        objs = [stack.enter_context(scorer.candidate(w, name)) for w, name in candidates]
        while used < n and active:
            step = max(racing.min_examples, racing.batch) if used == 0 else racing.batch
            idx = order[used:used + step]
            running = sorted(active)  # each keeps its device (``slots``): its model is loaded once
            fresh = scorer.examples_many([(candidates[i][0], candidates[i][1], idx, {}) for i in running],
                                         candidates=[objs[i] for i in running], slots=running)
            for i, got in zip(running, fresh):
                values[i] += got
                low_seen, high_seen = min(low_seen, *values[i][-len(idx):]), max(high_seen, *values[i][-len(idx):])
            used += len(idx)
            for (i, j), cs in pairs.items():
                if (i, j) in decided or i not in active or j not in active:
                    continue
                cs.update([sign * (a - b) for a, b in zip(values[i][-len(idx):], values[j][-len(idx):])],
                          scale=high_seen - low_seen)
                low, high = cs.interval
                if racing.min_examples <= used < n and (low > 0 or high < 0):
                    decided[(i, j)] = 1 if low > 0 else -1
            if used < n:
                for i in [i for i in sorted(active) if settled(i)]:
                    active.discard(i)
                    examples[i], stopped[i] = used, STOP_SEPARATED
        full: list[Score | None] = [None] * k
        for i in sorted(active):  # every example used: the full score decides
            full[i], _ = scorer.full_score(candidates[i][0], candidates[i][1], candidate=objs[i])
    estimates = [mean_score(v) for v in values]

    def cmp(i: int, j: int) -> int:  # < 0: i ranks first
        if full[i] is not None and full[j] is not None:
            a, b = sign * full[i].value, sign * full[j].value
            return -1 if a > b or (a == b and i < j) else 1
        s = decided.get((min(i, j), max(i, j)))
        if s is not None:
            return -s if i < j else s
        m = min(len(values[i]), len(values[j]))  # undecided, not both complete (top-p): the shared examples
        a, b = sign * mean_score(values[i][:m]), sign * mean_score(values[j][:m])
        return -1 if a > b or (a == b and i < j) else 1

    ranked = sorted(range(k), key=cmp_to_key(cmp))
    for i, (w, name) in enumerate(candidates):
        scorer.examples_full += n if cached[i] is None else 0
        shown = full[i] or Score(estimates[i], {"examples_mean": estimates[i]}, "examples_mean")
        scorer._record(name, w, shown, cached=False, examples=examples[i], of=n, stopped=stopped[i])
    return Ranking(ranked, full, estimates, examples, stopped)

