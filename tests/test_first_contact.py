"""What a new user meets first (issue 24): `validate` = `run` up to evaluation, honest cards and numbers,
a CLI that behaves like its neighbours (typer, hf), and the conventions of the tools soup sits beside."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from soup.cli import app

from conftest import make_state, write_checkpoint

runner = CliRunner()

EVALUATOR = ("from soup.soups.evaluate import Evaluator\n"
             "class E(Evaluator):\n"
             "    def __init__(self, *, target: float = 0.0):\n"
             "        super().__init__(target=target)\n"
             "    def score(self, candidate):\n"
             "        return 1.0\n")


# ---- 1. `soup validate` refuses what `soup run` refuses, with the same line ----------------------------
def _kitchen(tmp_path: Path) -> Path:
    """Two compatible ingredients, one incompatible, an evaluator file, data, and a file where a folder should be."""
    write_checkpoint(tmp_path / "a", make_state(1, big=600))
    write_checkpoint(tmp_path / "b", make_state(2, big=600))
    odd = make_state(3, big=600)
    odd["model.norm.weight"] = torch.zeros(25, dtype=torch.bfloat16)
    write_checkpoint(tmp_path / "odd", odd)
    (tmp_path / "ev.py").write_text(EVALUATOR)
    (tmp_path / "val.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "afile").write_text("not a folder")
    return tmp_path


GOOD = {"ingredients": ["a", "b"], "strategy": "greedy", "evaluator": {"name": "./ev.py:E"}, "output": "out",
        "cache": "scores.sqlite"}

BAD_RECIPES = {  # what a new user tried: each is one mistake that `soup run` refuses before evaluating
    "misspelt evaluator": ({"evaluator": {"name": "perplexty", "args": {"data": "./val.jsonl"}}},
                           "evaluator: unknown evaluator 'perplexty'"),
    "misspelt test evaluator": ({"test": {"name": "tabel", "args": {"path": "./s.csv"}}},
                                "test: unknown evaluator 'tabel'"),
    "unknown evaluator argument": ({"evaluator": {"name": "./ev.py:E", "args": {"targett": 1}}},
                                   "evaluator: evaluator E: unknown argument 'targett' (did you mean 'target'?)"),
    "evaluator data file missing": ({"evaluator": {"name": "perplexity", "args": {"data": "./missing.jsonl"}}},
                                    "evaluator: perplexity data file not found: "),
    "evaluator file missing": ({"evaluator": {"name": "./nope.py:E"}}, "evaluator: evaluator file not found: "),
    "evaluator class missing": ({"evaluator": {"name": "./ev.py:Nope"}}, "has no attribute 'Nope'"),
    "ingredient path missing": ({"ingredients": ["a", "missing"]}, "missing: no such file or folder"),
    "incompatible ingredients": ({"ingredients": ["a", "odd"]}, "model.norm.weight: shape [24] in a but [25] in odd"),
    "unusable cache URL": ({"cache": "nosuchdb://host/scores"}, "score cache nosuchdb://host/scores: "),
    "output under a file": ({"output": "afile/out"}, "is a file, not a folder"),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_validate_refuses_what_run_refuses_with_the_same_line(tmp_path, case):
    change, needle = BAD_RECIPES[case]
    kitchen = _kitchen(tmp_path)
    recipe = kitchen / "r.yaml"
    recipe.write_text(yaml.safe_dump({**GOOD, **change}))
    checked = runner.invoke(app, ["validate", str(recipe)])
    ran = runner.invoke(app, ["run", str(recipe), "-q"])
    assert "Traceback" not in checked.output + ran.output
    assert (checked.exit_code, ran.exit_code) == (1, 1), (checked.output, ran.output)
    said = [line.removeprefix(f"{recipe}: ") for line in checked.stderr.splitlines()]
    refused = ran.stderr.splitlines()[0].removeprefix("error: ")
    assert said == [refused], (said, refused)  # one problem, in the words run uses
    assert needle in refused, (needle, refused)
    assert not (kitchen / "out").exists() and not (kitchen / "afile" / "out").exists()


def test_a_recipe_that_validates_runs(tmp_path):
    kitchen = _kitchen(tmp_path)
    (kitchen / "r.yaml").write_text(yaml.safe_dump(GOOD))
    checked = runner.invoke(app, ["validate", str(kitchen / "r.yaml")])
    assert checked.exit_code == 0 and checked.stdout.strip() == f"{kitchen / 'r.yaml'}: ok", checked.output
    assert not (kitchen / "scores.sqlite").exists()  # validate creates nothing
    ran = runner.invoke(app, ["run", str(kitchen / "r.yaml"), "-q"])
    assert ran.exit_code == 0, ran.output


def test_validate_lists_every_problem_run_would_meet(tmp_path):
    kitchen = _kitchen(tmp_path)
    (kitchen / "r.yaml").write_text(yaml.safe_dump({**GOOD, "ingredients": ["a", "missing"], "cache": "x://",
                                                    "evaluator": {"name": "./ev.py:E", "args": {"targett": 1}},
                                                    "test": {"name": "tabel"}}))
    checked = runner.invoke(app, ["validate", str(kitchen / "r.yaml")])
    lines = [line.removeprefix(f"{kitchen / 'r.yaml'}: ") for line in checked.stderr.splitlines()]
    assert checked.exit_code == 1 and len(lines) == 4, lines
    assert [line.split(":")[0] for line in lines[1:3]] == ["evaluator", "test"], lines
    ran = runner.invoke(app, ["run", str(kitchen / "r.yaml"), "-q"])
    assert ran.exit_code == 1 and ran.stderr.splitlines() == [f"error: {lines[0]}"]


# ---- 2. a steady, honest suite -----------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("ci", ["", "1"])
def test_kernel_tests_fail_under_ci_when_the_kernel_was_not_built(tmp_path, ci):
    """As PostgreSQL's: a kernel that failed to build skips its tests on a laptop and fails them in CI."""
    import os
    import subprocess
    import sys

    (tmp_path / "unbuilt_kernel.py").write_text(  # a pytest plug-in: the kernel as a failed build leaves it
        "def pytest_configure(config):\n    import soup.engine.kernel as k\n    k._opened = None\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "SOUP_NO_KERNEL", "PYTEST_ADDOPTS")}
    env.update(CI=ci, PYTHONPATH=os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "unbuilt_kernel", "-p", "no:cacheprovider",
                          "-p", "no:randomly", "tests/test_kernel.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    summary = res.stdout.strip().splitlines()[-1]
    if ci:
        assert res.returncode == 1 and "error" in summary and "skipped" not in summary, res.stdout[-2000:]
        assert "must not be skipped in CI" in res.stdout
    else:
        assert res.returncode == 0 and "skipped" in summary and "failed" not in summary, res.stdout[-2000:]


def test_third_party_progress_bars_are_off_in_tests():
    import tqdm
    import transformers.utils.logging as tf_logging
    from huggingface_hub.utils import are_progress_bars_disabled

    assert are_progress_bars_disabled() and not tf_logging.is_progress_bar_enabled()
    assert tf_logging.get_verbosity() >= tf_logging.ERROR
    assert tqdm.tqdm(range(3)).disable  # TQDM_DISABLE: every plain tqdm bar too


def test_the_dev_extra_runs_the_suite_in_random_order_with_every_sampler():
    import tomllib

    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    names = {d.split("[")[0].split(">")[0].split("=")[0].strip() for d in dev}
    assert {"pytest-randomly", "cmaes", "pytest"} <= names, names


# ---- 3. model cards that tell the hub the truth; a CLI merge that can be made again --------------------
def _front(folder: Path) -> dict:
    return yaml.safe_load((folder / "README.md").read_text().split("---")[1])


def test_card_names_as_base_models_only_the_ingredients_in_the_soup(hub, hf_isolated, tmp_path):
    from soup.hub import push

    for i, name in enumerate("abc"):
        push(write_checkpoint(tmp_path / "src" / name, make_state(i, big=600)), f"acme/{name}", endpoint=hub.url)
    out = tmp_path / "soup"
    res = runner.invoke(app, ["merge", "hf://acme/a", "hf://acme/b", "hf://acme/c", "--weights", "1,1,0",
                              "-o", str(out), "-q", "--endpoint", hub.url])
    assert res.exit_code == 0, res.output
    front = _front(out)
    assert front["base_model"] == ["acme/a", "acme/b"] and front["base_model_relation"] == "merge"  # not c: weight 0
    assert front["library_name"] == "transformers" and "model-soup" in front["tags"]


def _lora(folder: Path, seed: int, base: str = "acme/base-7b") -> Path:
    """A PEFT LoRA adapter folder as peft writes it (config + safetensors), rank 2 on one module."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": base, "r": 2, "lora_alpha": 4,
        "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(2, 8, generator=g),
               "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(8, 2, generator=g)},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def test_adapter_soup_card_is_a_peft_adapter_of_the_base_model(tmp_path):
    ads = [_lora(tmp_path / f"lora{i}", i) for i in range(2)]
    res = runner.invoke(app, ["merge", *map(str, ads), "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    front = _front(tmp_path / "out")
    assert front["library_name"] == "peft"
    assert front["base_model"] == "acme/base-7b" and front["base_model_relation"] == "adapter"


def test_cli_merge_records_its_recipe_and_soup_run_of_it_makes_the_same_bytes(make_ingredients, tmp_path):
    paths, _ = make_ingredients(3)
    out = tmp_path / "cli"
    res = runner.invoke(app, ["merge", *map(str, paths), "-o", str(out), "-q", "--weights", "1,3,0",
                              "--dtype", "float32", "--rule", "model.norm.weight=take:1", "--shard-size", "40KB"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "soup.json").read_text())
    recipe = manifest["recipe"]
    assert recipe["strategy"] == {"name": "average", "weights": [1.0, 3.0, 0.0]} and recipe["dtype"] == "float32"
    assert recipe["ingredients"] == [str(p) for p in paths] and recipe["output"] == str(out)
    assert manifest["method"]["name"] == "weighted"  # what a merge without a recipe calls itself
    assert "## Reproduce" in (out / "README.md").read_text() and "model.norm.weight=take:1" in \
        (out / "README.md").read_text()
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(recipe))
    again = runner.invoke(app, ["run", str(tmp_path / "again.yaml"), "-o", str(tmp_path / "again"), "-q"])
    assert again.exit_code == 0, again.output
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(p.name for p in (tmp_path / "again").glob("*.safetensors"))
    for name in [*shards, "model.safetensors.index.json"]:
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


# ---- 4. a CLI with its neighbours' habits ------------------------------------------------------------
@pytest.mark.parametrize("args, env", [(["--debug", "inspect", "MISSING"], {}), (["inspect", "MISSING", "--debug"], {}),
                                       (["inspect", "MISSING"], {"SOUP_DEBUG": "1"})])
def test_debug_before_or_after_the_subcommand_or_in_the_environment(tmp_path, args, env):
    from soup.errors import CheckpointError

    args = [str(tmp_path / a) if a == "MISSING" else a for a in args]
    res = runner.invoke(app, args, env=env)
    assert res.exit_code == 1 and isinstance(res.exception, CheckpointError), res.output  # the traceback's
    res = runner.invoke(app, ["inspect", str(tmp_path / "MISSING")])  # and only for that command
    assert res.exit_code == 1 and res.stderr.startswith("error: ") and not isinstance(res.exception, CheckpointError)


def test_quiet_before_the_subcommand_and_version(make_ingredients, tmp_path):
    from soup.merging import soup_version

    paths, _ = make_ingredients(2)
    res = runner.invoke(app, ["-q", "merge", *map(str, paths), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0 and res.stderr == "", res.output
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout == f"soup {soup_version()}\n"


def test_one_style_per_class_of_error(make_ingredients, tmp_path):
    paths, _ = make_ingredients(2)
    merge = ["merge", *map(str, paths), "-o", str(tmp_path / "out")]
    usage = runner.invoke(app, [*merge, "--weights", "a,b"])
    soup_error = runner.invoke(app, [*merge, "--weights", "1,2,3"])
    assert (usage.exit_code, soup_error.exit_code) == (2, 1)
    assert usage.stderr.splitlines() == ["error: --weights: 'a' is not a number (index 0) (see: soup merge --help)"]
    assert soup_error.stderr.splitlines() == ["error: --weights: 3 weights given for 2 ingredients"]


def test_run_quiet_prints_only_the_output_path(tmp_path):
    kitchen = _kitchen(tmp_path)
    (kitchen / "r.yaml").write_text(yaml.safe_dump(GOOD))
    res = runner.invoke(app, ["run", str(kitchen / "r.yaml"), "-q"])
    assert res.exit_code == 0 and res.stdout == f"{kitchen / 'out'}\n" and res.stderr == "", res.output


def test_help_is_readable_at_80_columns():
    for command in ("merge", "run", "validate", "inspect", "demo"):
        res = runner.invoke(app, [command, "--help"], terminal_width=80)
        assert res.exit_code == 0, res.output
        lines = res.stdout.splitlines()
        assert max(map(len, lines)) <= 80, [line for line in lines if len(line) > 80]
        assert "<str>" not in res.stdout and "{" not in lines[0] and "│" not in res.stdout, res.stdout[:400]
    res = runner.invoke(app, ["merge", "--help"], terminal_width=80)
    assert res.stdout.startswith("Usage: soup merge [OPTIONS] INGREDIENTS...")
    assert "--weights WEIGHTS" in res.stdout and "--method NAME" in res.stdout


def test_progress_bars_finish_at_100_percent_on_success():
    import io

    from rich.console import Console

    from soup.progress import RichReporter

    rep = RichReporter()
    rep.console = Console(file=io.StringIO(), width=100)
    with rep.bytes_task("souping 2 adapter(s)", 1000) as advance:
        advance(290)  # the bytes counted fall short of the estimate
    assert "100%" in rep.console.file.getvalue() and "29%" not in rep.console.file.getvalue()


def test_hub_ids_without_an_owner_are_accepted():
    from soup.hub.specs import parse_hub_spec
    from soup.recipe import parse_recipe

    assert parse_hub_spec("hf://gpt2@main") == ("gpt2", "main")
    r = parse_recipe({"ingredients": ["hf://gpt2", {"repo": "distilgpt2", "revision": "main"}], "strategy": "average"})
    assert r.ingredients == ["hf://gpt2", "hf://distilgpt2@main"]


def test_a_refused_pickle_is_soups_own_line(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"w": torch.zeros(2), "x": Evil()}, tmp_path / "evil.pt")
    res = runner.invoke(app, ["inspect", str(tmp_path / "evil.pt")])
    assert res.exit_code == 1 and "weights_only" in res.stderr
    assert res.stderr.splitlines() == [f"error: {tmp_path / 'evil.pt'}: refused: unpickling it would call "
                                       f"{os.system.__module__}.system, which weights_only loading does not allow "
                                       "(soup never runs code from a checkpoint)"]
    assert "False" not in res.stderr and "Re-running" not in res.stderr


# ---- 6. the conventions of the tools soup sits beside ------------------------------------------------
def test_hub_options_and_push_are_public_beside_the_cli():
    import soup
    import soup.hub.upload
    from soup.hub import HubOptions

    assert soup.HubOptions is HubOptions and HubOptions(endpoint="http://x").endpoint == "http://x"
    assert soup.push is soup.hub.upload.push and {"push", "HubOptions"} <= set(soup.__all__)


def test_folder_registry_leaves_a_fine_tune_still_being_written_for_the_next_tick(tmp_path):
    for name in ("a", "b"):
        write_checkpoint(tmp_path / "runs" / name / "final", make_state(ord(name), big=600))
    write_checkpoint(tmp_path / "runs" / "c" / "final", make_state(3, big=600), shards=2)
    (tmp_path / "runs" / "c" / "final" / "model-00002-of-00002.safetensors").unlink()  # the last shard: not yet
    write_checkpoint(tmp_path / "runs" / "d" / "final", make_state(4, big=600))
    (tmp_path / "runs" / "d" / "final" / "config.json").unlink()  # saved last by HF's save_pretrained
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "ingredients": [{"registry": "folder", "glob": "runs/*/final"}], "strategy": "average",
        "output": "out", "cache": False}))
    res = runner.invoke(app, ["run", str(tmp_path / "r.yaml"), "-q"])
    assert res.exit_code == 0, res.output
    warnings = res.stderr.splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: ingredients[0]: ") for w in warnings), warnings
    assert "runs/c/final: model.safetensors.index.json names model-00002-of-00002.safetensors" in warnings[0]
    assert "runs/d/final: no config.json yet" in warnings[1]
    assert [i["name"] for i in json.loads((tmp_path / "out" / "soup.json").read_text())["ingredients"]] == ["a", "b"]


def test_folder_registry_waits_out_a_weight_file_that_is_growing(tmp_path, monkeypatch, capsys):
    import soup.registry.folder as folder
    from soup.registry.base import Context

    for name in ("a", "b"):
        write_checkpoint(tmp_path / "runs" / name / "final", make_state(ord(name), big=600))
    growing = tmp_path / "runs" / "b" / "final" / "model.safetensors"
    monkeypatch.setattr(folder.time, "sleep", lambda s: growing.write_bytes(growing.read_bytes() + b" "))
    query = folder.FolderQuery(where="ingredients[0]", glob="runs/*/final", base=tmp_path)
    assert [p.label for p in query.resolve(Context())] == ["a"]
    assert capsys.readouterr().err.splitlines() == [
        f"warning: ingredients[0]: {growing.parent}: its weights are still changing: still being written? left "
        "for the next run"]


# ---- 5. numbers that say what they are ---------------------------------------------------------------
def test_plot_axes_say_what_the_scores_are(make_ingredients, tmp_path):
    pytest.importorskip("matplotlib")
    import soup
    from soup.finish.report import make_figure

    paths, _ = make_ingredients(3)

    def closeness(candidate):  # higher is better
        return -float(candidate.state_dict("cpu")["model.norm.weight"].float().abs().mean())

    res = soup.greedy_soup(paths, evaluator=closeness, test_evaluator=closeness, out=tmp_path / "out", cache=None)
    fig = make_figure(res.manifest)
    labels = [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]
    assert len(labels) == 3 and all(x and y for x, y in labels), labels
    assert all(y == "python score (higher is better)" for _, y in labels), labels


def test_the_output_lock_imports_where_fcntl_does_not_exist():
    """Windows has no fcntl: the output lock (and so every merge) must not need it (soup.locks: msvcrt there)."""
    import subprocess
    import sys

    code = "import sys; sys.modules['fcntl'] = None; import soup.engine.output; import soup.merging"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-1000:]
