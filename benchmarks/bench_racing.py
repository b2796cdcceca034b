"""Greedy soup with and without racing (issue 21): examples evaluated, decisions kept, soup scores.

Two tasks with real per-example variance, each over many seeds; every seed runs greedy twice without a
score cache, ``racing=False`` (every candidate scored on every example) and racing on (``--delta``,
``--batch``, ``--min-examples``; the examples' order seeded by the seed):

- **digits**: the digits demo (``soup.demo``): six fine-tunes of one MLP from a seed (one on shuffled
  labels), chosen on the 350-example validation split by ``DigitsAccuracy`` (1.0 / 0.0 per example).
- **synthetic**: eight ingredients and ``--examples`` examples of a benchmark with shared difficulty:
  example i is right for soup S when ``difficulty_i + noise(S, i) < ability(S)``; ability is the
  members' weighted mean skill (six good ingredients, two bad ones; skills drawn from the seed) plus a
  small bonus for averaging more (``0.04 * log k``, k the effective number of members: |S| for a
  uniform soup); noise is the weighted mean of the members' own errors (``0.1 * N(0, 1)`` per
  ingredient and example: a soup errs where its members err) plus ``0.02 * N(0, 1)`` of its own.
- **search** (``--search-seeds``): weight search on the digits and the synthetic task, ``--trials`` trials of the
  ``random`` sampler (it asks the same trials whatever the results, so both runs try the same soups and
  "same best trial" is a fair check), each trial raced against the best so far and pruned once surely
  worse. Two ingredients disagree on about 11% of the examples; a greedy
  candidate and its pool, sharing most members, on a few percent (printed).

On the synthetic task it also prints how often ranking the ingredients on a fixed first part of the
examples (not exact; an analysis) keeps the same ingredients: why greedy's ranking is raced exactly.

Printed per task: examples evaluated with racing / without (every evaluation: ingredients, candidates
and the soup; and the greedy candidates alone), the fraction of seeds where racing kept the same
ingredients as full evaluation, and the final soup's full score in both cases (mean over seeds; the
soup is always scored on every example).

    python benchmarks/bench_racing.py                      # 20 digits seeds, 200 synthetic seeds
    python benchmarks/bench_racing.py --digits-seeds 5 --synthetic-seeds 50
    python benchmarks/bench_racing.py --digits-seeds 0 --bad 4   # most greedy decisions clear
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from soup.pipeline import greedy_soup
from soup.soups.evaluate import Evaluator, mean_score


class Counting:
    """Counts the examples an evaluator scores, split by kind of candidate."""

    def __init__(self) -> None:
        self.ingredients = 0
        self.candidates = 0

    def add(self, candidate, k: int) -> None:
        if len(candidate.weights) == 1 and not candidate.name.startswith("greedy"):
            self.ingredients += k
        else:
            self.candidates += k

    @property
    def total(self) -> int:
        return self.ingredients + self.candidates


class Synthetic(Evaluator):
    """The synthetic task (module docstring): per-example 1.0 / 0.0, the score their mean."""

    name = "bench-synthetic"
    example_range = (0.0, 1.0)
    score_is_mean = True

    def __init__(self, skills: dict[str, float], n: int, seed: int, counter: Counting, **args) -> None:
        super().__init__(n=n, seed=seed, **args)
        self.skills, self.n, self.counter = skills, n, counter
        rng = np.random.default_rng(seed)
        self.difficulty = rng.random(n)
        self.own = {label: 0.1 * rng.standard_normal(n) for label in sorted(skills)}  # each ingredient's errors
        self._noise: dict[str, np.ndarray] = {}

    def examples(self) -> int:
        return self.n

    def score_examples(self, candidate, indices):
        total = sum(candidate.weights.values())
        w = {m: x / total for m, x in sorted(candidate.weights.items())}  # a greedy soup: uniform
        members = "+".join(f"{m}:{x:.6f}" for m, x in w.items())
        noise = self._noise.get(members)
        if noise is None:
            h = int(hashlib.sha256(f"{self.args['seed']}:{members}".encode()).hexdigest()[:15], 16)
            shared = sum(x * self.own[m] for m, x in w.items())
            noise = self._noise[members] = shared + 0.02 * np.random.default_rng(h).standard_normal(self.n)
        k = 1.0 / sum(x * x for x in w.values())  # the effective number of members (k for a uniform soup)
        ability = sum(x * self.skills[m] for m, x in w.items()) + 0.04 * math.log(k)
        idx = np.asarray(list(indices), dtype=np.int64)
        self.counter.add(candidate, len(idx))
        return (self.difficulty[idx] + noise[idx] < ability).astype(np.float64).tolist()

    def disagreement(self, a: list[str], b: list[str]) -> float:
        """The fraction of examples on which soups ``a`` and ``b`` (member labels) differ."""
        right = []
        for members in (a, b):
            weights = {m: 1.0 / len(members) for m in members}
            right.append(self.score_examples(_Named("probe", weights), range(self.n)))
        return sum(x != y for x, y in zip(*right)) / self.n

    def score(self, candidate):
        return mean_score(self.score_examples(candidate, range(self.n)))


class _Named:
    """A stand-in candidate: a name and weights (all the synthetic evaluator reads)."""

    def __init__(self, name: str, weights: dict[str, float]) -> None:
        self.name, self.weights = name, weights


def synthetic_ingredients(root: Path, n: int = 8) -> list[Path]:
    """``n`` tiny real checkpoints (the synthetic evaluator reads only the candidate's members)."""
    paths = []
    for i in range(n):
        folder = root / f"ft{i}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.full((4,), float(i))}, str(folder / "model.safetensors"),
                  metadata={"format": "pt", "ingredient": str(i)})  # distinct headers: distinct fingerprints
        paths.append(folder)
    return paths


