"""Weight search (strategy ``search``): finds a known optimum, never ends worse than its seeds, resumes
a crashed or killed run without evaluating anything twice, per-pattern groups, recipes and the CLI."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap

import optuna
import pytest
import torch
from typer.testing import CliRunner

import soup
from conftest import load_soup, make_state, reference_mean, write_checkpoint
from soup.cli import app
from soup.errors import EvaluatorError, RecipeError
from soup.soups.evaluate import Evaluator
from soup.soups.search import SearchSoup
from soup.soups.strategies import make_strategy

runner = CliRunner()
OPTIMUM = [0.2, 0.3, 0.5]


@pytest.fixture
def three(tmp_path):
    """Three small float32 ingredients and the norm weight of their mean at OPTIMUM."""
    states = [make_state(100 + i, torch.float32, big=1000) for i in range(3)]
    paths = [write_checkpoint(tmp_path / f"ing{i}", st) for i, st in enumerate(states)]
    return paths, states, reference_mean(states, OPTIMUM)


CALLS: list[tuple[str, tuple]] = []  # (candidate name, its weights) of every evaluation that returned
CRASH_AT: list[int] = []  # raise on this call number (1-based), when set
TARGET: dict[str, torch.Tensor] = {}


def closeness(candidate):
    """Minus the squared distance of the soup's norm (and, when targeted, q_proj) weight to the target's:
    a quadratic in the weights, best at OPTIMUM."""
    if CRASH_AT and len(CALLS) + 1 == CRASH_AT[0]:
        raise RuntimeError("the evaluation node went away")
    sd = candidate.state_dict("cpu")
    loss = sum(float(((sd[k].float() - t) ** 2).sum()) for k, t in TARGET.items())
    CALLS.append((candidate.name, tuple(sorted((k, round(w, 9)) for k, w in candidate.weights.items()))))
    return -loss


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear(), CRASH_AT.clear(), TARGET.clear()
    yield


def _studies(storage: str) -> list[optuna.Study]:
    """The search studies in a storage (a shared one also holds the evaluation queue)."""
    return [optuna.load_study(study_name=name, storage=storage) for name in optuna.get_all_study_names(storage)
            if name.startswith("soup-search-")]


def test_finds_a_known_optimum_and_beats_its_seeds(three, tmp_path):
    paths, states, target = three
    TARGET["model.norm.weight"] = target["model.norm.weight"]
    res = soup.search_soup(paths, closeness, n_trials=40, out=tmp_path / "out", cache=str(tmp_path / "c.sqlite"))
    w = [res.weights[f"ing{i}"] for i in range(3)]
    assert all(abs(a - b) < 0.1 for a, b in zip(w, OPTIMUM)), w
    assert len(res.trajectory) == 40 and len(CALLS) == 3 + 39  # the best single ingredient's trial is cached
    by_name = {t["tried"]: t["score"] for t in res.trajectory}
    uniform, best_single = by_name["search trial 2"], max(res.scores.values())
    assert by_name["search trial 1"] == best_single  # the seeds: best single, then uniform
    assert res.soup_score.value >= uniform and res.soup_score.value >= best_single
    assert res.soup_score.value == max(by_name.values()) and res.trajectory[-1]["kept"] in (True, False)
    m = res.manifest
    assert m.method.name == "search" and m.method.options["n_trials"] == 40
    assert [t.candidate for t in m.evaluation.history][3:] == [f"search trial {k}" for k in range(1, 41)]
    got = load_soup(res.path)  # the engine wrote exactly the best trial's weights
    ref = reference_mean(states, [e.weight for e in m.ingredients])
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert (tmp_path / ".out.soup-study.sqlite").is_file()  # the embedded study storage, beside the output


def test_seeds_run_even_with_a_smaller_budget_and_include_the_cached_greedy_pool(three, tmp_path):
    paths, states, _ = three
    TARGET["model.norm.weight"] = reference_mean(states, [0.0, 0.5, 0.5])["model.norm.weight"]
    cache = str(tmp_path / "c.sqlite")
    greedy = soup.greedy_soup(paths, closeness, cache=cache)
    assert greedy.weights == {"ing0": 0.0, "ing1": 0.5, "ing2": 0.5}  # neither one ingredient nor all three
    CALLS.clear()
    res = soup.search_soup(paths, closeness, n_trials=1, cache=cache)
    assert CALLS == []  # every seed was already scored: the search cost nothing
    assert [t["tried"] for t in res.trajectory] == ["search trial 1", "search trial 2", "search trial 3"]
    assert res.soup_score.value == max(greedy.soup_score.value, max(res.scores.values()))


def test_timeout_stops_the_sampler_not_the_seeds(three):
    paths, _, target = three
    TARGET["model.norm.weight"] = target["model.norm.weight"]
    res = soup.search_soup(paths, closeness, n_trials=50, timeout=1e-9, cache=None)
    assert [t["tried"] for t in res.trajectory] == ["search trial 1", "search trial 2"]  # best single, uniform


def test_a_crashed_run_resumes_without_evaluating_anything_twice(three, tmp_path):
    paths, _, target = three
    TARGET["model.norm.weight"] = target["model.norm.weight"]
    opts = dict(n_trials=6, out=tmp_path / "out", cache=str(tmp_path / "c.sqlite"))
    CRASH_AT.append(6)  # calls 1-3: the ingredients; trial 1 is cached; trials 2, 3 run; trial 4 crashes
    with pytest.raises(EvaluatorError, match="search trial 4.*went away"):
        soup.search_soup(paths, closeness, **opts)
    assert not (tmp_path / "out").exists() and len(CALLS) == 5
    CRASH_AT.clear()
    res = soup.search_soup(paths, closeness, **opts)
    assert len(CALLS) == 5 + 3  # the failed trial (retried first) and two more; nothing else
    assert len(set(w for _, w in CALLS)) == len(CALLS)  # no soup evaluated twice
    (study,) = _studies(f"sqlite:///{tmp_path / '.out.soup-study.sqlite'}")
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 6 and states.count("FAIL") == 1
    assert study.trials[4].params == study.trials[3].params  # the crashed trial's weights, retried
    assert len(res.trajectory) == 6 and res.manifest.evaluation.history[-1].candidate == "search trial 7"
    assert {t.candidate for t in res.manifest.evaluation.history} >= {f"search trial {k}" for k in (1, 2, 3, 5)}


KILLER = '''
import os, signal
from pathlib import Path

def score(candidate):
    log = Path(os.environ["CALL_LOG"])
    calls = log.read_text().splitlines() if log.exists() else []
    if os.environ.get("KILL_AT") and len(calls) + 1 == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)  # no handler, no cleanup: a node lost mid-evaluation
    w = candidate.state_dict("cpu")["model.norm.weight"].float()
    log.write_text("".join(line + "\\n" for line in calls + [candidate.name]))
    return -float(w.abs().mean())
'''


def test_a_killed_run_resumes_where_it_stopped(tmp_path):
    for i in range(3):
        write_checkpoint(tmp_path / f"ing{i}", make_state(100 + i, torch.float32, big=1000))
    (tmp_path / "ev.py").write_text(KILLER)
    (tmp_path / "r.yaml").write_text(textwrap.dedent("""
        ingredients: [ing0, ing1, ing2]
        strategy: {name: search, n_trials: 5, sampler: random}
        evaluator: {name: python, args: {fn: ./ev.py:score}}
        output: out
        cache: scores.sqlite
    """))
    log = tmp_path / "calls.log"
    env = {**os.environ, "CALL_LOG": str(log), "KILL_AT": "6"}
    cmd = [sys.executable, "-c", "from soup.cli import main; main()", "run", str(tmp_path / "r.yaml"), "-q"]
    assert subprocess.run(cmd, env=env, cwd=tmp_path).returncode == -signal.SIGKILL
    assert len(log.read_text().splitlines()) == 5  # 3 ingredients, trials 2 and 3; killed in trial 4
    env.pop("KILL_AT")
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert calls[5:] == ["search trial 5", "search trial 6"]  # trial 4 (left running) retried as 5, then 6
    (study,) = _studies(f"sqlite:///{tmp_path / '.out.soup-study.sqlite'}")
    assert [t.state.name for t in study.trials].count("COMPLETE") == 5
    assert study.trials[4].params == study.trials[3].params
    assert soup.read_manifest(tmp_path / "out").method.name == "search"


def test_groups_get_their_own_weights(three, tmp_path):
    paths, states, _ = three
    TARGET["model.norm.weight"] = reference_mean(states, [0.8, 0.1, 0.1])["model.norm.weight"]
    TARGET["model.layers.0.self_attn.q_proj.weight"] = reference_mean(states, [0.1, 0.1, 0.8])[
        "model.layers.0.self_attn.q_proj.weight"]
    res = soup.search_soup(paths, closeness, n_trials=20, groups={"norm": "model.norm.*"}, out=tmp_path / "out",
                           cache=None)
    m = res.manifest
    (rule,) = [r for r in m.rules if r["pattern"] == "model.norm.*"]
    group, weights = rule["weights"], [e.weight for e in m.ingredients]
    assert rule["action"] == "weights" and group != weights
    got = load_soup(res.path)
    by_group, by_global = reference_mean(states, group), reference_mean(states, weights)
    assert torch.equal(got["model.norm.weight"], by_group["model.norm.weight"])
    assert all(torch.equal(got[k], by_global[k]) for k in by_global if k != "model.norm.weight")
    assert not torch.equal(got["model.norm.weight"], by_global["model.norm.weight"])


def test_a_shared_storage_holds_the_study_and_keeps_its_trials_alive(three, tmp_path, monkeypatch):
    """``storage=URL`` (``--storage``): the study lives there, with heartbeats for other processes to see."""
    import soup.soups.search

    paths, _, target = three
    TARGET["model.norm.weight"] = target["model.norm.weight"]
    monkeypatch.setattr(soup.soups.search, "HEARTBEAT_S", 1)
    url = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    res = soup.search_soup(paths, closeness, n_trials=4, storage=url, out=tmp_path / "out", cache=None)
    (study,) = _studies(url)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4 and len(res.trajectory) == 4
    assert not (tmp_path / ".out.soup-study.sqlite").exists()
    import sqlite3

    with sqlite3.connect(tmp_path / "shared.sqlite") as db:
        beats = db.execute("SELECT COUNT(*) FROM trial_heartbeats").fetchone()[0]
    assert beats >= 4  # every trial was kept alive while it was evaluated


class PerDevice(Evaluator):
    name = "search-per-device"

    def score(self, candidate):
        CALLS.append((self.args["device"], tuple(candidate.weights.items())))
        return -float(candidate.state_dict("cpu")["model.norm.weight"].float().abs().mean())


def test_trials_are_scored_in_batches_over_the_devices(three):
    paths, _, _ = three
    res = soup.search_soup(paths, PerDevice, n_trials=7, sampler="random", devices=["cpu", "cpu:1"], cache=None)
    assert len(res.trajectory) == 7 and {d for d, _ in CALLS} == {"cpu", "cpu:1"}


def test_recipe_run_report_and_validate(three, tmp_path):
    (tmp_path / "ev.py").write_text("def score(c):\n"
                                    "    return -float(c.state_dict('cpu')['model.norm.weight'].abs().mean())\n")
    recipe = textwrap.dedent("""
        ingredients: [ing0, ing1, ing2]
        strategy: {name: search, n_trials: 5, sampler: random, groups: {norm: "model.norm.*"}}
        evaluator: {name: python, args: {fn: ./ev.py:score}}
        output: out
        cache: scores.sqlite
    """)
    (tmp_path / "r.yaml").write_text(recipe)
    assert runner.invoke(app, ["validate", str(tmp_path / "r.yaml")]).exit_code == 0
    res = runner.invoke(app, ["run", str(tmp_path / "r.yaml"), "-q"])
    assert res.exit_code == 0, res.output
    report = runner.invoke(app, ["report", str(tmp_path / "out")])
    assert report.exit_code == 0
    assert all(f"search trial {k}" in report.stdout for k in range(1, 6)), report.stdout
    for bad, field in [("sampler: foo", "strategy.sampler: 'foo' must be one of tpe, cmaes, gp, random"),
                       ("n_trials: 0", "strategy.n_trials: 0 must be a whole number >= 1"),
                       ("timeout: -1", "strategy.timeout"), ("seed: true", "strategy.seed"),
                       ("groups: {a.b: 'x*'}", "strategy.groups"), ("n_trails: 5", "unknown option(s) n_trails")]:
        (tmp_path / "bad.yaml").write_text(recipe.replace('groups: {norm: "model.norm.*"}', bad))
        res = runner.invoke(app, ["validate", str(tmp_path / "bad.yaml")])
        assert res.exit_code == 1 and field in res.stderr, (bad, res.stderr)


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "gp"])
def test_every_sampler_runs_or_names_its_package(sampler, three):
    paths, _, _ = three
    needs = {"cmaes": ["cmaes"], "gp": ["scipy", "torch"]}.get(sampler, [])
    missing = [p for p in needs if importlib.util.find_spec(p) is None]
    if missing:
        with pytest.raises(RecipeError, match=f"strategy.sampler: {sampler} needs .*pip install {missing[0]}"):
            make_strategy("search", sampler=sampler)
        return
    res = soup.search_soup(paths, closeness, n_trials=4, sampler=sampler, cache=None)
    assert len(res.trajectory) == 4 and res.state_dict is not None


def test_bad_options_are_refused_before_any_work(three):
    paths, _, _ = three
    for opts, match in [(dict(n_trials=1.5), "strategy.n_trials"), (dict(timeout=float("nan")), "strategy.timeout"),
                        (dict(groups={"x": ""}), "strategy.groups.x"), (dict(groups="model.*"), "strategy.groups"),
                        (dict(groups={"global": "a*"}), "strategy.groups"),
                        (dict(groups={"a": "x*", "b": "x*"}), "same pattern"),
                        (dict(groups={"x": "nomatch.*"}), "strategy.groups.x: 'nomatch.*' matches no tensor"),
                        (dict(groups={"a": "model.*", "b": "model.norm.*"}), "strategy.groups.b"),  # all taken by a
                        (dict(groups={"v": "model.vision_tower.*"}, rules=["model.vision_tower.*=take:0"]),
                         "strategy.groups.v")]:
        with pytest.raises(RecipeError, match=match):
            soup.search_soup(paths, closeness, cache=None, **opts)
    if importlib.util.find_spec("cmaes") is not None:
        with pytest.raises(RecipeError, match="cmaes needs at least 2 weights"):
            SearchSoup(sampler="cmaes").check(1)
    assert CALLS == []
