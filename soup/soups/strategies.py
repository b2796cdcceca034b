"""Soup strategies: they decide the weights; the merge engine applies them.

Definitions (followed exactly; POINTS = Liu et al. 2024, arXiv:2409.04828; model soups = Wortsman
et al. 2022, arXiv:2203.05482):

- **maximum** (POINTS Eq. 4): evaluate every ingredient, take the top-p by score, uniform average.
  p = 1 (default) is the best ingredient itself: its bytes are copied, no math.
- **average** (POINTS Eq. 5; model soups' "uniform soup"): uniform average of all ingredients, or
  the given weights. Needs no evaluator; with one, the soup is scored for the report.
- **greedy** (POINTS Algorithm 1; model soups' greedy soup): evaluate every ingredient, sort by score
  (best first), seed the pool with the best, then try each next ingredient: the candidate is the
  uniform average of pool + it, kept if its score beats the pool's. The result is the uniform average
  of the final pool. Tie rule ``tie``: ``">="`` (default, as in POINTS: an ingredient that does not
  hurt the held-out score is kept, and more averaging tends to generalise better) or ``">"`` (as in
  the model-soups code). ``tolerance`` lets a candidate be at most that much worse and still kept.
  On W = ``scorer.parallelism`` workers the ingredients are scored W at a time, and each round of
  greedy steps scores speculatively the candidates of the next d steps for every keep/reject outcome
  (2^d - 1 <= W): d steps per round, with exactly the pool and trajectory of one step at a time.
  ``racing`` (on by default, for evaluators with per-example scores, one evaluator in this process):
  each keep decision is raced on shared examples and stops as soon as it is clear at 1 - delta, or
  uses every example and is then exactly the decision above (``soup.soups.racing``, docs/racing.md);
  the soup's score is always on every example.

One abstract base class, one abstract method: ``choose(scorer, n) -> Choice``. Strategies are
plug-ins like evaluators (``soup.plugins``): entry-point group ``soup.strategies`` (the built-ins are
registered there), ``module:Class`` or ``path/to/file.py:Class``; a new strategy is one file written
against the scorer contract documented on ``SoupStrategy``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from soup.soups.racing import Racing, parse_racing
from soup.soups.construction import SUM_PLACES
from soup.soups.scorer import Scorer
from soup.errors import RecipeError
from soup.soups.evaluate import Score
from soup.options import check_weights

__all__ = ["SoupStrategy", "Choice", "MaximumSoup", "AverageSoup", "GreedySoup", "STRATEGIES", "load_strategy",
           "make_strategy"]


@dataclass
class Choice:
    """What a strategy decided, with the evidence for the report."""

    weights: list[float]  # one per ingredient
    scores: list[float | None]  # each ingredient's score, when evaluated
    trajectory: list[dict[str, Any]] = field(default_factory=list)  # greedy: tried, kept, score
    soup_score: Score | None = None  # the chosen soup's score, when known
    kept: list[bool] | None = None  # greedy/maximum: which ingredients are in the soup
    groups: dict[str, list[float]] = field(default_factory=dict)  # glob pattern -> its own weights
    method: dict[str, Any] | None = None  # the soup's own merge method when the strategy chose one (search)


class SoupStrategy(ABC):
    """Base class of soup strategies: decide one weight per ingredient.

    Implement ``choose(scorer, n) -> Choice``. Options come from the recipe as keyword arguments
    of the constructor (a dataclass is the easy way); raise ``RecipeError`` for a bad value. Class
    attributes: ``name`` (default: the class name), ``reference`` (a URL the model card cites) and
    ``needs_evaluator`` (False: ``choose`` may get ``scorer=None``).

    The scorer contract — all a strategy may use (``soup.soups.scorer.Scorer``):

    - ``scorer.labels``: the ingredients' names; ``scorer.direction``: "maximize" or "minimize";
    - ``scorer.score(weights, name, groups=None) -> Score``: the soup with these weights (one per
      ingredient, normalised; ``groups``: ``{glob pattern: weights}`` for the tensors matching a
      pattern), scored by the evaluator — from the score cache when it was scored before;
    - ``scorer.score_many([(weights, name[, groups]), ...]) -> [Score, ...]``: independent
      candidates, evaluated concurrently (``scorer.parallelism`` at a time);
    - ``scorer.score_ingredients() -> [Score, ...]``: every ingredient alone;
    - ``scorer.rank(values) -> [index, ...]``: best first, in the evaluator's direction (ties keep
      their order); ``scorer.better(a, b)``: ``a`` strictly better than ``b``.

    Every evaluation is recorded in the run's history (manifest, report, card and plot), whatever
    the strategy; ``Choice.trajectory`` is an optional strategy-specific story on top.
    """

    name: ClassVar[str]
    reference: ClassVar[str] = ""
    needs_evaluator: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__name__

    @abstractmethod
    def choose(self, scorer: Scorer | None, n: int) -> Choice:
        """Return the weights for ``n`` ingredients."""

    def options(self) -> dict[str, Any]:
        """The options this strategy was built with, for the manifest."""
        if dataclasses.is_dataclass(self):
            return dataclasses.asdict(self)
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def check(self, n: int) -> None:
        """Refuse options that do not fit ``n`` ingredients (RecipeError), before anything is evaluated."""


@dataclass
class MaximumSoup(SoupStrategy):
    p: int = 1  # how many of the best ingredients to average
    racing: Any = True  # race the ranking on shared examples: true (defaults), false, {delta, batch, ...}

    name: ClassVar[str] = "maximum"
    reference: ClassVar[str] = "https://arxiv.org/abs/2409.04828"

    def __post_init__(self) -> None:
        if isinstance(self.p, bool) or not isinstance(self.p, int) or self.p < 1:
            raise RecipeError(f"strategy.p: {self.p!r} must be a whole number >= 1")
        self._racing: Racing | None = parse_racing(self.racing)
        self.racing = self._racing.to_dict() if self._racing is not None else False  # as the manifest records it

    def check(self, n: int) -> None:
        if self.p > n:
            raise RecipeError(f"strategy.p: {self.p} must be between 1 and the number of ingredients ({n})")

    def choose(self, scorer: Scorer | None, n: int) -> Choice:
        self.check(n)
        if self._racing is not None and getattr(scorer, "example_count", lambda: None)() is not None:
            ranking = scorer.race_ingredients(self._racing, top=self.p)  # the top p raced; the soup scored whole
            top = set(ranking.order[: self.p])
            weights = [1.0 / self.p if i in top else 0.0 for i in range(n)]
            name = ranking.order[0] if self.p == 1 else None
            soup = scorer.complete(weights, scorer.labels[name] if name is not None else f"maximum soup (top {self.p})",
                                   ranking.scores[name] if name is not None else None)
            scorer.reporter.step(scorer.examples_line())
            return Choice(weights, [s.value if s is not None else None for s in ranking.scores], soup_score=soup,
                          kept=[i in top for i in range(n)])
        scores = scorer.score_ingredients()
        top = set(scorer.rank(scores)[: self.p])
        weights = [1.0 / self.p if i in top else 0.0 for i in range(n)]
        soup = scores[next(iter(top))] if self.p == 1 else scorer.score(weights, f"maximum soup (top {self.p})")
        return Choice(weights, [s.value for s in scores], soup_score=soup, kept=[i in top for i in range(n)])


@dataclass
class AverageSoup(SoupStrategy):
    weights: list[float] | None = None  # default uniform

    name: ClassVar[str] = "average"
    reference: ClassVar[str] = "https://arxiv.org/abs/2203.05482"
    needs_evaluator: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.weights is not None:
            self.weights = list(check_weights(self.weights, where="strategy.weights"))

    def check(self, n: int) -> None:
        from soup.engine.plan import normalise_weights

        normalise_weights(self.weights, n, where="strategy.weights")

    def choose(self, scorer: Scorer | None, n: int) -> Choice:
        from soup.engine.plan import normalise_weights

        # as given (checked): the merge normalises them, or not with normalize=False (candidates alike)
        weights = list(normalise_weights(self.weights, n, normalize=self.weights is None, where="strategy.weights"))
        soup = scorer.score(weights, "average soup") if scorer is not None else None
        return Choice(weights, [None] * n, soup_score=soup, kept=[w > 0 for w in weights])


@dataclass
class GreedySoup(SoupStrategy):
    tie: str = ">="  # ">=" (POINTS) keeps ties; ">" (model-soups code) needs a strict improvement
    tolerance: float = 0.0  # keep a candidate at most this much worse than the pool
    sums: str = "auto"  # accepted for old recipes; no effect: candidates are built as the soup is written
    racing: Any = True  # race decisions on shared examples: true (defaults), false, {delta, batch, min_examples}

    name: ClassVar[str] = "greedy"
    reference: ClassVar[str] = "https://arxiv.org/abs/2409.04828"

    def __post_init__(self) -> None:
        self._racing: Racing | None = parse_racing(self.racing)
        self.racing = self._racing.to_dict() if self._racing is not None else False  # as the manifest records it
        if not isinstance(self.tie, str) or self.tie not in (">=", ">"):
            raise RecipeError(f"strategy.tie: {self.tie!r} must be '>=' or '>'")
        if not isinstance(self.sums, str) or self.sums not in SUM_PLACES:
            raise RecipeError(f"strategy.sums: {self.sums!r} must be one of {', '.join(SUM_PLACES)}")
        t = self.tolerance
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise RecipeError(f"strategy.tolerance: {t!r} must be a finite number >= 0")

    def keep(self, scorer: Scorer, candidate: float, pool: float) -> bool:
        gain = candidate - pool if scorer.direction == "maximize" else pool - candidate
        return gain >= -self.tolerance if self.tie == ">=" else gain > -self.tolerance

    def choose(self, scorer: Scorer | None, n: int) -> Choice:
        examples = getattr(scorer, "example_count", lambda: None)() if self._racing is not None else None
        if examples is not None:  # the ingredients' order raced too; a score stopped early is not shown
            ranking = scorer.race_ingredients(self._racing)
            order, first = ranking.order, ranking.scores[ranking.order[0]]
            values: list[float | None] = [s.value if s is not None else None for s in ranking.scores]
            pool = [order[0]]
            trajectory = [dict(self._record(scorer, 1, order[0], first or ranking.estimates[order[0]], True, pool),
                               examples=ranking.examples[order[0]], of=examples, stopped=ranking.stopped[order[0]])]
            pool_score = self._raced(scorer, order, pool, first, trajectory)
        else:
            scores = scorer.score_ingredients()  # spread over the scorer's workers
            order, values = scorer.rank(scores), [s.value for s in scores]
            pool, pool_score = [order[0]], scores[order[0]]
            trajectory = [self._record(scorer, 1, order[0], pool_score, True, pool)]
            if self.lookahead(scorer.parallelism) == 1:
                pool_score = self._sequential(scorer, order, pool, pool_score, trajectory)
            else:
                pool_score = self._speculative(scorer, order, pool, pool_score, trajectory)
        weights = [1.0 / len(pool) if j in pool else 0.0 for j in range(n)]
        return Choice(weights, values, trajectory, pool_score, [j in pool for j in range(n)])

    @staticmethod
    def lookahead(workers: int) -> int:
        """How many greedy steps one round decides on ``workers``: the largest d with 2^d - 1 <= workers."""
        return max(1, (workers + 1).bit_length() - 1)

    def _sequential(self, scorer: Scorer, order: list[int], pool: list[int], pool_score: Score,
                    trajectory: list[dict[str, Any]]) -> Score:
        """One candidate per step, built by the scorer exactly as the soup would be written."""
        n = len(order)
        for step, i in enumerate(order[1:], start=2):
            name = _candidate_name(scorer, step, n, i)
            scorer.reporter.step(name)
            s = scorer.score(_uniform(pool + [i], n), name)
            kept = self.keep(scorer, s.value, pool_score.value)
            if kept:
                pool.append(i)
                pool_score = s
            trajectory.append(self._record(scorer, step, i, s, kept, pool))
        return pool_score

    def _raced(self, scorer: Scorer, order: list[int], pool: list[int], pool_score: Score | None,
               trajectory: list[dict[str, Any]]) -> Score:
        """Sequential greedy with each keep decision raced (``Scorer.race``): the candidate against the
        pool on the same examples, stopped once the confidence sequence separates them. The pool's full
        score may then be unknown for a while; the soup's is completed at the end (every example)."""
        n = len(order)
        current: Score | None = pool_score  # the pool's full score, when known
        pool_name = scorer.labels[order[0]]
        for step, i in enumerate(order[1:], start=2):
            name = _candidate_name(scorer, step, n, i)
            scorer.reporter.step(name)
            r = scorer.race(_uniform(pool + [i], n), _uniform(pool, n), name=name, pool_name=pool_name,
                            keep=lambda c, p: self.keep(scorer, c, p), racing=self._racing,
                            tolerance=self.tolerance, pool_score=current)
            if r.kept:
                pool.append(i)
                current, pool_name = r.score, name
            elif r.pool_score is not None:
                current = r.pool_score
            record = self._record(scorer, step, i, r.score if r.score is not None else r.estimate, r.kept, pool)
            trajectory.append(dict(record, examples=r.examples, of=r.of, stopped=r.stopped))
        soup = scorer.complete(_uniform(pool, n), f"greedy soup ({len(pool)} of {n})", current)
        scorer.reporter.step(scorer.examples_line())
        return soup

    def _speculative(self, scorer: Scorer, order: list[int], pool: list[int], pool_score: Score,
                     trajectory: list[dict[str, Any]]) -> Score:
        """Sequential greedy, d = ``lookahead(scorer.parallelism)`` steps decided per ``score_many``.

        A round scores, concurrently, the candidate of each of its next d steps under every
        keep/reject outcome of the round's earlier steps (2^d - 1 candidates; fewer at the end of the
        list), then walks the real outcomes with ``keep``: the pool, the trajectory and the soup's
        score are exactly those of one candidate per step. The candidates off the path taken are
        scored too (they are in the scorer's history and cache, named by the outcome they assumed).
        Candidates are built by the scorer from the ingredients, as in one step at a time. d is read
        again each round: remote workers may come and go.
        """
        n, step = len(order), 2  # step 1 seeded the pool; ``step``: the first step of this round
        while step <= n:
            tries = order[step - 1:step - 1 + self.lookahead(scorer.parallelism)]  # in greedy order
            # step j of the round, assuming the earlier tries that ``mask`` keeps: index 2^j - 1 + mask
            candidates = []
            for j, new in enumerate(tries):
                for mask in range(2 ** j):
                    assumed = [tries[k] for k in range(j) if mask >> k & 1]
                    name = _candidate_name(scorer, step + j, n, new,
                                           [(tries[k], bool(mask >> k & 1)) for k in range(j)])
                    candidates.append((_uniform(pool + assumed + [new], n), name))
            got = scorer.score_many(candidates, steps=[name for _, name in candidates])
            mask = 0
            for j, new in enumerate(tries):
                s = got[2 ** j - 1 + mask]
                kept = self.keep(scorer, s.value, pool_score.value)
                if kept:
                    pool.append(new)
                    pool_score = s
                    mask |= 1 << j
                trajectory.append(self._record(scorer, step + j, new, s, kept, pool))
            step += len(tries)
        return pool_score

    @staticmethod
    def _record(scorer: Scorer, step: int, tried: int, score: Score | float, kept: bool,
                pool: list[int]) -> dict[str, Any]:
        value = score.value if isinstance(score, Score) else float(score)
        return {"step": step, "tried": scorer.labels[tried], "score": value, "kept": kept,
                "pool": [scorer.labels[j] for j in pool]}


