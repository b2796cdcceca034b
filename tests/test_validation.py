"""Bad values are refused before any work, in one line naming the option or recipe field.

CLI options, recipe fields (through ``soup validate``, which must catch everything ``soup run`` would
refuse for the recipe's shape) and Python API options alike; no traceback, nothing written or evaluated.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import soup
from soup.cli import app
from soup.errors import RecipeError
from soup.options import MergeOptions, check_weights

runner = CliRunner()
RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def one_error_line(res, *needles: str) -> str:
    """The single non-empty stderr line of a failed command, checked to contain every needle."""
    assert "Traceback" not in res.output, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert all(n in lines[0] for n in needles), (needles, lines[0])
    return lines[0]


@pytest.mark.parametrize("weights, needle", [("nan,1", "nan is not a finite number"),
                                             ("inf,1", "inf is not a finite number"),
                                             ("1e308,1e308", "too large"),
                                             ("0.5,abc", "'abc' is not a number")])
def test_bad_cli_weights_are_usage_errors(make_ingredients, tmp_path, weights, needle):
    paths, _ = make_ingredients(2)
    res = runner.invoke(app, ["merge", *map(str, paths), "-o", str(tmp_path / "out"), "--weights", weights])
    assert res.exit_code == 2 and "--weights" in res.output and needle in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, needles", [
    (["--shard-size", "0"], ["shard_size", "positive size"]),
    (["--shard-size", "-5"], ["shard_size", "positive size"]),
    (["--shard-size", "5XB"], ["shard_size"]),
    (["--rule", "x=nan,1"], ["rules[0].weights", "nan is not a finite number"]),
    (["--rule", "x=take:-1"], ["rules[0].take", "negative"]),
    (["--rule", "*=drop"], ["rules: every tensor is dropped", "*=drop"]),
    (["--dtype", "bf17"], ["dtype: 'bf17'", "bfloat16"]),
    (["--accumulate", "float16"], ["accumulate: 'float16'"]),
    (["--device", "gpu"], ["device: 'gpu' is not a torch device"]),
    (["--config-from", "5"], ["config_from", "out of range"]),
])
def test_bad_merge_options_fail_in_one_line(make_ingredients, tmp_path, args, needles):
    paths, _ = make_ingredients(2)
    res = runner.invoke(app, ["merge", *map(str, paths), "-o", str(tmp_path / "out"), *args])
    assert res.exit_code == 1
    assert one_error_line(res, *needles).startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_weights_checker():
    assert check_weights(["0.5", 1], where="w") == (0.5, 1.0)
    for bad, needle in [([float("nan")], "w: nan is not a finite number"), ([1e31], "w: 1e+31 is too large"),
                        ([True], "w: True is not a number"), ("1,2", "a list of numbers")]:
        with pytest.raises(RecipeError, match=re.escape(needle)):
            check_weights(bad, where="w")
    with pytest.raises(RecipeError) as exc:
        MergeOptions(dtype="bf17", shard_size=0, strict="no")
    assert [e.split(":")[0] for e in exc.value.errors] == ["dtype", "shard_size", "strict"]
    assert MergeOptions(dtype="BF16", shard_size="1.5GiB").shard_bytes == 3 * 2**29


def validate(tmp_path: Path, text: str) -> list[str]:
    """``soup validate`` on a recipe: exit 1, the error lines (each prefixed with the file name)."""
    (tmp_path / "r.yaml").write_text(text)
    res = runner.invoke(app, ["validate", str(tmp_path / "r.yaml")])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith(f"{tmp_path / 'r.yaml'}: ") for line in lines), lines
    return [line.removeprefix(f"{tmp_path / 'r.yaml'}: ") for line in lines]


def test_validate_refuses_every_bad_merge_option(tmp_path):
    errors = validate(tmp_path, "ingredients: [a, b]\nstrategy: average\ndtype: bf17\naccumulate: float16\n"
                                "shard_size: 0\ndevice: gpu\ndevices: [cpu, gpu]\nstrict: maybe\nconfig_from: 7\n"
                                "push_to: {repo: o/n, private: maybe}\n")
    fields = [e.split(":")[0] for e in errors]
    assert fields == ["dtype", "accumulate", "shard_size", "device", "strict", "config_from", "devices[1]",
                      "push_to.private"], errors


@pytest.mark.parametrize("text, needle", [
    ("ingredients: [a, b]\nstrategy: {name: average, weights: [1, .nan]}\n",
     "strategy.weights: nan is not a finite number"),
    ("ingredients: [a, b]\nstrategy: {name: average, weights: [1, 2, 3]}\n", "strategy.weights: 3 weights"),
    ("ingredients: [a, b]\nstrategy: {name: greedy, tolerance: abc}\nevaluator: e\n", "strategy.tolerance"),
    ("ingredients: [a, b]\nstrategy: {name: greedy, tie: 5}\nevaluator: e\n", "strategy.tie"),
    ("ingredients: [a, b]\nstrategy: {name: maximum, p: 0}\nevaluator: e\n", "strategy.p"),
    ("ingredients: [a, b]\nstrategy: {name: maximum, p: x}\nevaluator: e\n", "strategy.p"),
    ("ingredients: [a, b]\nstrategy: {name: maximum, p: 3}\nevaluator: e\n", "strategy.p: 3 must be between"),
    ("ingredients: [a, b]\nstrategy: average\nrules: [{pattern: x, weights: [.inf, 1]}]\n",
     "rules[0].weights: inf is not a finite number"),
    ("ingredients: [a, b]\nstrategy: average\nrules: [{pattern: x, take: 2}]\n", "rules[0].take: ingredient index 2"),
    ("ingredients: [a, b]\nstrategy: average\nrules: [{pattern: x, take: -1}]\n", "rules[0].take: -1 is negative"),
    ("ingredients: [a, b]\nstrategy: average\nrules: [{pattern: '*', drop: true}]\n", "rules[0]: every tensor"),
    # malformed shapes: field-path errors, never a traceback
    ("ingredients: {a: 1}\nstrategy: average\n", "ingredients: a non-empty list"),
    ("ingredients: [a]\nstrategy: [greedy]\n", "strategy: a name"),
    ("ingredients: [a]\nstrategy: {name: [greedy]}\n", "strategy: a name"),
    ("ingredients: [a]\nstrategy: average\nevaluator: {name: [x]}\n", "evaluator: a name"),
    ("{1: x, ingredients: [a], strategy: average}\n", "recipe: key 1 is not a string"),
    ("ingredients: [a]\nstrategy: average\nevaluator: {name: x, args: {2: 3}}\n", "evaluator.args: key 2"),
    ("ingredients: [{path: 3}]\nstrategy: average\n", "ingredients[0].path: must be a string"),
    ("ingredients: [a]\nstrategy: average\noutput: 5\n", "output: must be a string"),
    ("", "recipe: empty"),
    ("ingredients: a\n strategy: x: y\n", "2:10: not valid YAML (mapping values are not allowed here)"),
])
def test_validate_names_the_field(tmp_path, text, needle):
    errors = validate(tmp_path, text)
    assert any(e.startswith(needle) for e in errors), (needle, errors)


def test_run_names_the_yaml_line_and_column(tmp_path):
    (tmp_path / "r.yaml").write_text("ingredients: [a]\nstrategy: {name: average\n")
    res = runner.invoke(app, ["run", str(tmp_path / "r.yaml")])
    assert res.exit_code == 1
    one_error_line(res, f"{tmp_path / 'r.yaml'}:3:1: not valid YAML")


def test_run_checks_the_plan_before_evaluating(make_ingredients, tmp_path):
    paths, _ = make_ingredients(2)
    log = tmp_path / "calls.log"
    (tmp_path / "ev.py").write_text(
        "import pathlib\nfrom soup.soups.evaluate import Evaluator\n"
        "class E(Evaluator):\n    def score(self, candidate):\n"
        f"        pathlib.Path({str(log)!r}).write_text('called')\n        return 1.0\n")
    (tmp_path / "r.yaml").write_text(
        f"ingredients: [{paths[0]}, {paths[1]}]\nstrategy: greedy\nevaluator: ./ev.py:E\n"
        "rules: [{pattern: 'model.*', drop: true}]\noutput: out\ncache: false\n")
    res = runner.invoke(app, ["run", str(tmp_path / "r.yaml"), "-q"])
    assert res.exit_code == 1
    one_error_line(res, "rules: every tensor is dropped")
    assert not log.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, needle", [
    ({"shard_sise": "1GB"}, "greedy_soup: unknown option 'shard_sise' (did you mean 'shard_size'?)"),
    ({"shard_size": 0}, "shard_size: 0 must be a positive size"),
    ({"dtype": "bf17"}, "dtype: 'bf17'"),
    ({"devices": ["gpu"]}, "devices[0]"),
    ({"tolerance": "abc"}, "strategy.tolerance"),
    ({"rules": ["*=drop"]}, "rules: every tensor is dropped"),
])
def test_api_options_fail_before_the_evaluator_runs(make_ingredients, tmp_path, options, needle):
    paths, _ = make_ingredients(2)
    calls = []

    def evaluator(candidate):
        calls.append(candidate)
        return 1.0

    with pytest.raises(RecipeError) as exc:
        soup.greedy_soup(paths, evaluator=evaluator, out=tmp_path / "out", cache=None, **options)
    assert str(exc.value).startswith(needle) and calls == [] and not (tmp_path / "out").exists()


def test_api_weights_and_dtype_fail_before_output(make_ingredients, tmp_path):
    paths, _ = make_ingredients(2)
    with pytest.raises(RecipeError, match="^dtype: 'bf17'"):
        soup.merge(paths, tmp_path / "out", dtype="bf17")
    with pytest.raises(RecipeError, match="^weights: nan is not a finite number"):
        soup.merge(paths, tmp_path / "out", weights=[float("nan"), 1.0])
    with pytest.raises(RecipeError, match="^strategy.weights: inf"):
        soup.average_soup(paths, out=tmp_path / "out", weights=[float("inf"), 1.0])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_example_recipes_still_validate(path, monkeypatch):
    """The examples name ingredients and data this repo does not hold (and hub repos, offline here): `soup
    validate` checks them as `soup run` would, so those are all it may find missing."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    res = runner.invoke(app, ["validate", str(path)])
    assert "Traceback" not in res.output
    missing = ("no such file or folder", "data file not found", "offline mode is enabled")
    for line in res.stderr.splitlines():
        assert any(m in line for m in missing), line


def test_merge_options_are_one_checked_object(make_ingredients, tmp_path):
    """A misspelt engine option is a RecipeError that suggests the name, before the output exists."""

    paths, _ = make_ingredients(2)
    with pytest.raises(RecipeError, match="unknown option 'shard_sise' \\(did you mean 'shard_size'\\?\\)"):
        soup.merge(paths, tmp_path / "o", shard_sise="1GB")
    assert not (tmp_path / "o").exists()
    opts = MergeOptions(dtype="float32", shard_size="1MB")
    res = soup.merge(paths, None, options=opts, accumulate="float64")
    assert {t.dtype for t in res.state_dict.values() if t.is_floating_point()} == {torch.float32}
