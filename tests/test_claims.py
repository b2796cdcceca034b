"""Claims proven against the real thing (issue 23): the non-finite guards of the LoRA-pair and adapter
paths, ``--device cuda`` without CUDA, a local ``soup merge`` that never imports huggingface_hub (and the
two hub pieces soup now does itself, checked against the hub's own), MLflow webhooks delivered by
mlflow's own sender to soup's receiver, and MLflow ``aliases:`` queries against a real ``mlflow server``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from soup.cli import app

runner = CliRunner()

PAIR_A, PAIR_B = "layer.adapter.lora_A.weight", "layer.adapter.lora_B.weight"
AD_A, AD_B = "base_model.model.layer.lin.lora_A.weight", "base_model.model.layer.lin.lora_B.weight"


def _pair_checkpoints(root: Path, bad: str, value: float) -> list[Path]:
    """Two full checkpoints holding a LoRA pair (A: (3, 5), B: (6, 3)); ``bad`` of the second holds ``value``."""
    folders = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        state = {"layer.w": torch.randn(6, 5, generator=g), PAIR_A: torch.randn(3, 5, generator=g),
                 PAIR_B: torch.randn(6, 3, generator=g)}
        if i == 1:
            state[bad][1, 2] = value
        (root / f"m{i}").mkdir()
        save_file(state, str(root / f"m{i}" / "model.safetensors"))
        folders.append(root / f"m{i}")
    return folders


def _adapters(root: Path, bad: str, value: float) -> tuple[list[Path], Path]:
    """Two PEFT LoRA adapter folders (rank 2 on layer.lin) and their base; ``bad`` of the second holds ``value``."""
    (root / "base").mkdir()
    save_file({"layer.lin.weight": torch.randn(6, 5), "other": torch.randn(3)},
              str(root / "base" / "model.safetensors"))
    folders = []
    for i in range(2):
        g = torch.Generator().manual_seed(10 + i)
        state = {AD_A: torch.randn(2, 5, generator=g), AD_B: torch.randn(6, 2, generator=g)}
        if i == 1:
            state[bad][0, 1] = value
        d = root / f"a{i}"
        d.mkdir()
        save_file(state, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                          "task_type": "CAUSAL_LM"}))
        folders.append(d)
    return folders, root / "base"


# ---- non-finite guards ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["exact", "svd"])
@pytest.mark.parametrize("bad,value", [(PAIR_A, float("nan")), (PAIR_B, float("inf"))])
def test_lora_pair_with_a_non_finite_factor_is_one_line_naming_it(tmp_path, mode, bad, value):
    folders = _pair_checkpoints(tmp_path, bad, value)
    out = tmp_path / "out"
    res = runner.invoke(app, ["merge", *map(str, folders), "-o", str(out), "-q",
                              "--lora-pair", "*.lora_A.weight=*.lora_B.weight", "--pair-mode", mode])
    assert res.exit_code == 1, (res.output, res.exception)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {folders[1] / 'model.safetensors'}: tensor {bad}: non-finite value"], res.stderr
    assert "Traceback" not in res.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m0", "m1"]


@pytest.mark.parametrize("extra", [[], ["--rank", "1"], ["--merge-into", "BASE"]], ids=["concat", "svd", "merge_into"])
@pytest.mark.parametrize("bad,value", [(AD_A, float("inf")), (AD_B, float("nan"))])
def test_adapter_with_a_non_finite_factor_is_one_line_naming_it(tmp_path, extra, bad, value):
    folders, base = _adapters(tmp_path, bad, value)
    out = tmp_path / "out"
    extra = [str(base) if x == "BASE" else x for x in extra]
    res = runner.invoke(app, ["merge", *map(str, folders), "-o", str(out), "-q", *extra])
    assert res.exit_code == 1, (res.output, res.exception)
    assert res.stderr.splitlines() == [
        f"error: {folders[1] / 'adapter_model.safetensors'}: tensor {bad}: non-finite value (adapter a1)"]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a0", "a1", "base"]


# ---- --device cuda without CUDA -------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("kind", ["folders", "adapters"])
def test_device_cuda_without_cuda_is_one_line_before_any_reading(tmp_path, kind):
    if kind == "folders":
        folders = _pair_checkpoints(tmp_path, PAIR_A, 1.0)
        (folders[1] / "model.safetensors").write_bytes(b"\xff" * 64)  # unreadable: reading it would fail first
    else:
        folders, _ = _adapters(tmp_path, AD_A, 1.0)
        (folders[1] / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    out = tmp_path / "out"
    res = runner.invoke(app, ["merge", *map(str, folders), "-o", str(out), "--device", "cuda"])
    assert res.exit_code == 1, (res.output, res.exception)
    assert res.stderr.splitlines() == ["error: device cuda: no CUDA device is available here (use --device cpu)"]
    assert not out.exists()


# ---- a local merge does not import the hub client -------------------------------------------------------

_IN_PROCESS = """
import json, sys
from soup.cli import main
sys.argv = ["soup", "merge", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "hub": sorted(m for m in sys.modules if m.split(".")[0] == "huggingface_hub")}))
"""


def test_a_local_merge_does_not_import_huggingface_hub(tmp_path):
    folders = _pair_checkpoints(tmp_path, PAIR_A, 1.0)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    res = subprocess.run([sys.executable, "-c", _IN_PROCESS, *map(str, folders), "-o", str(out), "-q",
                          "--shard-size", "100"], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"code": 0, "hub": []}, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model-00001-of-00003.safetensors",
                                                    "model-00002-of-00003.safetensors",
                                                    "model-00003-of-00003.safetensors",
                                                    "model.safetensors.index.json", "soup.json"]


def test_shard_plan_is_huggingface_hubs_split():
    """soup plans shards itself (no hub import): the same files and order as the hub's splitter."""
    from huggingface_hub import split_state_dict_into_shards_factory

    from soup.engine.plan import Job
    from soup.engine.writer import plan_shards

    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = int(torch.randint(0, 12, (1,), generator=g))
        sizes = [int(s) for s in torch.randint(1, 40, (n,), generator=g)]
        limit = int(torch.randint(1, 60, (1,), generator=g))
        jobs = [Job(f"t{i}", (s,), "mean", torch.uint8) for i, s in enumerate(sizes)]
        assert [j.nbytes for j in jobs] == sizes
        hub = split_state_dict_into_shards_factory({j.name: j for j in jobs}, get_storage_size=lambda j: j.nbytes,
                                                   filename_pattern="model{suffix}.safetensors", max_shard_size=limit)
        ours = plan_shards(jobs, limit) if jobs else {}
        assert {f: [j.name for j in js] for f, js in ours.items()} == hub.filename_to_tensors, (sizes, limit)
        assert list(ours) == list(hub.filename_to_tensors)