def synthetic_skills(seed: int, labels: list[str], bad: int = 2) -> dict[str, float]:
    rng = random.Random(seed)
    skills = [rng.uniform(0.60, 0.72) for _ in range(len(labels) - bad)] + [rng.uniform(0.25, 0.45) for _ in range(bad)]
    rng.shuffle(skills)
    return dict(zip(labels, skills))


def run_pair(paths, make_evaluator, racing, race_seed, *, soup=greedy_soup, **options):
    """A soup (greedy unless ``soup``) without and with racing (its examples' order from ``race_seed``):
    (counter, result) for each."""
    out = []
    for race in (False, dict(racing, seed=race_seed)):
        counter = Counting()
        res = soup(paths, make_evaluator(counter), cache=None, racing=race, **options)
        out.append((counter, res))
    return out


def summarise(name: str, runs: list, examples_per_eval: int, n_ingredients: int) -> list[str]:
    full_total = sum(f.total for (f, _), _ in runs)
    race_total = sum(r.total for _, (r, _) in runs)
    full_cand = sum(f.candidates for (f, _), _ in runs)
    race_cand = sum(r.candidates for _, (r, _) in runs)
    same = sum(_kept(fr) == _kept(rr) for (_, fr), (_, rr) in runs)
    full_scores = [fr.soup_score.value for (_, fr), _ in runs]
    race_scores = [rr.soup_score.value for _, (_, rr) in runs]
    stops = [t.get("stopped") for _, (_, rr) in runs for t in rr.trajectory[1:]]
    early = sum(s == "separated" for s in stops)
    used = sorted(t["examples"] for _, (_, rr) in runs for t in rr.trajectory[1:] if t.get("examples"))
    return [
        f"{name}: {len(runs)} seeds, {n_ingredients} ingredients, {examples_per_eval} examples per evaluation",
        f"  ingredients: racing / full: {sum(r.ingredients for _, (r, _) in runs):,} / "
        f"{sum(f.ingredients for (f, _), _ in runs):,}",
        f"  examples evaluated, racing / full: {race_total:,} / {full_total:,} = {race_total / full_total:.3f}"
        f"   (target <= 0.4)",
        f"  greedy candidates only (ingredients apart): {race_cand:,} / {full_cand:,} = "
        f"{race_cand / full_cand:.3f}",
        f"  keep decisions stopped early: {early} of {len(stops)}; examples per decision: median "
        f"{used[len(used) // 2] if used else 0}, quartiles {used[len(used) // 4] if used else 0}-"
        f"{used[3 * len(used) // 4] if used else 0}",
        f"  same ingredients kept as full evaluation: {same}/{len(runs)} = {same / len(runs):.3f}   (target >= 0.95)",
        f"  final soup's full score, mean over seeds: full {statistics.fmean(full_scores):.4f}, "
        f"racing {statistics.fmean(race_scores):.4f}; seeds where they differ: "
        f"{sum(a != b for a, b in zip(full_scores, race_scores))}",
    ]


