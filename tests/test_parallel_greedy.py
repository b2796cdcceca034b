"""Greedy soup on W workers: speculative rounds decide several steps at once, with exactly the pool,
trajectory and soup of one step at a time; maximum soup's ingredients are scored concurrently."""

from __future__ import annotations

import random
import threading
import time
from itertools import pairwise
from typing import ClassVar

import pytest
import torch

from soup.soups.evaluate import Evaluator, Score
from soup.pipeline import greedy_soup
from soup.progress import Reporter
from soup.soups.scorer import Scorer
from soup.soups.strategies import GreedySoup, MaximumSoup

from conftest import load_soup, make_state, reference_mean, write_checkpoint


class TableScorer:
    """The scorer contract over a random score table: a candidate's score is a deterministic function
    of the set of ingredients it averages (few distinct values, so ties are common)."""

    def __init__(self, n: int, seed: int, *, workers: int = 1, direction: str = "maximize", levels: int = 4):
        self.labels = [chr(ord("a") + i) for i in range(n)]
        self.direction = direction
        self.parallelism = workers
        self.reporter = Reporter()
        self.seed, self.levels = seed, levels
        self.calls: list[list[str]] = []  # the candidate names of each score / score_many call, in order

    def value(self, weights) -> float:
        members = [i for i, w in enumerate(weights) if w]
        assert all(weights[i] == 1.0 / len(members) for i in members)  # greedy candidates are uniform
        # seeded by a string: the same members give the same value however many candidates were asked
        return random.Random(f"{self.seed}:{members}").randint(0, self.levels) / self.levels

    def score(self, weights, name, *, groups=None, evaluator=0, make=None) -> Score:
        assert make is None  # a running sum is only built for a real Scorer
        self.calls.append([name])
        return Score(self.value(weights))

    def score_many(self, candidates, *, steps=None) -> list[Score]:
        assert len(candidates) <= self.parallelism  # one round fits the workers
        self.calls.append([c[1] for c in candidates])
        return [Score(self.value(c[0])) for c in candidates]

    def score_ingredients(self, what: str = "evaluating ingredient") -> list[Score]:
        n = len(self.labels)
        return [Score(self.value([1.0 if j == i else 0.0 for j in range(n)])) for i in range(n)]

    rank = Scorer.rank

    def better(self, a: float, b: float) -> bool:
        return a > b if self.direction == "maximize" else a < b


def _choice(strategy, n, seed, workers, direction):
    scorer = TableScorer(n, seed, workers=workers, direction=direction)
    return strategy.choose(scorer, n), scorer


def test_lookahead_depth():
    assert [GreedySoup.lookahead(w) for w in range(1, 17)] == [1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 4, 4]


def test_speculative_greedy_identical_to_sequential_on_random_tables():
    """300 random tables (ties, both directions, both tie rules, with and without tolerance), n = 1..9,
    W = 2..8: the same weights, scores, trajectory, soup score and kept flags as W = 1."""
    compared = 0
    for seed in range(300):
        n = 1 + seed % 9
        rng = random.Random(seed)
        direction = rng.choice(["maximize", "minimize"])
        strategy = GreedySoup(tie=rng.choice([">=", ">"]), tolerance=rng.choice([0.0, 0.0, 0.25, 0.3]))
        ref, _ = _choice(strategy, n, seed, 1, direction)
        for workers in range(2, 9):
            got, _ = _choice(strategy, n, seed, workers, direction)
            assert got == ref, (seed, n, workers, direction, strategy)
            compared += 1
    assert compared == 300 * 7


def test_tables_exercise_keeps_rejects_and_ties():
    """The random tables above are not degenerate: rejects, keeps after a reject, and kept ties occur."""
    rejected = kept_after_reject = kept_tie = 0
    for seed in range(300):
        choice, _ = _choice(GreedySoup(), 9, seed, 1, "maximize")
        t = choice.trajectory
        rejected += sum(not s["kept"] for s in t)
        kept_after_reject += any(not a["kept"] and b["kept"] for a, b in pairwise(t))
        pool_scores = [s["score"] for s in t if s["kept"]]
        kept_tie += any(a == b for a, b in pairwise(pool_scores))
    assert rejected > 300 and kept_after_reject > 100 and kept_tie > 100


@pytest.mark.parametrize("workers, rounds", [
    (1, [1] * 8),  # sequential: one candidate per step
    (2, [1] * 8),  # 2 workers cannot cover 2 steps (3 candidates): still one step per round
    (3, [3, 3, 3, 3]),  # 2 steps per round
    (4, [3, 3, 3, 3]),
    (7, [7, 7, 3]),  # 3 steps per round; the last round has 2 steps left
    (8, [7, 7, 3]),
])
def test_steps_per_round(workers, rounds):
    choice, scorer = _choice(GreedySoup(), 9, 7, workers, "maximize")
    assert [len(c) for c in scorer.calls] == rounds
    assert len(choice.trajectory) == 9  # every step decided, whatever the rounds


