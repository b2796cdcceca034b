"""soup.json has one owner (soup.io.manifest): typed, checked, versioned, written once and last, read by
the card, the report, the plot, the hub commit message and the CLI. Every manifest here is produced by
the code itself (a real soup is cooked); none is written by hand."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from soup.finish.card import render_model_card
from soup.cli import app, main
from soup.pipeline import average_soup, cook, greedy_soup, maximum_soup
from soup.errors import SoupError
from soup.io.manifest import MANIFEST, SCHEMA_VERSION, Manifest, read, write
from soup.engine.output import is_soup
from soup.finish.report import format_report, make_figure
from soup.soups.strategies import Choice, SoupStrategy

from conftest import make_state, write_checkpoint

runner = CliRunner()

VAL = {"a": 0.8, "b": 0.6, "c": 0.9, "d": 0.5}  # validation score of each ingredient alone
TEST = {"a": 0.7, "b": 0.5, "c": 0.75, "d": 0.4}  # held-out test score of each ingredient alone


def val_score(candidate):
    """The mean of the members' validation scores (a plain function: the ``python`` evaluator)."""
    return sum(VAL[k] for k in candidate.weights) / len(candidate.weights)


def test_score_fn(candidate):
    """The mean of the members' test scores, and a bonus for a soup of several."""
    members = list(candidate.weights)
    return sum(TEST[k] for k in members) / len(members) + (0.0125 if len(members) > 1 else 0.0)


test_score_fn.__test__ = False  # a helper, not a test


@pytest.fixture
def four(tmp_path):
    return [write_checkpoint(tmp_path / name, make_state(20 + i)) for i, name in enumerate(VAL)]


def test_card_shows_the_test_score_and_describes_a_top_p_maximum_soup(four, tmp_path):
    res = maximum_soup(four, val_score, p=2, test_evaluator=test_score_fn, out=tmp_path / "soup", cache=None)
    assert res.weights == {"a": 0.5, "b": 0.0, "c": 0.5, "d": 0.0}
    assert f"{res.test_score.value:.4g}" == "0.7375" and f"{res.soup_score.value:.4g}" == "0.85"
    card = (res.path / "README.md").read_text()
    assert "the uniform average of the top 2 ingredients" in card and "single best" not in card
    assert "| **Soup** | **0.85** | **0.7375** |" in card  # validation and held-out test score of the soup
    assert "| Best single ingredient (c) | 0.9 | 0.75 |" in card
    assert "| 0 | a |" in card and "| 0.5 | 0.8 | 0.7 | yes |" in card  # per-ingredient validation and test
    assert card == render_model_card(read(res.path))  # the card is a function of the manifest


def test_p1_maximum_is_the_best_single_ingredient(four):
    res = maximum_soup(four, val_score, cache=None)
    text = render_model_card(res.manifest)
    assert "the single best ingredient by validation score" in text and "top 1" not in text


def test_the_written_manifest_is_the_result_manifest(four, tmp_path):
    res = greedy_soup(four, val_score, test_evaluator=test_score_fn, out=tmp_path / "soup", cache=None)
    m = read(res.path)
    assert m == res.manifest and m.schema_version == SCHEMA_VERSION
    assert [i.score for i in m.ingredients] == [VAL[k] for k in VAL]
    assert [i.test_score for i in m.ingredients] == pytest.approx([TEST[k] for k in TEST])
    assert m.evaluation.soup_score == res.soup_score.value and m.evaluation.test.soup_score == res.test_score.value
    assert m.evaluation.evaluator.name == "python" and m.evaluation.direction == "maximize"
    # every evaluation in order: the four ingredients, then greedy's candidates
    assert [t.candidate for t in m.evaluation.history[:4]] == list(VAL)
    assert [t.candidate for t in m.evaluation.history[4:]] == [f"greedy candidate {s}/4 (+{k})"
                                                              for s, k in ((2, "a"), (3, "b"), (4, "d"))]
    assert [s.tried for s in m.evaluation.trajectory] == ["c", "a", "b", "d"]
    assert [t.candidate for t in m.evaluation.test.history] == [*VAL, "greedy soup"]
    # the manifest is the last file written: nothing in the folder is newer
    newest = max(p.stat().st_mtime_ns for p in res.path.iterdir())
    assert (res.path / MANIFEST).stat().st_mtime_ns == newest and not (res.path / (MANIFEST + ".tmp")).exists()
    # write -> read is the identity
    again = tmp_path / "again"
    again.mkdir()
    write(again, m)
    assert read(again) == m


