"""Recipes: validation with field paths, `soup run` / `validate` / `report`, and the score cache."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from soup.soups.cache import ScoreCache
from soup.cli import app
from soup.errors import RecipeError
from soup.soups.evaluate import Score
from soup.recipe import load_recipe, parse_recipe

from conftest import load_soup, make_state, reference_mean, write_checkpoint

runner = CliRunner()
RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))

EVALUATOR = '''
import json, pathlib
from soup.soups.evaluate import Evaluator

class Closeness(Evaluator):
    """Higher is better: minus the distance of the soup's norm weight to a target value; logs calls."""
    def score(self, candidate):
        log = pathlib.Path(self.args["log"])
        log.write_text(log.read_text() + candidate.name + "\\n" if log.exists() else candidate.name + "\\n")
        w = candidate.state_dict("cpu")["model.norm.weight"].float()
        return -float((w - self.args["target"]).abs().mean())
'''


def test_every_example_recipe_validates():
    assert len(RECIPES) >= 3
    for path in RECIPES:
        r = load_recipe(path)
        assert r.ingredients and r.strategy in ("maximum", "average", "greedy", "search"), path


def test_errors_name_every_field_path(tmp_path):
    bad = {"ingredients": ["a", {"path": "b", "repo": "x/y"}, {"pth": "c"}], "strategy": {"name": "greedy", "tie": "~"},
           "evaluator": {"name": "perplexity", "argz": {}}, "rules": [{"pattern": "x", "take": 0, "drop": True}],
           "colour": "red", "push_to": {"repo": "a/b", "privat": True}}
    with pytest.raises(RecipeError) as exc:
        parse_recipe(bad, base=tmp_path)
    errors = exc.value.errors
    for expected in ["colour: unknown key", "ingredients[1]: give exactly one of path, repo",
                     "ingredients[2].pth: unknown key", "strategy.tie", "evaluator.argz: unknown key",
                     "rules[0]: give exactly one of take, drop, weights", "push_to.privat: unknown key"]:
        assert any(e.startswith(expected) for e in errors), (expected, errors)
    (tmp_path / "r.yaml").write_text(json.dumps(bad))
    res = runner.invoke(app, ["validate", str(tmp_path / "r.yaml")])
    assert res.exit_code == 1 and len(res.stderr.strip().splitlines()) == len(errors)
    with pytest.raises(RecipeError, match="evaluator: required by strategy greedy"):
        parse_recipe({"ingredients": ["a"], "strategy": "greedy"})


def test_relative_paths_follow_the_recipe(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "r.yaml").write_text(
        "ingredients: [../a, {path: b, name: bee}, hf://o/n@v1, {repo: o/m, revision: abc}]\n"
        "strategy: {name: maximum, p: 2}\nevaluator: {name: ./ev.py:E, args: {data: ./d.jsonl, k: 3}}\n"
        "output: out\ncache: false\n")
    r = load_recipe(tmp_path / "sub" / "r.yaml")
    assert r.ingredients == [str(tmp_path / "sub" / "../a"), str(tmp_path / "sub" / "b"), "hf://o/n@v1", "hf://o/m@abc"]
    assert r.labels == [None, "bee", None, None]
    assert r.evaluator.name == f"{tmp_path / 'sub' / 'ev.py'}:E" and r.evaluator.args == {
        "data": str(tmp_path / "sub" / "d.jsonl"), "k": 3}
    assert r.output == tmp_path / "sub" / "out" and r.cache is None


def _kitchen(tmp_path, n=3):
    states = []
    for i in range(n):
        st = make_state(i)
        st["model.norm.weight"] = torch.full((24,), float(i), dtype=torch.bfloat16)
        write_checkpoint(tmp_path / f"ft{i}", st)
        states.append(st)
    (tmp_path / "ev.py").write_text(EVALUATOR)
    return states


def _recipe(tmp_path, n, name="r.yaml", strategy="greedy"):
    ings = "\n".join(f"  - ft{i}" for i in range(n))
    (tmp_path / name).write_text(
        f"ingredients:\n{ings}\nstrategy: {strategy}\n"
        f"evaluator: {{name: ./ev.py:Closeness, args: {{target: 0.6, log: ./calls.log}}}}\n"
        f"output: soup-out\ncache: ./scores.sqlite\n")
    return tmp_path / name


def test_run_report_and_cache(tmp_path):
    states = _kitchen(tmp_path, 3)
    recipe = _recipe(tmp_path, 3)
    res = runner.invoke(app, ["run", str(recipe)])
    assert res.exit_code == 0, res.output
    # singles: ft0 (|0-0.6|), ft1 (0.4), ft2 (1.4): best ft1, then ft0: mean 0.5 -> 0.1 kept; then ft2: mean 1 -> 0.4 no
    calls = (tmp_path / "calls.log").read_text().split("\n")[:-1]
    assert calls == ["ft0", "ft1", "ft2", "greedy candidate 2/3 (+ft0)", "greedy candidate 3/3 (+ft2)"]
    m = json.loads((tmp_path / "soup-out" / "soup.json").read_text())
    assert [i["weight"] for i in m["ingredients"]] == [0.5, 0.5, 0.0]
    assert m["evaluation"]["soup_score"] == pytest.approx(-0.1, abs=1e-3)
    assert m["recipe"]["strategy"] == "greedy" and m["method"]["name"] == "greedy"
    got = load_soup(tmp_path / "soup-out")
    ref = reference_mean(states[:2], [0.5, 0.5])
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert "greedy trajectory" in res.stdout and "ft1" in res.stdout
    png = (tmp_path / "soup-out" / "soup_plot.png").read_bytes()
    assert png.startswith(b"\x89PNG") and m["plot"] == "soup_plot.png"
    assert "](soup_plot.png)" in (tmp_path / "soup-out" / "README.md").read_text()
    rep = runner.invoke(app, ["report", str(tmp_path / "soup-out")])
    assert rep.exit_code == 0 and "soup score: -0.1" in rep.stdout
    # a re-run evaluates nothing
    res = runner.invoke(app, ["run", str(recipe), "-q", "--overwrite"])
    assert res.exit_code == 0 and len((tmp_path / "calls.log").read_text().splitlines()) == 5
    # a new ingredient arrives: only it (and the new greedy candidates) are evaluated
    st = make_state(9)
    st["model.norm.weight"] = torch.full((24,), 0.6, dtype=torch.bfloat16)
    write_checkpoint(tmp_path / "ft3", st)
    res = runner.invoke(app, ["run", str(_recipe(tmp_path, 4, name="r4.yaml")), "-q", "--overwrite"])
    assert res.exit_code == 0, res.output
    new_calls = (tmp_path / "calls.log").read_text().splitlines()[5:]
    assert new_calls[0] == "ft3" and all(c.startswith("greedy candidate") for c in new_calls[1:])
    # --no-cache evaluates everything again
    before = len((tmp_path / "calls.log").read_text().splitlines())
    runner.invoke(app, ["run", str(recipe), "-q", "--overwrite", "--no-cache"])
    assert len((tmp_path / "calls.log").read_text().splitlines()) == before + 5


def test_dry_run_writes_nothing(tmp_path):
    _kitchen(tmp_path, 2)
    res = runner.invoke(app, ["run", str(_recipe(tmp_path, 2)), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "strategy: greedy" in res.stdout and "ft1" in res.stdout and "fingerprint" in res.stdout
    assert not (tmp_path / "soup-out").exists() and not (tmp_path / "calls.log").exists()


def test_run_errors_are_one_line(tmp_path):
    _kitchen(tmp_path, 2)
    (tmp_path / "r.yaml").write_text("ingredients: [ft0, ft1]\nstrategy: greedy\n"
                                     "evaluator: {name: nonesuch}\noutput: o\ncache: false\n")
    res = runner.invoke(app, ["run", str(tmp_path / "r.yaml"), "-q"])
    assert res.exit_code == 1
    from soup.soups.evaluate import evaluator_names

    names = evaluator_names()
    assert {"command", "perplexity", "python", "table"} <= set(names)
    assert f"unknown evaluator 'nonesuch'; valid names: {', '.join(names)}" in res.stderr
    assert not (tmp_path / "o").exists()


def _hammer(path: str, worker: int) -> None:
    cache = ScoreCache(path)
    for i in range(200):
        cache.put(f"ev{worker % 2}", f"cand{worker}-{i}", Score(float(i), {"score": float(i)}, "score"))
        assert cache.get(f"ev{worker % 2}", f"cand{worker}-{i}").value == float(i)
    cache.close()


def test_cache_survives_concurrent_writers(tmp_path):
    path = str(tmp_path / "c.sqlite")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(path, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    cache = ScoreCache(path)
    assert cache.count() == 800
    assert cache.get("ev1", "cand3-199").value == 199.0
    assert ScoreCache(f"sqlite:///{path}").count() == 800


def test_run_devices_option_overrides_recipe(tmp_path):
    _kitchen(tmp_path, 2)
    res = runner.invoke(app, ["run", str(_recipe(tmp_path, 2)), "--dry-run", "--devices", "cpu,cpu"])
    assert res.exit_code == 0 and "devices ['cpu', 'cpu']" in res.stdout