class VaryingWorkers(TableScorer):
    """Remote workers come and go: each read of ``parallelism`` gives the next count of ``counts``."""

    def __init__(self, *args, counts, **kwargs):
        super().__init__(*args, **kwargs)
        self.counts, self.reads = counts, 0

    @property
    def parallelism(self):
        self.reads += 1
        return self.counts[(self.reads - 1) % len(self.counts)]

    @parallelism.setter
    def parallelism(self, value):
        pass

    def score_many(self, candidates, *, steps=None):
        self.calls.append([c[1] for c in candidates])
        return [Score(self.value(c[0])) for c in candidates]


def test_workers_joining_and_leaving_between_rounds_same_result():
    for seed in range(100):
        n = 2 + seed % 8
        ref, _ = _choice(GreedySoup(), n, seed, 1, "maximize")
        scorer = VaryingWorkers(n, seed, counts=[3, 7, 1, 4, 2, 15])
        assert GreedySoup().choose(scorer, n) == ref
    # the last table (n = 5, 4 steps): 3 workers at the start (speculation), then a round on 7 workers
    # (3 steps: 7 candidates), then one on 1 worker (the last step)
    assert [len(c) for c in scorer.calls] == [7, 1]


def test_speculative_candidates_are_named_by_the_outcomes_they_assume():
    choice, scorer = _choice(GreedySoup(), 4, 3, 3, "maximize")
    first, second, third = (choice.trajectory[k]["tried"] for k in (1, 2, 3))
    assert scorer.calls[0] == [f"greedy candidate 2/4 (+{first})",
                               f"greedy candidate 3/4 (+{second} if {first} rejected)",
                               f"greedy candidate 3/4 (+{second} if {first} kept)"]
    assert scorer.calls[1] == [f"greedy candidate 4/4 (+{third})"]


def test_maximum_soup_same_on_any_number_of_workers():
    for seed in range(50):
        n = 1 + seed % 9
        for p in range(1, n + 1):
            ref, _ = _choice(MaximumSoup(p=p), n, seed, 1, "maximize")
            got, scorer = _choice(MaximumSoup(p=p), n, seed, 4, "maximize")
            assert got == ref
            assert len(scorer.calls) == (p > 1)  # the ingredients, then one evaluation of the top-p soup


# ---- end to end: a real greedy soup on 3 local evaluators (devices) against one ----

class Members(Evaluator):
    """Scores a candidate by the set of ingredients it averages (a fixed pseudo-random table), after
    building its real weights; keeps every built candidate and the most evaluations seen at once."""

    name = "members"
    built: ClassVar[dict[str, dict[str, torch.Tensor]]] = {}
    devices: ClassVar[list[str]] = []
    lock = threading.Lock()
    running = peak = 0

    def score(self, candidate):
        members = "".join(sorted(candidate.weights))
        sd = candidate.state_dict("cpu")
        with Members.lock:
            Members.running += 1
            Members.peak = max(Members.peak, Members.running)
            Members.built[members] = sd
            Members.devices.append(self.args.get("device", "cpu"))
        time.sleep(0.05)  # long enough for concurrent evaluations to overlap
        with Members.lock:
            Members.running -= 1
        return random.Random(f"e2e:{members}").randint(0, 4) / 4

    @classmethod
    def reset(cls):
        cls.built, cls.devices, cls.running, cls.peak = {}, [], 0, 0


def test_greedy_on_three_devices_same_soup_as_one(tmp_path):
    names = "abcdef"
    states = [make_state(40 + i) for i in range(len(names))]
    paths = [write_checkpoint(tmp_path / c, st) for c, st in zip(names, states)]

    Members.reset()
    one = greedy_soup(paths, Members, out=tmp_path / "one", cache=None)
    assert Members.peak == 1 and len(Members.built) == 6 + 5
    Members.reset()
    three = greedy_soup(paths, Members, devices=["cpu"] * 3, out=tmp_path / "three", cache=None)
    assert Members.peak == 3 and len(Members.devices) == 6 + 3 + 3 + 1  # 5 steps: rounds of 2, 2, 1

    assert three.weights == one.weights and three.trajectory == one.trajectory
    assert three.soup_score == one.soup_score and three.scores == one.scores
    kept = [t["kept"] for t in one.trajectory]
    assert False in kept[1:-1] and kept.count(True) > 1  # the table keeps some and rejects some mid-way
    a, b = load_soup(one.path), load_soup(three.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical soup
    assert (one.path / "model.safetensors").read_bytes() == (three.path / "model.safetensors").read_bytes()

    # every speculative candidate is the exact uniform mean of the pool it assumed
    for members, sd in Members.built.items():
        idx = [names.index(c) for c in members]
        ref = reference_mean([states[i] for i in idx], [1.0 / len(idx)] * len(idx))
        assert all(torch.equal(sd[k], ref[k]) for k in ref), members
    # and is in the history, named by its assumption
    history = [t.candidate for t in three.manifest.evaluation.history]
    assert len(history) == 6 + 7 and sum(" if " in h for h in history) == 4
