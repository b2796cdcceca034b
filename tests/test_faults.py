"""Faults that must be one-line errors, never silent corruption or a crash: non-finite and
overflowing tensors on every write path, non-UTF-8 safetensors headers, the open-file limit,
markup in user text, misbehaving evaluator plug-ins and malformed manifests."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from soup.engine import kernel
from soup.cli import app, main
from soup.engine.combine import Combiner
from soup.errors import CheckpointError, EvaluatorError, SoupError
from soup.soups.evaluate import Candidate, Evaluator, run_evaluator
from soup.engine.plan import Job
from soup.progress import RichReporter
from soup.finish.report import format_report

from conftest import load_soup, make_state, reference_mean, write_checkpoint

runner = CliRunner()


def _one_error_line(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


# --- non-finite values and overflow, on every path that writes tensors -----------------------------


def _pair(tmp_path, dtype=torch.float32, norm=None, norms=None):
    """Two ingredients; ``norm`` (if given) fills both ingredients' model.norm.weight (``norms``: one value each)."""
    paths = []
    for i in range(2):
        st = make_state(i, dtype, big=2000)
        if norm is not None or norms is not None:
            st["model.norm.weight"] = torch.full((24,), norm if norms is None else norms[i], dtype=dtype)
        paths.append(write_checkpoint(tmp_path / f"ing{i}", st))
    return paths


@pytest.fixture
def cast_checks(monkeypatch):
    """Counts the overflow checks of a mean's cast that found an overflow (``Combiner._cast_overflow``):
    ingredients that differ are averaged, so the check itself is reached, not the shortcut that writes
    a tensor identical in every ingredient as it is (and reports its overflow in the same words)."""
    calls = []
    check = Combiner._cast_overflow

    def counted(self, *args, **kwargs):
        calls.append(args[0].name)
        return check(self, *args, **kwargs)

    monkeypatch.setattr(Combiner, "_cast_overflow", counted)
    return calls


def test_mean_overflowing_the_output_dtype_is_an_error(tmp_path, cast_checks):
    a, b = _pair(tmp_path, norms=(1e6, 2e6))  # fine in float32; their mean is inf in float16
    res = runner.invoke(app, ["merge", str(a), str(b), "-o", str(tmp_path / "out"), "--dtype", "float16", "-q"])
    line = _one_error_line(res)
    assert ("tensor model.norm.weight: the weighted mean overflows float16 (max 65504) at flat index 0 "
            "(value 1.5e+06)") in line
    assert cast_checks == ["model.norm.weight"] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("fused", [True, False])
def test_bfloat16_cast_rounding_up_to_inf_is_caught(fused, cast_checks):
    if fused and kernel.load() is None:
        pytest.skip("no C compiler here: no fused kernel")
    # finite in float32, but above bfloat16's max + half an ulp: the cast rounds it to inf
    xs = [torch.full((1000,), 3.4e38), torch.full((1000,), 3.398e38)]
    xs[0][:500] = 1.0
    xs[1][:500] = 2.0
    comb = Combiner(["a", "b"], where=lambda i, name: f"file{i}")
    if not fused:
        comb._fused = None
    assert (comb._fused is not None) == fused
    with pytest.raises(CheckpointError, match=r"tensor t: the weighted mean overflows bfloat16 .* at flat index 500 "
                                              r"\(value 3\.399e\+38\)"):
        list(comb.blocks(Job("t", (1000,), "mean", torch.bfloat16, weights=(0.5, 0.5)), xs))
    assert cast_checks == ["t"]


def test_mean_overflowing_the_accumulator_names_the_weights():
    xs = [torch.full((10,), 3e38, dtype=torch.bfloat16)] * 2
    comb = Combiner(["a", "b"], where=lambda i, name: f"file{i}")
    with pytest.raises(CheckpointError, match=r"tensor t: the weighted mean overflows float32 .* at flat index 0 "
                                              r"\(weights sum to 6\)"):
        list(comb.blocks(Job("t", (10,), "mean", torch.bfloat16, weights=(3.0, 3.0)), xs))


@pytest.mark.parametrize("how", [["--rule", "model.norm.weight=take:1"], ["--weights", "0,1"]],
                         ids=["take-rule", "one-hot-weights"])
def test_take_of_a_non_finite_value_is_an_error(tmp_path, how):
    paths = []
    for i in range(2):
        st = make_state(i, big=2000)
        if i == 1:
            st["model.norm.weight"][3] = float("nan")
        paths.append(write_checkpoint(tmp_path / f"ing{i}", st))
    res = runner.invoke(app, ["merge", *map(str, paths), "-o", str(tmp_path / "out"), "-q", *how])
    line = _one_error_line(res)
    assert (f"{paths[1] / 'model.safetensors'}: tensor model.norm.weight: non-finite value nan at flat index 3 "
            f"(ingredient ing1)") in line
    assert not (tmp_path / "out").exists()


