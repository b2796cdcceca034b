"""Maximum, average and greedy soups: exact selection logic, exact merged weights, running sums."""

from __future__ import annotations

import pytest
import torch

from soup.pipeline import average_soup, greedy_soup, maximum_soup
from soup.errors import EvaluatorError, RecipeError
from soup.soups.evaluate import Evaluator

from conftest import load_soup, make_state, reference_mean, write_checkpoint


@pytest.fixture
def five(tmp_path):
    paths, states = [], []
    for i, name in enumerate(["a", "b", "c", "d", "e"]):
        st = make_state(10 + i)
        paths.append(write_checkpoint(tmp_path / name, st))
        states.append(st)
    return paths, states


class SubsetScores(Evaluator):
    """Scores looked up by the set of ingredients in the candidate (the soup's members)."""

    name = "subset-scores"

    def __init__(self, table, **args):
        super().__init__(**args)
        self.table = table
        self.calls = []

    def score(self, candidate):
        members = "".join(sorted(candidate.weights))
        self.calls.append(members)
        return self.table[members]


def _exact(states, members):
    w = [1.0 / len(members) if i in members else 0.0 for i in range(len(states))]
    return reference_mean([states[i] for i in members], [1.0 / len(members)] * len(members)), w


def test_greedy_follows_algorithm_1(five, tmp_path):
    paths, states = five
    # singles: c best, then a, e, b, d
    table = {"a": 0.8, "b": 0.6, "c": 0.9, "d": 0.5, "e": 0.7,
             "ac": 0.91,  # kept
             "ace": 0.91,  # tie: kept with ">=" (POINTS)
             "abce": 0.85,  # worse: not kept
             "acde": 0.95}  # better: kept
    ev = SubsetScores(table)
    res = greedy_soup(paths, ev, out=tmp_path / "out", cache=None)
    assert ev.calls[:5] == ["a", "b", "c", "d", "e"]
    assert ev.calls[5:] == ["ac", "ace", "abce", "acde"]
    assert [(t["tried"], t["kept"]) for t in res.trajectory] == [
        ("c", True), ("a", True), ("e", True), ("b", False), ("d", True)]
    assert res.soup_score.value == 0.95
    assert res.weights == {"a": 0.25, "b": 0.0, "c": 0.25, "d": 0.25, "e": 0.25}
    got = load_soup(res.path)
    ref = reference_mean([states[i] for i in (0, 2, 3, 4)], [0.25] * 4)
    assert all(torch.equal(got[k], ref[k]) for k in ref)  # the final soup: exact uniform mean of the pool
    m = res.manifest
    assert [i.kept for i in m.ingredients] == [True, False, True, True, True]
    assert m.evaluation.trajectory[1].pool == ["c", "a"]


def test_greedy_strict_tie_and_tolerance(five):
    paths, _ = five
    table = {"a": 0.8, "b": 0.6, "c": 0.9, "d": 0.5, "e": 0.7, "ac": 0.9, "ce": 0.95, "bce": 0.5, "cde": 0.5}
    res = greedy_soup(paths, SubsetScores(table), tie=">", cache=None)
    assert [t["kept"] for t in res.trajectory] == [True, False, True, False, False]  # ac tie rejected
    assert res.weights["e"] == 0.5 and res.weights["c"] == 0.5
    res = greedy_soup(paths, SubsetScores({**table, "ace": 0.94, "abce": 0.5, "acde": 0.5}), tie=">",
                      tolerance=0.011, cache=None)
    assert [t["tried"] for t in res.trajectory if t["kept"]] == ["c", "a", "e"]  # 0.9 > 0.9-0.011


def test_greedy_minimize_direction(five):
    paths, _ = five
    table = {"a": 2.0, "b": 1.0, "c": 3.0, "d": 4.0, "e": 5.0, "ab": 0.9, "abc": 1.5, "abd": 0.8, "abde": 0.7}
    res = greedy_soup(paths, SubsetScores(table, direction="minimize"), cache=None)
    assert [t["tried"] for t in res.trajectory] == ["b", "a", "c", "d", "e"]
    assert [t["kept"] for t in res.trajectory] == [True, True, False, True, True]
    assert res.soup_score.value == 0.7


def test_maximum_soup_p1_copies_best_and_top_p(five, tmp_path):
    paths, states = five
    table = {"a": 0.8, "b": 0.6, "c": 0.9, "d": 0.5, "e": 0.7, "ac": 0.85}
    res = maximum_soup(paths, SubsetScores(table), out=tmp_path / "m1", cache=None)
    assert res.weights["c"] == 1.0 and res.soup_score.value == 0.9
    assert (res.path / "model.safetensors").read_bytes() != b""
    got = load_soup(res.path)
    assert all(torch.equal(got[k], states[2][k]) for k in states[2])  # the best ingredient, bytes copied
    res = maximum_soup(paths, SubsetScores(table), p=2, out=tmp_path / "m2", cache=None)
    assert res.weights == {"a": 0.5, "b": 0.0, "c": 0.5, "d": 0.0, "e": 0.0} and res.soup_score.value == 0.85
    with pytest.raises(RecipeError, match="strategy.p"):
        maximum_soup(paths, SubsetScores(table), p=9, cache=None)


