"""Racing (soup.soups.racing): keep decisions raced on shared examples, stopped once clear.

- decisions are exactly those of full evaluation when racing is off or every example is needed;
- a clearly worse candidate is stopped early (examples counted);
- the confidence sequence holds its error rate on synthetic streams (measured over many seeds);
- per-example scores are reused from the cache across runs (and across machines: PostgreSQL);
- options are refused before any work; every record says how many examples it used and why it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter

import pytest

from conftest import make_state, write_checkpoint
from soup.errors import RecipeError
from soup.pipeline import greedy_soup
from soup.soups.cache import ScoreCache
from soup.soups.evaluate import Candidate, Evaluator, mean_score
from soup.soups.confidence import BernsteinSequence, BettingSequence
from soup.soups.racing import Racing, example_order, parse_racing

LABELS = "abcdef"


class PerExample(Evaluator):
    """A synthetic task with per-example scores: example i is right (1.0) for a soup S when
    ``difficulty_i + noise(S, i) < ability(S)``; ``ability`` is the members' mean skill, a little more for
    more members. Difficulties are shared by every candidate, so paired differences are mostly 0."""

    name = "per-example-test"
    example_range = (0.0, 1.0)
    score_is_mean = True

    def __init__(self, skills, n=1000, noise=0.1, seed=0, **args):
        super().__init__(skills=skills, n=n, noise=noise, seed=seed, **args)
        self.skills, self.n, self.noise = dict(skills), n, noise
        rng = random.Random(seed)
        self.difficulty = [rng.random() for _ in range(n)]
        self.counts: Counter = Counter()  # members -> examples scored
        self.whole = 0  # calls of score()

    def ability(self, members):
        return sum(self.skills[m] for m in members) / len(members) + 0.03 * math.log(len(members))

    def examples(self):
        return self.n

    def score_examples(self, candidate, indices):
        members = "".join(sorted(candidate.weights))
        self.counts[members] += len(indices)
        a = self.ability(members)
        out = []
        for i in indices:
            h = hashlib.sha256(f"{members}:{i}".encode()).digest()
            u1, u2 = (int.from_bytes(h[:4], "big") + 1) / 2 ** 32, int.from_bytes(h[4:8], "big") / 2 ** 32
            e = math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)
            out.append(1.0 if self.difficulty[i] + self.noise * e < a else 0.0)
        return out

    def score(self, candidate):
        self.whole += 1
        return mean_score(self.score_examples(candidate, range(self.n)))


@pytest.fixture
def six(tmp_path):
    return [write_checkpoint(tmp_path / lab, make_state(i, big=200)) for i, lab in enumerate(LABELS)]


SKILLS = dict(zip(LABELS, [0.70, 0.66, 0.72, 0.20, 0.69, 0.62]))  # d is clearly bad


def kept(res):
    return [t["tried"] for t in res.trajectory if t["kept"]]


# ---- the confidence sequence --------------------------------------------------------------------


def _false_separations(make_population, streams, n, delta, batch=32, min_examples=64, scale=1.0,
                       sequence=BettingSequence):
    """Fraction of streams (a population of n paired differences, shuffled by the seed) where the CS
    (racing's, or ``sequence``), looked at after every batch, ever excludes the population's true mean
    before every value is used."""
    false = 0
    for seed in range(streams):
        rng = random.Random(seed)
        pop = make_population(rng, n)
        rng.shuffle(pop)
        truth = math.fsum(pop) / n
        cs, used = sequence(n, delta, scale), 0
        while used < n:
            step = max(min_examples, batch) if used == 0 else batch
            cs.update(pop[used:used + step], scale=None if scale else max(map(abs, pop[:used + step])))
            used = min(n, used + step)
            low, high = cs.interval
            if used < n and not low <= truth <= high:
                false += 1
                break
    return false / streams


def _accuracy_like(rng, n):  # d in {-1, 0, 1}: 8% of examples favour each side, mean exactly 0
    k = int(0.08 * n)
    return [1.0] * k + [-1.0] * k + [0.0] * (n - 2 * k)


def _skewed(rng, n):  # many small gains, a few large losses: mean exactly 0
    k = n // 10
    return [0.1] * (n - k) + [-0.9] * k


def _continuous(rng, n):  # losses-like differences, centred
    pop = [max(-0.9, min(0.9, rng.gauss(0, 0.3))) for _ in range(n)]  # centred, still inside [-1, 1]
    m = math.fsum(pop) / n
    return [x - m for x in pop]


@pytest.mark.parametrize("sequence", [BettingSequence, BernsteinSequence])
@pytest.mark.parametrize("population", [_accuracy_like, _skewed, _continuous])
def test_confidence_sequence_holds_its_error_rate(population, sequence):
    """2000 streams with zero-mean paired differences: false separations <= delta, measured (racing's
    betting CS and the empirical-Bernstein one it used before)."""
    delta = 0.05
    rate = _false_separations(population, 2000, 400, delta, sequence=sequence)
    assert rate <= delta, rate


@pytest.mark.parametrize("population", [_skewed, _continuous])
def test_plug_in_range_holds_its_error_rate_too(population):
    """Without a declared range (perplexity) the range seen so far scales the CS: measured, not assumed."""
    rate = _false_separations(population, 1000, 400, 0.05, scale=None)
    assert rate <= 0.05, rate


def test_confidence_sequence_error_rate_at_a_loose_delta():
    """At delta = 0.3 the bound still holds (measured), so the test above is not passing by slack alone."""
    rate = _false_separations(_continuous, 1000, 300, 0.3, batch=8, min_examples=8)
    assert rate <= 0.3, rate


def test_confidence_sequence_separates_a_clear_difference_and_tightens():
    pop = [-1.0] * 300 + [0.0] * 700  # mean -0.3
    random.Random(0).shuffle(pop)
    cs = BettingSequence(1000, 0.05, 1.0)
    cs.update(pop[:128])
    assert cs.interval[1] < 0  # separated from 0 after 128 of 1000
    width = cs.interval[1] - cs.interval[0]
    cs.update(pop[128:900])
    assert cs.interval[1] - cs.interval[0] < width / 3
    assert cs.interval[0] <= -0.3 <= cs.interval[1]


def test_example_order_is_a_fixed_seeded_permutation():
    assert sorted(example_order(100, 0)) == list(range(100))
    assert example_order(100, 0) == example_order(100, 0) != example_order(100, 1)


# ---- decisions ----------------------------------------------------------------------------------


def test_racing_off_and_every_example_needed_give_the_full_decisions(six):
    full_ev = PerExample(SKILLS)
    full = greedy_soup(six, full_ev, cache=None, racing=False)
    assert sum(full_ev.counts.values()) == (2 * len(LABELS) - 1) * 1000  # every candidate on every example
    everything = PerExample(SKILLS)
    raced = greedy_soup(six, everything, cache=None, racing={"min_examples": 1000})  # no early look
    assert kept(raced) == kept(full) and raced.weights == full.weights
    assert [t["score"] for t in raced.trajectory] == [t["score"] for t in full.trajectory]
    assert raced.soup_score == full.soup_score
    assert all(t.get("stopped") in (None, "exhausted") for t in raced.trajectory)


@pytest.mark.parametrize("tie, tolerance", [(">=", 0.0), (">", 0.0), (">", 0.02)])
def test_ties_and_tolerance_keep_their_meaning_when_a_race_is_undecided(six, tie, tolerance):
    """Candidates equal to the pool on every example: the race cannot separate, uses every example, and
    decides exactly as full evaluation does (``>=`` keeps a tie, ``>`` does not, a tolerance keeps)."""
    evs = [PerExample(dict.fromkeys(LABELS, 0.7), noise=0.0, n=300) for _ in range(2)]
    for ev in evs:
        ev.ability = lambda members: 0.7  # no noise, one ability: every soup scores the same on every example
    full = greedy_soup(six, evs[0], cache=None, racing=False, tie=tie, tolerance=tolerance)
    raced = greedy_soup(six, evs[1], cache=None, tie=tie, tolerance=tolerance)
    assert kept(raced) == kept(full) == (list(LABELS) if tie == ">=" or tolerance else ["a"])
    if not tolerance:  # with a tolerance, "0 > -0.02" may be separated early: the same decision
        assert all(t["stopped"] == "exhausted" for t in raced.trajectory[1:])


def test_a_clearly_worse_candidate_is_stopped_early(six):
    ev = PerExample(SKILLS, n=2000)
    res = greedy_soup(six, ev, cache=None)
    bad = next(t for t in res.trajectory if t["tried"] == "d")
    assert not bad["kept"] and bad["stopped"] == "separated"
    assert bad["examples"] <= 256 and bad["of"] == 2000
    cand = [k for k in ev.counts if "d" in k and len(k) > 1]
    assert len(cand) == 1 and ev.counts[cand[0]] == bad["examples"]  # only those examples were scored
    res_full = greedy_soup(six, PerExample(SKILLS, n=2000), cache=None, racing=False)
    assert kept(res) == kept(res_full)


def test_ingredients_raced_too_a_clearly_bad_one_stops_early(six):
    res = greedy_soup(six, PerExample(SKILLS, n=2000), cache=None, out=None)
    d = next(t for t in res.manifest.evaluation.history if t.candidate == "d")
    assert d.stopped == "separated" and d.examples <= 384 and d.of == 2000
    assert res.scores["d"] is None  # a partial score is never shown as an ingredient's score
    full = greedy_soup(six, PerExample(SKILLS, n=2000), cache=None, racing=False)
    assert res.trajectory[0]["tried"] == full.trajectory[0]["tried"] and kept(res) == kept(full)


def test_maximum_races_its_ranking(six):
    from soup.pipeline import maximum_soup

    ev = PerExample(SKILLS, n=2000)
    res = maximum_soup(six, ev, cache=None)
    full_ev = PerExample(SKILLS, n=2000)
    full = maximum_soup(six, full_ev, cache=None, racing=False)
    assert res.weights == full.weights and res.soup_score == full.soup_score  # the soup: scored whole
    assert sum(ev.counts.values()) < sum(full_ev.counts.values())
    top2 = maximum_soup(six, PerExample(SKILLS, n=2000), cache=None, p=2)
    assert top2.weights == maximum_soup(six, PerExample(SKILLS, n=2000), cache=None, p=2, racing=False).weights


def test_the_soup_score_is_always_on_every_example(six):
    ev = PerExample(SKILLS, n=2000)
    res = greedy_soup(six, ev, cache=None, racing={"min_examples": 64, "batch": 64})
    pool = "".join(sorted(k for k, w in res.weights.items() if w))
    expected = mean_score(PerExample(SKILLS, n=2000).score_examples(
        Candidate(pool, "k", state_dict_fn=None, write_fn=None, weights=dict.fromkeys(pool, 1.0)), range(2000)))
    assert res.soup_score.value == expected
    assert res.manifest.evaluation.soup_score == expected


# ---- cache --------------------------------------------------------------------------------------


def test_per_example_scores_are_reused_across_runs(six, tmp_path):
    db = tmp_path / "scores.sqlite"
    first = PerExample(SKILLS)
    a = greedy_soup(six, first, cache=str(db))
    assert sum(first.counts.values()) > 0
    second = PerExample(SKILLS)  # a new run, a new cache connection: nothing is evaluated again
    b = greedy_soup(six, second, cache=str(db))
    assert sum(second.counts.values()) == 0 and second.whole == 0
    assert kept(a) == kept(b) and a.soup_score == b.soup_score
    for x, y in zip(a.trajectory[1:], b.trajectory[1:]):  # decided on cached full scores, or raced again
        assert (y["stopped"], y["examples"]) == ("cached", 0) if x["stopped"] == "exhausted" else \
            (y["stopped"], y["examples"]) == (x["stopped"], x["examples"])
    assert ScoreCache(str(db)).count_examples() > 0


def test_per_example_scores_are_shared_through_postgresql(six, postgres):
    """Two machines sharing a database: the second evaluates nothing."""
    first, second = PerExample(SKILLS), PerExample(SKILLS)
    greedy_soup(six, first, cache=postgres)
    greedy_soup(six, second, cache=postgres)
    assert sum(first.counts.values()) > 0 and sum(second.counts.values()) == 0
    cache = ScoreCache(postgres)
    cache.put_examples("e" * 64, "c" * 64, {0: 1.0, 1: 0.0})
    cache.put_examples("e" * 64, "c" * 64, {1: 0.0, 2: 0.5})  # overlapping: stored once
    assert cache.get_examples("e" * 64, "c" * 64) == {0: 1.0, 1: 0.0, 2: 0.5}
    cache.close()


# ---- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, message", [
    ({"delta": 1.5}, "strategy.racing.delta"), ({"batch": 0}, "strategy.racing.batch"),
    ({"min_examples": -1}, "strategy.racing.min_examples"), ({"deltaa": 0.1}, "unknown key"),
    ("yes", "must be true, false or a mapping"), ({"batch": True}, "strategy.racing.batch"),
])
def test_bad_racing_options_are_refused_before_any_work(six, bad, message):
    ev = PerExample(SKILLS)
    with pytest.raises(RecipeError, match=message):
        greedy_soup(six, ev, cache=None, racing=bad)
    assert not ev.counts and ev.whole == 0


def test_racing_options_parse():
    assert parse_racing(True) == Racing() and parse_racing(False) is None
    assert parse_racing({"delta": 0.01, "batch": 32}) == Racing(0.01, 32, 128, 0)


def test_recipe_and_cli_racing(six, tmp_path):
    from typer.testing import CliRunner

    from soup.cli import app
    from soup.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"ingredients": [str(p) for p in six], "strategy": {
        "name": "greedy", "racing": {"delta": 0.1, "min_examples": 64}}, "evaluator": {
        "name": "python", "args": {"fn": f"{__file__}:synthetic", "examples": 500, "example_range": [0, 1]}},
        "output": str(tmp_path / "out"), "cache": None}))
    r = load_recipe(recipe)
    assert r.strategy_options["racing"] == {"delta": 0.1, "min_examples": 64}
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.read_text().replace('"delta": 0.1', '"delta": 0'))
    with pytest.raises(RecipeError, match="racing.delta"):
        load_recipe(bad)
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(recipe), "--no-racing", "-q"])
    assert res.exit_code == 0, res.output
    from soup.io.manifest import read

    m = read(tmp_path / "out")
    assert m.method.options["racing"] is False
    assert all(t.stopped in ("full", "cached") for t in m.evaluation.history)
    res = runner.invoke(app, ["run", str(recipe), "--racing", "-q", "--overwrite"])
    assert res.exit_code == 0, res.output
    m = read(tmp_path / "out")
    assert m.method.options["racing"]["delta"] == 0.1
    avg = tmp_path / "avg.yaml"
    avg.write_text(json.dumps({"ingredients": [str(p) for p in six], "strategy": "average",
                               "output": str(tmp_path / "avg")}))
    res = runner.invoke(app, ["run", str(avg), "--racing", "-q"])
    assert res.exit_code != 0 and "does not race" in res.output


def synthetic(candidate, indices):
    """For the python evaluator: example i is right when the soup's members' hash says so (a fixed task)."""
    members = "".join(sorted(candidate.weights))
    skill = {"a": 0.9, "b": 0.85, "c": 0.3, "d": 0.88, "e": 0.8, "f": 0.86}
    p = sum(skill[m] for m in members) / len(members)
    return [1.0 if int(hashlib.sha256(f"{i}".encode()).hexdigest()[:6], 16) / 16 ** 6 < p else 0.0
            for i in indices]


# ---- accounting ---------------------------------------------------------------------------------


def test_every_record_says_how_many_examples_and_why_it_stopped(six, tmp_path):
    from soup.progress import Reporter

    lines = []

    class Lines(Reporter):
        def step(self, message):
            lines.append(message)

    ev = PerExample(SKILLS, n=2000)
    res = greedy_soup(six, ev, cache=None, out=tmp_path / "soup", progress=Lines())
    history = res.manifest.evaluation.history
    assert all(t.of == 2000 and t.examples is not None and t.stopped for t in history)
    assert "separated" in {t.stopped for t in history} <= {"full", "separated", "exhausted", "cached"}
    assert all(t.examples == 2000 for t in history if t.stopped in ("full", "exhausted"))
    assert all(t.partial == (t.stopped == "separated") for t in history)
    assert all(t.examples < 2000 for t in history if t.stopped == "separated")
    summary = [line for line in lines if line.startswith("examples evaluated:")]
    assert len(summary) == 1
    used = sum(ev.counts.values())
    assert f"{used:,} of the" in summary[0]
    written = json.loads((tmp_path / "soup" / "soup.json").read_text())
    assert "stopped" in written["evaluation"]["history"][-1]
    # the run's accounting: in soup.json, the report and the card, the same figures the run printed
    assert written["evaluation"]["examples"] == {"evaluated": used, "full": res.manifest.evaluation.examples["full"]}
    full = written["evaluation"]["examples"]["full"]
    assert f"{used:,} of the {full:,}" in summary[0]
    from soup.finish.report import format_report
    from soup.io.manifest import read

    early = sum(1 for t in history if t.partial)
    assert f"examples evaluated: {used:,} of the {full:,}" in format_report(read(tmp_path / "soup"))
    card = (tmp_path / "soup" / "README.md").read_text()
    assert f"scored {used:,} examples of the {full:,}" in card and f"{early} evaluation(s) stopped early" in card
    res_off = greedy_soup(six, PerExample(SKILLS, n=2000), cache=None, out=tmp_path / "off", racing=False)
    assert res_off.manifest.evaluation.examples["evaluated"] == res_off.manifest.evaluation.examples["full"]
    # the soup's own record is on every example
    assert history[-1].stopped in ("full", "exhausted", "cached") or res.soup_score is not None


def test_python_evaluator_per_example():
    from soup.errors import EvaluatorError
    from soup.evaluators.python import PythonEvaluator
    from soup.soups.evaluate import run_evaluator, run_examples

    ev = PythonEvaluator(fn=synthetic, examples=50, example_range=[0, 1])
    cand = Candidate("ab", "k", state_dict_fn=None, write_fn=None, weights={"a": 0.5, "b": 0.5})
    assert ev.examples() == 50 and ev.score_is_mean and ev.example_range == (0.0, 1.0)
    values = run_examples(ev, cand, [3, 1, 2])
    assert values == synthetic(cand, [3, 1, 2])
    assert run_evaluator(ev, cand).value == mean_score(synthetic(cand, range(50)))
    assert PythonEvaluator(fn=synthetic).examples() is None
    with pytest.raises(EvaluatorError, match="no 'indices' parameter"):
        PythonEvaluator(fn=lambda c: 1.0, examples=3)
    with pytest.raises(EvaluatorError, match="example_range"):
        PythonEvaluator(fn=synthetic, examples=3, example_range=[1, 0])


def test_digits_evaluator_score_is_the_mean_of_its_examples():
    pytest.importorskip("sklearn")
    import torch

    from soup.demo.evaluator import DigitsAccuracy, accuracy
    from soup.demo.model import DigitsMLP

    torch.manual_seed(0)
    sd = DigitsMLP().state_dict()
    ev = DigitsAccuracy(split="val", seed=0)
    cand = Candidate.from_state_dict("random", sd)
    per = ev.score_examples(cand, range(ev.examples()))
    assert set(per) <= {0.0, 1.0} and ev.score(cand) == mean_score(per) == accuracy(sd, "val", 0)
    assert ev.score_examples(cand, [5, 0]) == [per[5], per[0]]


def test_perplexity_per_example_losses(tmp_path):
    pytest.importorskip("transformers")
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from soup.evaluators.perplexity import PerplexityEvaluator
    from tiny_lm import build_tiny_lm

    folder = build_tiny_lm(tmp_path / "lm", seed=0)
    docs = ["the cat sat on the mat .", "hello world", "the dog ran to the park and the sun is big ."]
    data = tmp_path / "docs.txt"
    data.write_text("\n".join(docs) + "\n")
    ev = PerplexityEvaluator(data=data, model=folder, batch_size=2)
    cand = Candidate.from_state_dict("lm", load_file(str(folder / "model.safetensors")), key="lm")
    assert ev.examples() == 3  # the tokenizer's folder is known (model=): no candidate needed, no model built
    assert ev._model is None and PerplexityEvaluator(data=data).examples() is None  # else: after a first score
    ev.score(cand)
    assert ev.examples() == 3 and ev.direction == "minimize" and not ev.score_is_mean
    got = ev.score_examples(cand, [2, 0, 1])
    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        want = [model(input_ids=torch.tensor([tok(d)["input_ids"]]),
                      labels=torch.tensor([tok(d)["input_ids"]])).loss.item() for d in docs]
    assert got == pytest.approx([want[2], want[0], want[1]], abs=1e-5)
    ev.close()


# ---- search: trials raced against the best, pruned once surely worse ---------------------------------


class Weighted(PerExample):
    """Like ``PerExample``, with the soup's ability the *weighted* mean of its members' skills (search
    trials differ by weights, not only by members) and each example's noise shared by every soup."""

    name = "weighted-per-example-test"

    def score_examples(self, candidate, indices):
        w = dict(candidate.weights)
        total = sum(w.values())
        a = sum(self.skills[m] * x for m, x in w.items()) / total
        self.counts["".join(sorted(w))] += len(indices)
        return [1.0 if self.difficulty[i] < a else 0.0 for i in indices]


def test_search_prunes_trials_surely_worse_than_the_best(six, tmp_path):
    from soup.pipeline import search_soup

    skills = dict(zip(LABELS, [0.75, 0.70, 0.78, 0.05, 0.72, 0.40]))
    raced_ev, full_ev = Weighted(skills, n=3000), Weighted(skills, n=3000)
    opts = dict(n_trials=24, sampler="random", cache=None)
    raced = search_soup(six, raced_ev, output=tmp_path / "raced", **opts)
    full = search_soup(six, full_ev, output=tmp_path / "full", racing=False, **opts)
    # the same trials were asked (a random sampler ignores results); the best completed in both
    assert raced.weights == full.weights and raced.soup_score == full.soup_score
    history = raced.manifest.evaluation.history
    pruned = [t for t in history if t.stopped == "separated"]
    assert pruned and all(t.examples < 3000 and t.of == 3000 and t.partial for t in pruned)
    assert all(t.stopped in ("full", "cached") for t in full.manifest.evaluation.history)
    # a pruned trial really is worse than the best: its full score, computed independently
    best = full.soup_score.value
    by_name = {t.candidate: t for t in full.manifest.evaluation.history}
    trials = [t for t in pruned if t.candidate.startswith("search trial")]
    assert trials and all(by_name[t.candidate].score < best for t in trials)
    # the ingredients were raced for the best one alone (the first trial): the others stopped early
    assert {t.candidate for t in pruned} - {t.candidate for t in trials} and all(
        by_name[t.candidate].score <= best for t in pruned)
    assert sum(raced_ev.counts.values()) < 0.6 * sum(full_ev.counts.values())
    from soup.io.manifest import read

    assert read(tmp_path / "raced").method.options["racing"] == Racing().to_dict()
    assert read(tmp_path / "full").method.options["racing"] is False


def test_perplexity_races_and_builds_its_full_score_from_the_examples(tmp_path):
    """With ``model=`` the examples are known up front, so greedy races; a full score comes from the
    per-sequence losses (``aggregate``: token-weighted), never from a second, whole pass."""
    pytest.importorskip("transformers")
    from soup.evaluators.perplexity import PerplexityEvaluator
    from tiny_lm import build_tiny_lm

    lms = [build_tiny_lm(tmp_path / f"lm{i}", seed=i) for i in range(3)]
    data = tmp_path / "docs.txt"
    data.write_text("\n".join(["the cat sat on the mat .", "hello world", "the dog ran to the park ."] * 20) + "\n")

    class Counted(PerplexityEvaluator):
        whole = 0

        def score(self, candidate):
            Counted.whole += 1
            return super().score(candidate)

    raced = greedy_soup(lms, Counted(data=data, model=lms[0]), cache=None, racing={"min_examples": 16, "batch": 8})
    assert Counted.whole == 0  # every full score was aggregated from per-example losses
    full = greedy_soup(lms, PerplexityEvaluator(data=data, model=lms[0]), cache=None, racing=False)
    assert kept(raced) == kept(full)
    assert raced.soup_score.value == pytest.approx(full.soup_score.value, rel=1e-6)
    ev = PerplexityEvaluator(data=data, model=lms[0])
    from safetensors.torch import load_file

    cand = Candidate.from_state_dict("lm1", load_file(str(lms[1] / "model.safetensors")), key="lm1")
    per = ev.score_examples(cand, range(ev.examples()))
    tokens = [len(d.split()) + 1 for d in data.read_text().split("\n") if d]  # [BOS] + words: all but one predicted
    want = math.fsum(v * (t - 1) for v, t in zip(per, tokens)) / sum(t - 1 for t in tokens)
    got = ev.score(cand)
    assert got["loss"] == pytest.approx(want, rel=1e-12) and got["tokens"] == sum(t - 1 for t in tokens)


def test_races_spread_over_two_devices_decide_as_on_one(six):
    """With two devices a race's pool side, and half of a ranking's candidates, run on the second one."""
    class Tracked(PerExample):
        instances: list = []

        def __init__(self, **args):
            super().__init__(**args)
            Tracked.instances.append(self)

    args = {"skills": SKILLS, "n": 2000}
    two = greedy_soup(six, Tracked, evaluator_args=args, devices=["cpu", "cpu"], cache=None)
    assert len(Tracked.instances) == 2 and all(sum(ev.counts.values()) > 0 for ev in Tracked.instances)
    single = PerExample(SKILLS, n=2000)
    one = greedy_soup(six, single, cache=None)
    assert kept(two) == kept(one) and two.soup_score == one.soup_score
    assert sum(sum(ev.counts.values()) for ev in Tracked.instances) == sum(single.counts.values())
    assert [(t["tried"], t.get("stopped"), t.get("examples")) for t in two.trajectory] == \
        [(t["tried"], t.get("stopped"), t.get("examples")) for t in one.trajectory]


def test_the_plot_shows_each_evaluation_stopped_early_hollow_with_its_examples(six, tmp_path):
    pytest.importorskip("matplotlib")
    from soup.finish.report import make_figure

    res = greedy_soup(six, PerExample(SKILLS, n=2000), cache=None, out=tmp_path / "soup")
    history = res.manifest.evaluation.history
    partial = [t for t in history if t.partial]
    assert partial  # something stopped early
    ax = make_figure(res.manifest).axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert len(labels) == len(history)  # every evaluation, in order
    assert [lab for lab in labels if lab.endswith("/2000")] == \
        [f"{lab.rsplit(' ', 1)[0]} {t.examples}/2000" for lab, t in zip(labels, history) if t.partial]
    hollow = [line for line in ax.lines if line.get_markerfacecolor() == "none" and len(line.get_xdata()) == 1]
    xs = sorted(float(line.get_xdata()[0]) for line in hollow)
    assert xs == [float(i) for i, t in enumerate(history) if t.partial and ax.get_ylim()[0] <= t.score <= ax.get_ylim()[1]]


def test_a_per_example_score_outside_the_evaluators_range_is_one_error_naming_the_example(six, tmp_path):
    from soup.errors import EvaluatorError

    class OutOfRange(PerExample):
        def score_examples(self, candidate, indices):
            out = super().score_examples(candidate, indices)
            return [1.5 if i == indices[3] else v for i, v in zip(indices, out)]

    with pytest.raises(EvaluatorError, match=r"returned 1\.5 for example \d+ \(\w\), outside its example_range "
                                             r"\(0\.0, 1\.0\)"):
        greedy_soup(six, OutOfRange(SKILLS, n=400), cache=None, out=tmp_path / "soup")
    assert not (tmp_path / "soup").exists()