@pytest.mark.parametrize("kwargs", [
    dict(library_name="transformers", base_model=None, base_model_relation=None,
         tags=["merge", "model-soup", "soup-average"]),
    dict(library_name="transformers", base_model=["acme/a", "acme/b"], base_model_relation="merge",
         tags=["merge", "model-soup", "soup-greedy", "merge"]),
    dict(library_name="peft", base_model="acme/base", base_model_relation="adapter", tags=["merge", "soup-ünïcode"]),
    dict(library_name="peft", base_model=None, base_model_relation=None, tags=["merge"]),
])
def test_card_front_matter_is_what_model_card_data_writes(kwargs):
    """The card's front matter, built without the hub client, byte for byte huggingface_hub's ModelCardData."""
    from huggingface_hub import ModelCardData

    from soup.finish.card import _card_data, _card_yaml

    assert _card_yaml(_card_data(**kwargs)) == ModelCardData(**kwargs).to_yaml()


# ---- MLflow: webhooks from a real server, aliases: queries against it -------------------------------------

from test_registry import _register, mlflow_server  # noqa: E402,F401  (a real `mlflow server` on 127.0.0.1)

SECRET = "whsec-claims-0123456789"


def test_a_real_mlflow_server_delivers_signed_webhooks_that_soup_accepts(mlflow_server, tmp_path, monkeypatch):
    """The server itself signs and sends (model version created, alias set, tag set); soup's receiver
    authenticates each and turns it into its event. A webhook with another secret is refused, 401."""
    from mlflow import MlflowClient

    from soup.registry import Event
    from soup.schedule.webhooks import WebhookServer

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    got: list[Event] = []
    server = WebhookServer("127.0.0.1:0", SECRET, lambda e: got.append(e) or True)
    server.start()
    try:
        c = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
        events = ["model_version.created", "model_version_alias.created", "model_version_tag.set"]
        c.create_webhook("soup", server.url, events, secret=SECRET)
        c.create_webhook("impostor", server.url, events, secret="not-the-secret")
        version = _register(mlflow_server, tmp_path, "sft", 41)
        c.set_registered_model_alias("sft", "candidate", version)
        c.set_model_version_tag("sft", version, "stage", "done")
        want = [Event("mlflow", "sft", e) for e in events]
        deadline = time.monotonic() + 60  # mlflow delivers from a thread pool
        while sorted(got, key=repr) != sorted(want, key=repr) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # and nothing more arrives (the impostor's deliveries are refused)
        assert sorted(got, key=repr) == sorted(want, key=repr)
    finally:
        server.close()


