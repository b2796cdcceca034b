"""Search trials raced against the best trial so far, and pruned once they are surely worse.

``SearchSoup`` asks optuna for a trial, then, when the evaluator gives per-example scores
(``Scorer.example_count``; in this process or through the worker queue) and ``racing`` is on, scores it
with ``Scorer.race`` against the best COMPLETE trial on the run's shared, seeded examples, with
``early="reject"``: after ``min_examples`` the race stops as soon as the confidence sequence of the
mean paired difference says the trial is worse than the best (at 1 - delta). Such a trial cannot be
the search's answer; it is reported to optuna as PRUNED, with its mean over the examples it used as
its last intermediate value (TPE ranks pruned trials below every complete one by it). A trial that
may be better is never stopped: it runs on every example and gets its full score, so the best trial,
and the soup, are exactly those of a search without racing on the trials that completed.

This is the racing test of ``soup.soups.racing`` used as an optuna pruner (the issue's third option;
optuna's own median / successive-halving pruners compare a trial's *partial* mean with other trials'
partial means at the same step, unpaired, with no error guarantee).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from soup.soups.evaluate import Score
from soup.soups.examples import soup_keywords
from soup.soups.racing import STOP_SEPARATED, Racing

__all__ = ["Best", "race_trial"]


@dataclass(frozen=True)
class Best:
    """The best COMPLETE trial so far: what a new trial races against."""

    weights: list[float]
    groups: dict[str, list[float]]
    method: dict[str, Any] | None
    score: Score
    name: str


def race_trial(scorer: Any, trial: Any, soup: tuple[list[float], dict[str, list[float]], dict[str, Any] | None],
               name: str, best: Best, racing: Racing) -> Score | None:
    """Score ``trial`` (its ``soup``: weights, groups, method) racing it against ``best``.

    Returns its full score, or None when it was stopped as surely worse: the caller tells optuna
    PRUNED. The trial's intermediate value (its mean per-example score so far) is reported at the
    number of examples used, in either case.
    """
    weights, groups, method = soup
    mine = soup_keywords(groups, method)
    race = scorer.race(weights, best.weights, name=name, pool_name=best.name, keep=_not_worse(scorer),
                       racing=racing, pool_score=best.score, early="reject", candidate_soup=mine,
                       pool_soup=soup_keywords(best.groups, best.method))
    if race.examples:
        trial.report(race.estimate, race.examples)
    if race.stopped == STOP_SEPARATED and not race.kept:
        return None
    if race.score is not None:
        return race.score
    return scorer.complete(weights, name, **mine)


def _not_worse(scorer: Any) -> Callable[[float, float], bool]:
    return lambda candidate, best: not scorer.better(best, candidate)