def test_an_in_memory_soup_has_a_manifest_too(four):
    res = average_soup(four, val_score, cache=None)
    assert isinstance(res.manifest, Manifest) and res.manifest.plot is None
    assert res.manifest.method.name == "average" and res.manifest.evaluation.soup_score == pytest.approx(0.7)


def _v0(manifest: Manifest) -> dict:
    """The same soup as soup 0.1 wrote it: no schema_version, ``evaluations`` for the history,
    ``ingredient_scores`` maps, a ``strategy`` key."""
    d = manifest.to_dict()
    del d["schema_version"]
    ev = d["evaluation"]
    ev["evaluations"] = ev.pop("history")
    ev["strategy"] = d["method"]["name"]
    ev["ingredient_scores"] = {i["name"]: i["score"] for i in d["ingredients"]}
    ev["test"]["ingredient_scores"] = {i["name"]: i["test_score"] for i in d["ingredients"]}
    del ev["test"]["history"]
    for i in d["ingredients"]:
        del i["score"], i["test_score"]  # found again in the maps
    return d


def test_a_soup_0_1_manifest_is_still_read(four, tmp_path):
    res = greedy_soup(four, val_score, test_evaluator=test_score_fn, out=tmp_path / "soup", cache=None)
    (res.path / MANIFEST).write_text(json.dumps(_v0(res.manifest)))
    old = read(res.path)
    assert old.evaluation.history == res.manifest.evaluation.history
    assert [i.score for i in old.ingredients] == [i.score for i in res.manifest.ingredients]
    assert [i.test_score for i in old.ingredients] == [i.test_score for i in res.manifest.ingredients]
    assert old.evaluation.test.soup_score == res.test_score.value
    assert is_soup(res.path) and "greedy trajectory" in format_report(old)


def test_a_newer_schema_is_one_line(four, tmp_path, monkeypatch, capsys):
    res = average_soup(four, out=tmp_path / "soup", cache=None)
    newer = dict(res.manifest.to_dict(), schema_version=SCHEMA_VERSION + 1)
    (res.path / MANIFEST).write_text(json.dumps(newer))
    with pytest.raises(SoupError, match=r"soup.json: written by a newer soup \(schema_version 2; this soup reads up "
                                        r"to 1\): upgrade soup"):
        read(res.path)
    monkeypatch.setattr(sys, "argv", ["soup", "report", str(res.path)])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and len(err) == 1 and "newer soup" in err[0]


@pytest.mark.parametrize("change,why", [
    (lambda d: d.update(ingredients={}), "ingredients: expected a list, got an object"),
    (lambda d: d["ingredients"][1].update(weight="1"), "ingredients[1].weight: expected a number, got a string"),
    (lambda d: d["evaluation"]["history"][0].pop("score"), "evaluation.history[0]: expected an object with"),
    (lambda d: d["files"].clear() or d.pop("tensors"), "tensors: missing"),
    (lambda d: d["evaluation"].update(direction="up"), "evaluation.direction: expected 'maximize' or 'minimize'"),
])
def test_a_wrong_shape_is_one_line_naming_the_field(four, tmp_path, change, why):
    res = greedy_soup(four, val_score, out=tmp_path / "soup", cache=None)
    d = res.manifest.to_dict()
    change(d)
    (res.path / MANIFEST).write_text(json.dumps(d))
    with pytest.raises(SoupError) as info:
        read(res.path)
    assert str(info.value).startswith(f"{res.path / MANIFEST}: not a soup manifest ({why}")
    assert "\n" not in str(info.value) and not is_soup(res.path)
    with pytest.raises(SoupError, match="already exists and is not a soup|is not a soup"):
        average_soup(four, out=res.path, overwrite=True, cache=None)  # a broken manifest is never replaced


