"""Strategies are plug-ins: a strategy written in one file outside the package, against the public
scorer contract only, runs from a recipe and shows up in the soup's report, card and plot."""

from __future__ import annotations

import textwrap

import pytest
import torch
from typer.testing import CliRunner

import soup
from conftest import load_soup, make_state, reference_mean, write_checkpoint
from soup.cli import app
from soup.errors import RecipeError
from soup.soups.strategies import make_strategy

runner = CliRunner()

TOP_TWO = '''
"""A strategy outside the package: mix the two best ingredients, trying two mixing weights."""
from dataclasses import dataclass

from soup import Choice, SoupStrategy


@dataclass
class TopTwo(SoupStrategy):
    lean: float = 0.75  # the other mix tried: lean on the best

    reference = "https://example.org/top-two"

    def choose(self, scorer, n):
        scores = scorer.score_ingredients()
        best, second = scorer.rank(scores)[:2]
        mixes = [0.5, self.lean]
        candidates = []
        for share in mixes:
            w = [0.0] * n
            w[best], w[second] = share, 1.0 - share
            candidates.append((w, f"top-two {share:g}/{1 - share:g}"))
        results = scorer.score_many(candidates)
        pick = scorer.rank(results)[0]
        return Choice(candidates[pick][0], [s.value for s in scores], soup_score=results[pick],
                      kept=[w > 0 for w in candidates[pick][0]])
'''

EVALUATOR = '''
from soup import Evaluator

class Target(Evaluator):
    """Higher is better: minus the distance of the soup's norm weight to a target value."""
    def score(self, candidate):
        w = candidate.state_dict("cpu")["model.norm.weight"].float()
        return -float((w - self.args["target"]).abs().mean())
'''


def test_a_strategy_in_a_file_runs_from_a_recipe(tmp_path):
    states = [make_state(10 + i) for i in range(3)]
    for i, st in enumerate(states):
        write_checkpoint(tmp_path / f"ft{i}", st)
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "top_two.py").write_text(TOP_TWO)
    (tmp_path / "ev.py").write_text(EVALUATOR)
    target = float(states[1]["model.norm.weight"].float().mean())
    (tmp_path / "r.yaml").write_text(textwrap.dedent(f"""
        ingredients: [ft0, ft1, ft2]
        strategy: {{name: ./plugins/top_two.py:TopTwo, lean: 0.8}}
        evaluator: {{name: ./ev.py:Target, args: {{target: {target}}}}}
        output: soup
        cache: scores.sqlite
    """))
    assert runner.invoke(app, ["validate", str(tmp_path / "r.yaml")]).exit_code == 0
    res = runner.invoke(app, ["run", str(tmp_path / "r.yaml"), "-q"])
    assert res.exit_code == 0, res.output
    manifest = soup.read_manifest(tmp_path / "soup")
    assert manifest.method.name == "TopTwo" and manifest.method.options == {"lean": 0.8}
    history = [t.candidate for t in manifest.evaluation.history]
    assert history[:3] == ["ft0", "ft1", "ft2"] and set(history[3:]) == {"top-two 0.5/0.5", "top-two 0.8/0.2"}
    weights = [e.weight for e in manifest.ingredients]
    got = load_soup(tmp_path / "soup")
    ref = reference_mean(states, weights)
    assert all(torch.equal(got[k], ref[k]) for k in ref)  # the engine wrote exactly the chosen weights
    report = runner.invoke(app, ["report", str(tmp_path / "soup")])
    assert report.exit_code == 0 and "TopTwo" in report.stdout and "top-two 0.8/0.2" in report.stdout
    card = (tmp_path / "soup" / "README.md").read_text()
    assert "TopTwo" in card and "https://example.org/top-two" in card
    pytest.importorskip("matplotlib")
    assert (tmp_path / "soup" / "soup_plot.png").stat().st_size > 1000


def test_strategy_names_and_options_are_checked(tmp_path):
    (tmp_path / "s.py").write_text(TOP_TWO)
    with pytest.raises(RecipeError, match="valid names: maximum, average, greedy"):
        make_strategy("best")
    with pytest.raises(RecipeError, match="unknown option.*lean"):
        make_strategy(f"{tmp_path / 's.py'}:TopTwo", leen=0.2)
    with pytest.raises(RecipeError, match="not a subclass of soup.SoupStrategy"):
        make_strategy("soup.soups.evaluate:Score")
    with pytest.raises(RecipeError, match="has no attribute 'Nope'"):
        make_strategy(f"{tmp_path / 's.py'}:Nope")
    assert make_strategy("greedy", tie=">").tie == ">"  # built-ins found by their entry points