def test_take_overflowing_the_output_dtype_is_an_error(tmp_path):
    a, b = _pair(tmp_path, norm=1e6)
    res = runner.invoke(app, ["merge", str(a), str(b), "-o", str(tmp_path / "out"), "--dtype", "float16", "-q",
                              "--rule", "model.norm.weight=take:0"])
    line = _one_error_line(res)
    assert ("tensor model.norm.weight: value 1e+06 at flat index 0 overflows float16 (max 65504) "
            "(ingredient ing0)") in line


@pytest.mark.parametrize("dtype,big", [(torch.float16, 60000.0), (torch.bfloat16, 3.3e38), (torch.float32, 3.4e38)])
def test_large_finite_values_are_not_errors(tmp_path, dtype, big):
    """Sums of these blocks overflow; the values do not: the cheap test must not cry wolf."""
    states = []
    for i in range(2):
        st = make_state(i, dtype, big=2000)
        st["model.layers.0.mlp.up_proj.weight"] = torch.full_like(st["model.layers.0.mlp.up_proj.weight"], big)
        st["model.norm.weight"] = torch.full((24,), -big, dtype=dtype)
        write_checkpoint(tmp_path / f"ing{i}", st)
        states.append(st)
    for name, extra in (("mean", []), ("take", ["--weights", "1,0"])):
        res = runner.invoke(app, ["merge", str(tmp_path / "ing0"), str(tmp_path / "ing1"), "-q",
                                  "-o", str(tmp_path / name), *extra])
        assert res.exit_code == 0, res.output
        got = load_soup(tmp_path / name)
        ref = reference_mean(states, [0.5, 0.5] if name == "mean" else [1.0, 0.0])
        assert all(torch.equal(got[k], ref[k]) for k in ref)


# --- safetensors headers must be UTF-8 --------------------------------------------------------------


def test_utf16_header_is_refused(tmp_path):
    folder = write_checkpoint(tmp_path / "ing", {"w": torch.ones(4)})
    f = folder / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    utf16 = json.dumps(header).encode("utf-16")
    assert json.loads(utf16) == header  # json.loads(bytes) would accept it: the check must be explicit
    f.write_bytes(struct.pack("<Q", len(utf16)) + utf16 + raw[8 + n:])
    res = runner.invoke(app, ["inspect", str(folder)])
    assert f"{f}: safetensors header is not valid UTF-8" in _one_error_line(res)


def test_utf8_header_with_non_ascii_names_is_read(tmp_path):
    folder = write_checkpoint(tmp_path / "ing", {"modèle.poids": torch.ones(4), "層.w": torch.zeros(2)})
    res = runner.invoke(app, ["inspect", str(folder)])
    assert res.exit_code == 0, res.output


# --- the open-file limit ----------------------------------------------------------------------------

CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))
sys.argv = ["soup", "merge", *sys.argv[1:]]
from soup.cli import main
main()
"""


def test_24_ingredients_of_48_shards_merge_under_ulimit_512(tmp_path):
    """A mapping keeps its file descriptor: one per shard would be 1152 open files."""
    g = torch.Generator().manual_seed(0)
    shape = {f"model.layers.{k}.weight": (8, 4) for k in range(47)}
    states, paths = [], []
    for i in range(24):
        st = {name: torch.randn(s, generator=g).to(torch.bfloat16) for name, s in shape.items()}
        st["model.position_ids"] = torch.arange(6)
        states.append(st)
        paths.append(write_checkpoint(tmp_path / f"ing{i:02d}", st, shards=48))
    assert len(list(paths[0].glob("*.safetensors"))) == 48
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-c", CHILD, *map(str, paths), "-o", str(out), "-q"],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    got = load_soup(out)
    ref = reference_mean(states, [1.0 / 24] * 24)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


# --- user text is printed literally -----------------------------------------------------------------

USER_TEXT = "runs/:fire:/[red]x[/red] take:-1 :smile:"


def test_progress_prints_user_text_literally(capsys):
    rep = RichReporter()
    rep.step(f"step {USER_TEXT}")
    rep.warn(f"warn {USER_TEXT}")
    with rep.bytes_task(f"bar {USER_TEXT}", 10) as advance:
        advance(10)
    err = capsys.readouterr().err
    for prefix in ("soup step", "warning: warn", "bar"):
        assert f"{prefix} {USER_TEXT}" in err, err
    assert "\N{FIRE}" not in err and "\N{SMILING FACE WITH SMILING EYES}" not in err


def test_merge_warning_prints_a_rule_literally(tmp_path):
    a, b = _pair(tmp_path)
    rule = "[red]:fire:*=drop"
    res = runner.invoke(app, ["merge", str(a), str(b), "-o", str(tmp_path / "out"), "--rule", rule])
    assert res.exit_code == 0, res.output
    assert f"rule {rule} matched no tensor" in res.stderr, res.stderr


# --- evaluator plug-ins that misbehave -----------------------------------------------------------------

PLUGINS = '''
import os, sys
from soup.soups.evaluate import Evaluator

class Exits(Evaluator):
    def score(self, candidate):
        sys.exit(0)

class ReturnsTrue(Evaluator):
    def score(self, candidate):
        return True

class ReturnsText(Evaluator):
    def score(self, candidate):
        return "0.5"

class Leaks(Evaluator):
    def score(self, candidate):
        raise RuntimeError("cannot reach the hub with token " + os.environ["HF_TOKEN"])
'''


def _run_with(tmp_path, evaluator: str):
    for i in range(2):
        write_checkpoint(tmp_path / f"ft{i}", make_state(i, big=2000))
    (tmp_path / "plugins.py").write_text(PLUGINS)
    (tmp_path / "r.yaml").write_text(f"ingredients: [ft0, ft1]\nstrategy: maximum\n"
                                     f"evaluator: {{name: ./plugins.py:{evaluator}}}\noutput: out\ncache: false\n")
    res = runner.invoke(app, ["run", str(tmp_path / "r.yaml"), "-q"])
    assert not (tmp_path / "out").exists()
    return res


def test_evaluator_calling_sys_exit_is_an_error(tmp_path):
    line = _one_error_line(_run_with(tmp_path, "Exits"))
    assert "evaluator Exits called sys.exit(0) while scoring" in line and "ft0" in line


@pytest.mark.parametrize("plugin,shown", [("ReturnsTrue", "True"), ("ReturnsText", "'0.5'")])
def test_evaluator_returning_a_bool_or_text_is_an_error(tmp_path, plugin, shown):
    line = _one_error_line(_run_with(tmp_path, plugin))
    assert f"evaluator {plugin} returned {shown} (score) for" in line and "ft0" in line
    assert "a score must be a number" in line


def test_evaluator_errors_never_show_the_token(tmp_path, monkeypatch):
    token = "hf_PluginSawThisToken_4242"
    monkeypatch.setenv("HF_TOKEN", token)
    res = _run_with(tmp_path, "Leaks")
    line = _one_error_line(res)
    assert "evaluator Leaks failed on" in line and "RuntimeError: cannot reach the hub with token ***" in line
    assert token not in res.output


class _Returns(Evaluator):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def score(self, candidate):
        return self.value


@pytest.mark.parametrize("value", [1, 0.25, torch.tensor(0.5), torch.tensor([0.5])])
def test_numbers_of_any_kind_are_scores(value):
    score = run_evaluator(_Returns(value), Candidate.from_state_dict("c", {"w": torch.zeros(1)}))
    assert score.value == float(value)


@pytest.mark.parametrize("value", [False, b"1", torch.tensor(True), {"acc": True}, torch.ones(3)])
def test_non_numbers_are_refused(value):
    with pytest.raises(EvaluatorError, match="evaluator _Returns returned .* for c"):
        run_evaluator(_Returns(value), Candidate.from_state_dict("c", {"w": torch.zeros(1)}))


# --- soup report on a manifest of the wrong shape ------------------------------------------------------


@pytest.mark.parametrize("manifest,why", [
    ([1, 2], "expected a JSON object, got a list"),
    ({"soup_version": "1", "ingredients": 5}, "ingredients: expected a list, got a number"),
    ({"soup_version": "1", "evaluation": "x"}, "evaluation: expected an object, got a string"),
    ({"soup_version": "1", "ingredients": [{"weight": 1}]}, "ingredients[0]: expected an object with a name"),
    ({"soup_version": "1", "evaluation": {"trajectory": [{"step": 1}]}}, "evaluation.trajectory[0]: expected"),
    ({"soup_version": "1", "total_size": "big"}, "total_size: expected a number, got a string"),
])
def test_report_on_a_malformed_manifest_is_one_line(tmp_path, monkeypatch, capsys, manifest, why):
    (tmp_path / "soup").mkdir()
    (tmp_path / "soup" / "soup.json").write_text(json.dumps(manifest))
    with pytest.raises(SoupError, match=f"not a soup manifest \\({__import__('re').escape(why)}"):
        format_report(manifest)
    monkeypatch.setattr(sys, "argv", ["soup", "report", str(tmp_path / "soup")])
    with pytest.raises(SystemExit) as exc:  # the console script, as a user runs it
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and len(err) == 1 and "not a soup manifest" in err[0] and why in err[0], err


def test_report_names_the_manifest_when_told():
    with pytest.raises(SoupError, match=r"^runs/x/soup.json: not a soup manifest \(ingredients: expected a list"):
        format_report({"ingredients": {}}, where="runs/x/soup.json")
