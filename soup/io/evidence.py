"""The evaluation evidence in ``soup.json``: the evaluator's identity, every evaluation in the order it
ran, greedy's trajectory, the soup's score and the held-out test record — types, and their JSON.

Part of the manifest (``soup.io.manifest`` re-exports every name here, and owns reading and writing).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from soup.io.jsonshape import BadShape, Reader, jsonable

__all__ = ["EvaluatorInfo", "identity_key", "Trial", "Step", "Scoring", "TestEvaluation", "Evaluation",
           "scoring_dict", "evaluation_dict", "read_scoring", "read_evaluation"]


@dataclass(frozen=True)
class EvaluatorInfo:
    """The evaluator's identity (what makes two scores comparable): name, version, arguments."""

    name: str
    version: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    primary: str | None = None  # the metric used for selection, for evaluators returning several
    key: str | None = None  # the identity beyond ``args`` hashed (code version, source hashes: ``identity_key``)

    @classmethod
    def from_identity(cls, identity: Mapping[str, Any]) -> EvaluatorInfo:
        """From ``Evaluator.identity()``; arguments are made JSON-safe (a function becomes its repr)."""
        version = identity.get("version")
        return cls(name=str(identity.get("name") or "?"), version=None if version is None else str(version),
                   args=jsonable(dict(identity.get("args") or {})), primary=identity.get("primary"),
                   key=identity_key(identity))