def run_search_pair(paths, make_evaluator, racing, seed, trials):
    """Search without and with racing (pruning): (counter, result) for each."""
    from soup.pipeline import search_soup

    return run_pair(paths, make_evaluator, racing, seed, soup=search_soup, n_trials=trials, sampler="random",
                    seed=seed)


def summarise_search(runs: list, examples_per_eval: int, n_ingredients: int, trials: int,
                     name: str = "search on the synthetic task") -> list[str]:
    full_total = sum(f.total for (f, _), _ in runs)
    race_total = sum(r.total for _, (r, _) in runs)
    same = sum(fr.weights == rr.weights for (_, fr), (_, rr) in runs)
    pruned = [t for _, (_, rr) in runs for t in rr.manifest.evaluation.history if t.stopped == "separated"]
    full_scores = [fr.soup_score.value for (_, fr), _ in runs]
    race_scores = [rr.soup_score.value for _, (_, rr) in runs]
    used = sorted(t.examples for t in pruned)
    return [
        f"{name}: {len(runs)} seeds, {n_ingredients} ingredients, {trials} random trials "
        f"+ seeds, {examples_per_eval} examples per evaluation",
        f"  examples evaluated, racing / full: {race_total:,} / {full_total:,} = {race_total / full_total:.3f}"
        f"   (target <= 0.4)",
        f"  evaluations stopped early (ingredients raced for the best, trials pruned): {len(pruned)}; examples each: median {used[len(used) // 2] if used else 0}",
        f"  same best trial as full evaluation: {same}/{len(runs)} = {same / len(runs):.3f}   (target >= 0.95)",
        f"  final soup's full score, mean over seeds: full {statistics.fmean(full_scores):.4f}, "
        f"racing {statistics.fmean(race_scores):.4f}; seeds where they differ: "
        f"{sum(a != b for a, b in zip(full_scores, race_scores))}",
    ]


def pilot_orders(labels: list[str], seeds: int, n: int, bad: int, pilots: tuple[int, ...]) -> list[str]:
    """Why greedy's ranking is raced exactly: an analysis (not a soup option) of ranking the ingredients on
    the first ``m`` examples of the racing order only, then deciding every step on full scores. Greedy's
    definition (best first; keep a candidate at least as good as the pool) written out on the synthetic
    evaluator, compared with the same on full scores."""
    from soup.soups.racing import example_order

    def greedy(ev: Synthetic, order: list[int]) -> list[str]:
        def score(members: list[int]) -> float:
            return mean_score(ev.score_examples(_Named("probe", {labels[i]: 1.0 for i in members}), range(n)))

        pool, best = [order[0]], score(order[:1])
        for i in order[1:]:
            s = score(pool + [i])
            if s >= best:
                pool, best = pool + [i], s
        return sorted(labels[i] for i in pool)

    same = dict.fromkeys(pilots, 0)
    for seed in range(seeds):
        ev = Synthetic(synthetic_skills(seed, labels, bad), n, seed, Counting())
        alone = [np.asarray(ev.score_examples(_Named("probe", {lab: 1.0}), range(n))) for lab in labels]
        full = greedy(ev, sorted(range(len(labels)), key=lambda i: (-alone[i].mean(), i)))
        first = np.asarray(example_order(n, seed))
        for m in pilots:
            order = sorted(range(len(labels)), key=lambda i: (-alone[i][first[:m]].mean(), i))
            same[m] += greedy(ev, order) == full
    return [f"  ranking on the first m examples only (an analysis, not exact): m={m} ({m / n:.0%} of a ranking's "
            f"examples): same ingredients as full evaluation on {same[m]}/{seeds} = {same[m] / seeds:.3f}"
            for m in pilots]