def _uniform(members: list[int], n: int) -> list[float]:
    """Uniform weights over ``members`` (ingredient indices), zero elsewhere."""
    return [1.0 / len(members) if j in members else 0.0 for j in range(n)]


def _candidate_name(scorer: Scorer, step: int, n: int, new: int, assumed: list[tuple[int, bool]] | None = None) -> str:
    """``greedy candidate 3/8 (+b)``; a speculative one names the outcomes it assumed: ``(+c if a kept)``."""
    ifs = ", ".join(f"{scorer.labels[i]} {'kept' if kept else 'rejected'}" for i, kept in assumed or ())
    return f"greedy candidate {step}/{n} (+{scorer.labels[new]}{' if ' + ifs if ifs else ''})"

ENTRY_POINT_GROUP = "soup.strategies"
# found even when the package's entry points are not installed (a source checkout)
STRATEGIES: dict[str, type[SoupStrategy]] = {c.name: c for c in (MaximumSoup, AverageSoup, GreedySoup)}


def load_strategy(spec: str | type[SoupStrategy]) -> type[SoupStrategy]:
    """The strategy class a name, ``module:Class`` or ``file.py:Class`` names (RecipeError if none)."""
    from soup.plugins import load_plugin_class

    return load_plugin_class(spec, group=ENTRY_POINT_GROUP, base=SoupStrategy, kind="strategy",
                             error=RecipeError, builtins=STRATEGIES)


def make_strategy(spec: str | type[SoupStrategy], **options: Any) -> SoupStrategy:
    """Build a strategy; unknown names and options are RecipeErrors listing the valid ones."""
    try:
        cls = load_strategy(spec)
    except RecipeError as e:
        raise RecipeError(f"strategy.name: {e}") from None
    params = inspect.signature(cls).parameters.values()
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        valid = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        bad = sorted(map(str, set(options) - set(valid)))
        if bad:
            raise RecipeError(f"strategy: unknown option(s) {', '.join(bad)} for {cls.name}; "
                              f"valid: {', '.join(valid) or 'none'}")
    try:
        return cls(**options)
    except TypeError as e:
        raise RecipeError(f"strategy {cls.name}: {e}") from None