def identity_key(identity: Mapping[str, Any]) -> str:
    """sha256 of an evaluator's identity beyond its arguments: name, version, direction, primary metric and
    whatever else the plug-in adds (the python evaluator: its source file's sha256). The arguments are in
    ``args``, as resolved on the machine that ran it (absolute paths); ``soup run --if-changed`` compares
    them as the recipe wrote them, so another machine with the same recipe is not a change."""
    import hashlib

    rest = {k: v for k, v in identity.items() if k != "args"}
    text = json.dumps(rest, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Trial:
    """One evaluation, as it ran: a candidate (an ingredient alone, a candidate soup, the soup)."""

    candidate: str  # its name in progress lines: an ingredient's label, "greedy candidate 3/8 (+b)"...
    weights: dict[str, float]  # ingredient label -> weight, non-zero weights only
    score: float  # the primary metric
    metrics: dict[str, float] = field(default_factory=dict)  # every metric the evaluator returned
    cached: bool = False  # read from the score cache, not evaluated in this run
    # evaluators with per-example scores (racing, soup.soups.racing); None otherwise:
    examples: int | None = None  # examples this evaluation used (a race: each side; 0: from the cache)
    of: int | None = None  # examples a full evaluation uses
    stopped: str | None = None  # why it stopped: separated | exhausted | full | cached

    @property
    def partial(self) -> bool:
        """True when ``score`` is over fewer examples than a full evaluation (a race stopped early): the
        mean of the per-example scores used, not the candidate's score."""
        return self.stopped == "separated"

    @property
    def ingredient(self) -> str | None:
        """The ingredient's label when this trial scored one ingredient alone, else None."""
        if len(self.weights) == 1:
            (label, w), = self.weights.items()
            return label if abs(w - 1.0) < 1e-9 else None
        return None


@dataclass(frozen=True)
class Step:
    """One step of greedy's trajectory: the ingredient tried, the candidate's score, kept or not."""

    step: int  # 1 = the best ingredient alone (the seed)
    tried: str
    score: float
    kept: bool
    pool: list[str] = field(default_factory=list)  # the pool after this step
    examples: int | None = None  # a raced step: the examples it used (``Trial.examples``)
    of: int | None = None
    stopped: str | None = None

    @property
    def partial(self) -> bool:
        """True when ``score`` is a mean over the examples a race used, not the candidate's score."""
        return self.stopped == "separated"


@dataclass(frozen=True)
class Scoring:
    """One evaluator's record: who scored, which way is better, every evaluation, the soup's score."""

    evaluator: EvaluatorInfo | None = None
    direction: str | None = None  # "maximize" or "minimize"
    soup_score: float | None = None  # the soup's primary metric, when it was scored
    soup_metrics: dict[str, float] | None = None
    history: list[Trial] = field(default_factory=list)  # every evaluation, in the order it ran

    def ingredient_scores(self) -> dict[str, float]:
        """Ingredient label -> its score alone, from the history (the first evaluation of each)."""
        out: dict[str, float] = {}
        for t in self.history:
            if t.ingredient is not None and not t.partial:
                out.setdefault(t.ingredient, t.score)
        return out


@dataclass(frozen=True)
class TestEvaluation(Scoring):
    """The held-out test evaluator's record: the soup and the ingredients, reported, never used to choose."""

    __test__ = False  # not a pytest class


@dataclass(frozen=True)
class Evaluation(Scoring):
    """The selection evaluator's record (validation), greedy's trajectory, and the test record."""

    trajectory: list[Step] = field(default_factory=list)  # greedy only
    test: TestEvaluation | None = None
    # evaluators with per-example scores: examples scored in the run, and what scoring every candidate on
    # every example would have scored ({"evaluated": U, "full": F}); None otherwise
    examples: dict[str, int] | None = None


def scoring_dict(s: Scoring) -> dict[str, Any]:
    e = s.evaluator
    return {
        "evaluator": {"name": e.name, "version": e.version, "args": e.args, "primary": e.primary, "key": e.key}
        if e else None,
        "direction": s.direction,
        "soup_score": s.soup_score,
        "soup_metrics": s.soup_metrics,
        "history": [_trial_dict(t) for t in s.history],
    }


def _trial_dict(t: Trial) -> dict[str, Any]:
    return _raced({"candidate": t.candidate, "weights": t.weights, "score": t.score, "metrics": t.metrics,
                   "cached": t.cached}, t)


def _step_dict(t: Step) -> dict[str, Any]:
    return _raced({"step": t.step, "tried": t.tried, "score": t.score, "kept": t.kept, "pool": t.pool}, t)


def _raced(d: dict[str, Any], t: Trial | Step) -> dict[str, Any]:
    """``d`` with what a race recorded of ``t`` (examples, of, stopped): optional, written only when known."""
    return {**d, **{key: getattr(t, key) for key in ("examples", "of", "stopped") if getattr(t, key) is not None}}


def evaluation_dict(ev: Evaluation) -> dict[str, Any]:
    d = scoring_dict(ev)
    d["trajectory"] = [_step_dict(t) for t in ev.trajectory]
    d["test"] = scoring_dict(ev.test) if ev.test is not None else None
    if ev.examples is not None:
        d["examples"] = dict(ev.examples)
    return d


def read_scoring(r: Reader, d: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The fields of a Scoring, checked."""
    e = r.get(d, "evaluator", dict, f"{path}evaluator")
    evaluator = None
    if e is not None:
        version = e.get("version")
        evaluator = EvaluatorInfo(name=r.get(e, "name", str, f"{path}evaluator.name", required=True),
                                  version=None if version is None else str(version),
                                  args=r.get(e, "args", dict, f"{path}evaluator.args") or {},
                                  primary=r.get(e, "primary", str, f"{path}evaluator.primary"),
                                  key=r.get(e, "key", str, f"{path}evaluator.key"))
    direction = r.get(d, "direction", str, f"{path}direction")
    if direction not in (None, "maximize", "minimize"):
        raise BadShape(f"{path}direction: expected 'maximize' or 'minimize', got {direction!r}")
    history = []
    for k, t in enumerate(r.get(d, "history", list, f"{path}history") or []):
        where = f"{path}history[{k}]"
        if not isinstance(t, dict) or any(key not in t for key in ("candidate", "weights", "score")):
            raise BadShape(f"{where}: expected an object with candidate, weights and score")
        history.append(Trial(candidate=r.get(t, "candidate", str, f"{where}.candidate", required=True),
                             weights=r.numbers(t, "weights", f"{where}.weights") or {},
                             score=r.get(t, "score", float, f"{where}.score", required=True),
                             metrics=r.numbers(t, "metrics", f"{where}.metrics") or {},
                             cached=bool(r.get(t, "cached", bool, f"{where}.cached")),
                             examples=r.get(t, "examples", int, f"{where}.examples"),
                             of=r.get(t, "of", int, f"{where}.of"),
                             stopped=r.get(t, "stopped", str, f"{where}.stopped")))
    return dict(evaluator=evaluator, direction=direction, soup_score=r.get(d, "soup_score", float, f"{path}soup_score"),
                soup_metrics=r.numbers(d, "soup_metrics", f"{path}soup_metrics"), history=history)


def read_evaluation(r: Reader, ev: Mapping[str, Any]) -> Evaluation:
    trajectory = []
    for k, t in enumerate(r.get(ev, "trajectory", list, "evaluation.trajectory") or []):
        where = f"evaluation.trajectory[{k}]"
        if not isinstance(t, dict) or any(key not in t for key in ("step", "tried", "score", "kept")):
            raise BadShape(f"{where}: expected an object with step, tried, score and kept")
        pool = r.get(t, "pool", list, f"{where}.pool") or []
        trajectory.append(Step(step=r.get(t, "step", int, f"{where}.step", required=True),
                               tried=r.get(t, "tried", str, f"{where}.tried", required=True),
                               score=r.get(t, "score", float, f"{where}.score", required=True),
                               kept=r.get(t, "kept", bool, f"{where}.kept", required=True),
                               pool=[str(p) for p in pool], examples=r.get(t, "examples", int, f"{where}.examples"),
                               of=r.get(t, "of", int, f"{where}.of"), stopped=r.get(t, "stopped", str, f"{where}.stopped")))
    test = r.get(ev, "test", dict, "evaluation.test")
    examples = r.get(ev, "examples", dict, "evaluation.examples")
    if examples is not None and (set(examples) != {"evaluated", "full"} or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in examples.values())):
        raise BadShape("evaluation.examples: expected {evaluated: N, full: N} with whole numbers >= 0")
    return Evaluation(**read_scoring(r, ev, "evaluation."), trajectory=trajectory,
                      test=TestEvaluation(**read_scoring(r, test, "evaluation.test.")) if test is not None else None,
                      examples=examples)