def _kept(res) -> list[str]:
    return sorted(k for k, w in res.weights.items() if w)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--digits-seeds", type=int, default=20)
    ap.add_argument("--synthetic-seeds", type=int, default=200)
    ap.add_argument("--examples", type=int, default=5000, help="examples of the synthetic task")
    ap.add_argument("--bad", type=int, default=2, help="bad ingredients (of 8) in the synthetic task")
    ap.add_argument("--search-seeds", type=int, default=20, help="seeds of the search runs (synthetic task; "
                    "the digits' first ones)")
    ap.add_argument("--trials", type=int, default=30, help="trials per search run")
    ap.add_argument("--delta", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--min-examples", type=int, default=128)
    args = ap.parse_args(argv)
    racing = {"delta": args.delta, "batch": args.batch, "min_examples": args.min_examples}
    print(f"racing: {racing}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="soup-bench-racing-") as tmp:
        root = Path(tmp)
        if args.digits_seeds:
            from soup.demo.evaluator import DigitsAccuracy
            from soup.demo.train import build_ingredients

            class CountingDigits(DigitsAccuracy):
                def __init__(self, counter: Counting, **kw):
                    super().__init__(**kw)
                    self.counter = counter

                def score_examples(self, candidate, indices):
                    self.counter.add(candidate, len(indices))
                    return super().score_examples(candidate, indices)

            runs, searches = [], []
            for seed in range(args.digits_seeds):
                paths = build_ingredients(root / f"digits-{seed}", seed=seed)
                make = lambda c, s=seed: CountingDigits(c, split="val", seed=s)  # noqa: E731
                runs.append(run_pair(paths, make, racing, seed))
                if seed < args.search_seeds:
                    searches.append(run_search_pair(paths, make, racing, seed, args.trials))
            n_val = CountingDigits(Counting(), split="val", seed=0).examples()
            print("\n".join(summarise("digits (soup.demo)", runs, n_val, len(paths))), flush=True)
            if searches:
                print("\n".join(summarise_search(searches, n_val, len(paths), args.trials, "search on the digits")),
                      flush=True)
        paths = synthetic_ingredients(root / "synthetic")
        labels = [p.name for p in paths]

        def synthetic_runs(seeds: int, run) -> list:
            """``run(paths, make_evaluator, racing, seed)`` for each seed of the synthetic task."""
            return [run(paths, lambda c, s=seed, k=synthetic_skills(seed, labels, args.bad): Synthetic(k, args.examples, s, c),
                        racing, seed) for seed in range(seeds)]

        if args.synthetic_seeds:
            runs = synthetic_runs(args.synthetic_seeds, run_pair)
            probe = Synthetic(synthetic_skills(0, labels, args.bad), args.examples, 0, Counting())
            pair = probe.disagreement(labels[:1], labels[1:2])
            step = probe.disagreement(labels[:3], labels[:4])
            print("\n".join(summarise("synthetic per-example task", runs, args.examples, len(paths))), flush=True)
            print(f"  disagreement (seed 0): two ingredients {pair:.3f}; a 3-soup and it + one {step:.3f}")
            print("\n".join(pilot_orders(labels, args.synthetic_seeds, args.examples, args.bad, (512, 1024, 2048))),
                  flush=True)
        if args.search_seeds:
            runs = synthetic_runs(args.search_seeds, lambda *a: run_search_pair(*a, args.trials))
            print("\n".join(summarise_search(runs, args.examples, len(paths), args.trials)), flush=True)
    print(f"wall time: {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