def _alias_query(url: str, tmp_path: Path, *aliases: str) -> list[str]:
    from soup.registry import parse_query
    from soup.registry.base import Context

    errors: list[str] = []
    query = parse_query({"registry": "mlflow", "model": "sft", "aliases": list(aliases)}, "ingredients[0]",
                        tmp_path, errors)
    assert not errors and query is not None
    return [p.source for p in query.resolve(Context(tracking_uri=url))]


def test_mlflow_aliases_query_resolves_exactly_the_aliased_versions(mlflow_server, tmp_path, monkeypatch):
    import yaml
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    url = mlflow_server
    versions = [_register(url, tmp_path, "sft", 50 + i) for i in range(4)]
    assert versions == ["1", "2", "3", "4"]
    c = MlflowClient(tracking_uri=url, registry_uri=url)
    c.set_registered_model_alias("sft", "a", "1")
    c.set_registered_model_alias("sft", "b", "3")
    c.set_registered_model_alias("sft", "c", "3")
    held = {k: c.get_model_version_by_alias("sft", k).version for k in "abc"}
    assert held == {"a": "1", "b": "3", "c": "3"}
    assert _alias_query(url, tmp_path, "a") == ["models:/sft/1"]
    assert _alias_query(url, tmp_path, "a", "b") == ["models:/sft/1", "models:/sft/3"]
    assert _alias_query(url, tmp_path, "b", "c") == ["models:/sft/3"]  # a version holding two aliases: once
    assert _alias_query(url, tmp_path, "nobody") == []
    assert _alias_query(url, tmp_path) == [f"models:/sft/{v}" for v in versions]  # no aliases: every version
    c.set_registered_model_alias("sft", "a", "4")  # an alias moves
    assert _alias_query(url, tmp_path, "a") == ["models:/sft/4"]
    c.delete_registered_model_alias("sft", "b")
    assert _alias_query(url, tmp_path, "a", "b") == ["models:/sft/4"]

    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "ingredients": [{"registry": "mlflow", "model": "sft", "aliases": ["a", "c"]}], "strategy": "average",
        "output": "out", "tracking_uri": url}))
    res = runner.invoke(app, ["run", str(tmp_path / "r.yaml"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "mlflow model sft (alias a, c) -> 2 match(es)" in res.stdout
    listed = sorted(line.split(": ")[1] for line in res.stdout.splitlines() if line.strip().startswith("sft-v"))
    assert listed == ["models:/sft/3", "models:/sft/4"], res.stdout


def test_an_unexpected_exception_is_one_line_without_debug_and_a_traceback_with_it(tmp_path, monkeypatch):
    """A bug (not a SoupError) in a command still ends in one ``error:`` line and exit 1; ``--debug``
    shows its traceback."""
    from typer.testing import CliRunner

    import soup.io.inspection
    from soup.cli import app

    def broken(*paths, **kw):
        raise ZeroDivisionError("\x1b[2Jdivision by zero")

    monkeypatch.setattr(soup.io.inspection, "inspect", broken)
    res = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert lines == ["error: internal error: ZeroDivisionError: \\x1b[2Jdivision by zero (run with --debug for "
                     "the traceback)"], lines
    res = CliRunner().invoke(app, ["--debug", "inspect", str(tmp_path)])
    assert res.exit_code == 1 and isinstance(res.exception, ZeroDivisionError)