def test_report_renders_every_evaluation_and_the_trajectory(four, tmp_path):
    res = greedy_soup(four, val_score, test_evaluator=test_score_fn, out=tmp_path / "soup", cache=None)
    out = runner.invoke(app, ["report", str(res.path)])
    assert out.exit_code == 0, out.output
    text = out.stdout
    assert "evaluations, in order:" in text and "test evaluations, in order:" in text
    assert "greedy candidate 2/4 (+a)" in text and "greedy trajectory:" in text
    assert f"soup test score: {res.test_score.value:.4f}" in text
    as_json = runner.invoke(app, ["report", str(res.path), "--json"])
    assert Manifest.from_dict(json.loads(as_json.stdout)) == res.manifest


@dataclass
class EveryOther(SoupStrategy):
    """A strategy plug-in from outside the package: every other ingredient, uniformly."""

    start: int = 0

    def choose(self, scorer, n):
        weights = [1.0 if i % 2 == self.start else 0.0 for i in range(n)]
        weights = [w / sum(weights) for w in weights]
        soup = scorer.score(weights, "every other")
        return Choice(weights, [None] * n, soup_score=soup)


def test_a_plug_in_strategy_renders_generically(four, tmp_path):
    res = cook(EveryOther(start=1), four, evaluator=val_score, out=tmp_path / "soup", cache=None)
    m = read(res.path)
    assert m.method.name == "EveryOther" and m.method.options == {"start": 1} and m.method.reference is None
    card = (res.path / "README.md").read_text()
    assert "weights chosen by the `EveryOther` strategy (start = 1)" in card and "soup-everyother" in card
    text = format_report(m)
    assert "every other" in text and "soup" in text.split("every other")[0].splitlines()[-1]  # kind: soup
    assert m.plot == "soup_plot.png" and (res.path / "soup_plot.png").read_bytes().startswith(b"\x89PNG")


OUTLIER = {"a": 0.96, "b": 0.97, "c": 0.98, "bad": 0.1}  # one fine-tune on shuffled labels


def outlier_score(candidate):
    members = list(candidate.weights)
    return sum(OUTLIER[k] for k in members) / len(members) + (0.01 if len(members) > 1 else 0.0)


def test_plot_scales_to_the_scores_that_matter(tmp_path):
    paths = [write_checkpoint(tmp_path / k, make_state(30 + i)) for i, k in enumerate(OUTLIER)]
    res = greedy_soup(paths, outlier_score, test_evaluator=outlier_score, out=tmp_path / "soup", cache=None)
    assert res.weights["bad"] == 0.0 and res.soup_score.value == pytest.approx(0.985)
    fig = make_figure(res.manifest)
    history, trajectory, test = fig.axes
    for ax in (history, test):
        lo, hi = ax.get_ylim()
        assert 0.9 < lo < 0.96 and 0.985 < hi < 1.0, (ax.get_title(), lo, hi)  # the good ones fill the panel
        assert "0.1" in [t.get_text() for t in ax.texts]  # the outlier is on the edge, its value written
    lo, hi = trajectory.get_ylim()
    assert 0.9 < lo and hi < 1.0
    assert {t.get_text() for t in history.texts} == {"0.1", "0.693"}  # ft-bad and the candidate with it
    png = res.path / "soup_plot.png"
    assert res.manifest.plot == "soup_plot.png" and png.read_bytes().startswith(b"\x89PNG")


def test_hub_commit_message_comes_from_the_manifest(four, tmp_path):
    from soup.hub.upload import _default_message

    res = maximum_soup(four, val_score, p=3, out=tmp_path / "soup", cache=None)
    assert _default_message(res.path, 5) == "soup: maximum soup of 4 ingredients"
    (res.path / MANIFEST).write_text("{}")
    assert _default_message(res.path, 5) == "soup: upload 5 files"


def test_manifest_is_frozen(four):
    m = average_soup(four, cache=None).manifest
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.plot = "x.png"
