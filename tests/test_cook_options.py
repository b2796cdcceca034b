"""Options as checked objects (issue 18): ``cook`` takes evaluation / output / publishing objects, the Python
soups build the same objects from their keywords, ``output`` is one name everywhere (``out`` its older one),
and a bad value is refused before any evaluation, naming the option."""

from __future__ import annotations

import pytest
import torch

import soup
from soup import EvaluationOptions, OutputOptions, PublishOptions
from soup.errors import RecipeError
from soup.soups.strategies import GreedySoup

from conftest import load_soup, reference_mean


def _norm_score(candidate) -> float:
    """Prefers small weights: a deterministic score that differs between candidates."""
    sd = candidate.state_dict("cpu")
    return -float(sum(t.double().abs().sum() for t in sd.values() if t.is_floating_point()))


def test_objects_and_keywords_make_the_same_soup(make_ingredients, tmp_path):
    paths, states = make_ingredients(3, dtype=torch.float32, big=2000)
    calls = []

    def ev(candidate):
        calls.append(candidate.name)
        return _norm_score(candidate)

    by_keywords = soup.greedy_soup(paths, evaluator=ev, output=tmp_path / "a", cache=None, racing=False)
    n_keywords = len(calls)
    by_objects = soup.cook(GreedySoup(racing=False), paths,
                           evaluation=EvaluationOptions(evaluator=ev, cache=None),
                           output=OutputOptions(tmp_path / "b"), publishing=PublishOptions(recipe={"note": "x"}))
    assert len(calls) == 2 * n_keywords  # nothing cached (cache=None): the same evaluations again
    assert by_keywords.weights == by_objects.weights
    a, b = load_soup(by_keywords.path), load_soup(by_objects.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kept = [w for w in by_keywords.weights.values()]
    ref = reference_mean(states, [w / sum(kept) for w in kept])
    assert all(torch.equal(a[k], ref[k]) for k in ref)  # the soup is the definition of its weights
    assert soup.read_manifest(by_objects.path).recipe == {"note": "x"}


def test_out_is_output_older_name(make_ingredients, tmp_path):
    paths, states = make_ingredients(2, dtype=torch.float32, big=500)
    res = soup.average_soup(paths, out=tmp_path / "old")
    assert res.path == tmp_path / "old"
    ref = reference_mean(states, [0.5, 0.5])
    got = load_soup(res.path)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    with pytest.raises(RecipeError, match=r"^output: given twice"):
        soup.average_soup(paths, out=tmp_path / "x", output=tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(evaluation=EvaluationOptions(), cache=None), r"^cache: given both on their own and in evaluation="),
    (dict(output=OutputOptions(), overwrite=True), r"^overwrite: given both on their own and in output="),
    (dict(publishing="acme/soup"), r"^publishing: must be a PublishOptions, got str"),
    (dict(evaluation={"evaluator": "x"}), r"^evaluation: must be a EvaluationOptions, got dict"),
    (dict(evaluater=_norm_score), r"unknown option 'evaluater' \(did you mean 'evaluator'\?\)"),
])
def test_misuse_is_one_line_before_any_work(make_ingredients, tmp_path, kwargs, message):
    paths, _ = make_ingredients(2, dtype=torch.float32, big=100)
    calls = []

    def ev(candidate):
        calls.append(1)
        return 0.0

    kwargs = dict(kwargs)
    kwargs.setdefault("evaluation", None)
    if kwargs["evaluation"] is None and "evaluater" not in kwargs:
        kwargs["evaluator"] = ev
    with pytest.raises(RecipeError, match=message):
        soup.cook(GreedySoup(), paths, **kwargs)
    assert calls == []


@pytest.mark.parametrize("build, message", [
    (lambda: EvaluationOptions(storage="study.db"), r"^storage: 'study.db' must be an optuna storage URL"),
    (lambda: EvaluationOptions(devices="cuda:0"), r"^devices: a list of devices is required"),
    (lambda: EvaluationOptions(devices=["gpu0"]), r"^devices\[0\]: 'gpu0' is not a torch device"),
    (lambda: EvaluationOptions(local_worker="yes"), r"^local_worker: must be true or false"),
    (lambda: EvaluationOptions(evaluator_args=[1]), r"^evaluator_args: must be a mapping"),
    (lambda: OutputOptions(overwrite="no"), r"^overwrite: must be true or false, got 'no'"),
    (lambda: OutputOptions(path=3), r"^output: 3 must be a folder path"),
    (lambda: PublishOptions(push_to=7), r"^push_to: 7 must be owner/name"),
])
def test_bad_values_name_their_option(build, message):
    with pytest.raises(RecipeError, match=message):
        build()


def test_the_torch_key_has_the_recipe_name_on_the_command_line(tmp_path):
    """``--key`` (the recipe's ingredient ``key``, ``soup.Ingredient(key=)``) and its older spelling
    ``--state-dict-key`` read the same weights."""
    from typer.testing import CliRunner

    from soup.cli import app

    a, b = torch.arange(4.0).reshape(2, 2), torch.ones(2, 2)
    torch.save({"state_dict": {"w": a}, "step": 3}, tmp_path / "a.pt")
    torch.save({"state_dict": {"w": b}, "step": 3}, tmp_path / "b.pt")
    for flag, out in (("--key", "k1"), ("--state-dict-key", "k2")):
        res = CliRunner().invoke(app, ["merge", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "-o",
                                       str(tmp_path / out), flag, "state_dict", "-q"])
        assert res.exit_code == 0, res.output
        assert torch.equal(load_soup(tmp_path / out)["w"], (a.double() / 2 + b.double() / 2).float())


def test_inspect_takes_key_like_ingredient_and_the_cli(tmp_path):
    """``soup.inspect(key=)`` is ``Ingredient(key=)`` and ``--key``; ``state_dict_key`` is its older name."""
    import torch

    import soup
    from soup.errors import RecipeError

    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.ones(2, 3)}, "ema": {"w": torch.zeros(2, 3), "b": torch.zeros(3)}}, path)
    assert soup.inspect(path, key="ema")["tensors"] == soup.inspect(path, state_dict_key="ema")["tensors"] == 2
    assert soup.inspect(path, key="model")["tensors"] == 1
    with pytest.raises(RecipeError, match="key given twice"):
        soup.inspect(path, key="ema", state_dict_key="ema")