def test_average_soup_without_and_with_evaluator(five, tmp_path):
    paths, states = five
    res = average_soup(paths, out=tmp_path / "avg", cache=None)
    assert res.soup_score is None and res.manifest.evaluation is None
    ref = reference_mean(states, [0.2] * 5)
    got = load_soup(res.path)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    res = average_soup(paths, SubsetScores({"abc": 0.77}), weights=[1, 1, 2, 0, 0], cache=None)
    assert res.soup_score.value == 0.77  # the soup of a, b, c is scored for the report
    assert res.weights == {"a": 0.25, "b": 0.25, "c": 0.5, "d": 0.0, "e": 0.0}


def test_test_evaluator_is_reported_not_used(five):
    paths, _ = five
    table = {"a": 0.8, "b": 0.6, "c": 0.9, "d": 0.5, "e": 0.7}
    test_table = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4, "e": 0.5}
    res = maximum_soup(paths, SubsetScores(table), test_evaluator=SubsetScores(test_table), cache=None)
    assert res.weights["c"] == 1.0  # selection ignores the test scores
    assert res.test_score.value == 0.3 and res.test_scores == test_table


def test_evaluator_failure_names_candidate_and_keeps_scores(five, tmp_path):
    paths, _ = five
    table = {"a": 0.8, "b": 0.6, "c": 0.9, "d": 0.5, "e": 0.7}  # no soup scores: the first candidate fails
    cache = str(tmp_path / "cache.sqlite")
    with pytest.raises(EvaluatorError, match=r"greedy candidate 2/5 \(\+a\)"):
        greedy_soup(paths, SubsetScores(table), cache=cache)
    ev = SubsetScores({**table, "ac": 0.1, "ce": 0.1, "bc": 0.1, "cd": 0.1})
    res = greedy_soup(paths, ev, cache=cache)
    assert ev.calls[0] == "ac"  # the five ingredient scores came from the cache
    assert res.weights["c"] == 1.0


def test_greedy_candidates_are_the_exact_mean_of_every_member(five, monkeypatch):
    """One construction: a candidate reads every member and is the soup's definition, bit for bit
    (greedy's running sums, which read only the new ingredient but gave other bytes, are retired)."""
    paths, states = five
    from soup.engine import stream

    reads = []
    orig = stream.TensorReader.view

    def spy(self, name):
        reads.append(self.checkpoint.label)
        return orig(self, name)

    monkeypatch.setattr(stream.TensorReader, "view", spy)
    table = {"a": 0.8, "b": 0.6, "c": 0.9, "d": 0.5, "e": 0.7, "ac": 0.91, "ace": 0.92, "abce": 0.93,
             "abcde": 0.94}
    built = {}

    class Capture(SubsetScores):
        def score(self, candidate):
            reads.clear()
            sd = candidate.state_dict("cpu")
            built["".join(sorted(candidate.weights))] = (sd, set(reads))
            return super().score(candidate)

    greedy_soup(paths, Capture(table), cache=None)
    sd, read = built["abcde"]  # pool abce (4 members) + d: every member is read
    assert read == {"a", "b", "c", "d", "e"}
    ref = reference_mean(states, [0.2] * 5)
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k


def test_greedy_sums_on_disk_same_choice(five):
    paths, _ = five
    table = {"a": 0.8, "b": 0.6, "c": 0.9, "d": 0.5, "e": 0.7, "ac": 0.91, "ace": 0.92, "abce": 0.8,
             "acde": 0.5}
    a = greedy_soup(paths, SubsetScores(table), cache=None, sums="memory")
    b = greedy_soup(paths, SubsetScores(table), cache=None, sums="disk")
    assert a.weights == b.weights and a.trajectory == b.trajectory


def test_unknown_strategy_and_options():
    from soup.soups.strategies import make_strategy

    with pytest.raises(RecipeError, match="valid names: maximum, average, greedy"):
        make_strategy("best")
    with pytest.raises(RecipeError, match="unknown option.*valid: tie, tolerance, sums"):
        make_strategy("greedy", p=2)
    with pytest.raises(RecipeError, match="strategy.tie"):
        make_strategy("greedy", tie="=")


def test_ingredients_scored_concurrently_one_evaluator_per_device(five, tmp_path):
    """devices=[...]: one evaluator per device, ingredients spread over them; same result, shared cache key."""
    import threading
    import time

    paths, _ = five
    seen, lock = {}, threading.Lock()

    class PerDevice(Evaluator):
        name = "per-device"

        def score(self, candidate):
            with lock:
                seen.setdefault(self.args["device"], []).append(candidate.name)
            time.sleep(0.05)
            return {"a": 0.8, "b": 0.6, "c": 0.9, "d": 0.5, "e": 0.7}["".join(sorted(candidate.weights))]

    res = maximum_soup(paths, PerDevice, devices=["cpu", "cpu:1"], cache=str(tmp_path / "c.sqlite"))
    assert res.weights["c"] == 1.0
    assert set(seen) == {"cpu", "cpu:1"} and sum(len(v) for v in seen.values()) == 5
    seen.clear()
    res = maximum_soup(paths, PerDevice, cache=str(tmp_path / "c.sqlite"))  # the device is not in the key
    assert seen == {} and res.weights["c"] == 1.0
