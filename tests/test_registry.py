"""Registry queries as ingredients: hub (list_models, collections), folders, MLflow; validation and dry runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import soup
from soup.cli import app
from soup.hub import push
from soup.registry import Context
from soup.registry.hub import HubQuery

from conftest import make_state, write_checkpoint

runner = CliRunner()

EVALS = '''
import json

def score(candidate, log):
    w = candidate.state_dict("cpu")["model.norm.weight"].float()
    with open(log, "a") as f:
        f.write(json.dumps(candidate.weights, sort_keys=True) + "\\n")
    return float(-((w - 0.5) ** 2).mean())
'''


def _evaluator(tmp_path: Path) -> dict:
    (tmp_path / "evals.py").write_text(EVALS)
    return {"name": "python", "args": {"fn": "./evals.py:score", "kwargs": {"log": str(tmp_path / "evals.log")}}}


def _evaluations(tmp_path: Path) -> list[dict]:
    log = tmp_path / "evals.log"
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def _card(folder: Path, tags: list[str]) -> Path:
    (folder / "README.md").write_text(f"---\ntags: {json.dumps(tags)}\n---\n# a fine-tune\n")
    return folder


# ---- recipes ----------------------------------------------------------------------------------------


def test_queries_are_validated_with_field_paths(tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"strategy": "average", "ingredients": [
        {"registry": "hubb"},
        {"registry": "hub", "name": "sft-*", "colour": 1},
        {"registry": "hub", "author": "acme", "collection": "acme/c-1"},
        {"registry": "folder"},
        {"registry": "mlflow", "model": "sft", "tags": ["x"], "aliases": "champion"},
    ], "publish": {"mlflow": ""}, "tracking_uri": 5}))
    res = runner.invoke(app, ["validate", str(tmp_path / "r.yaml")])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    prefix = f"{tmp_path / 'r.yaml'}: "
    assert [x.removeprefix(prefix) for x in lines] == [
        "ingredients[0].registry: 'hubb' is not a registry (one of: hub, folder, mlflow)",
        "ingredients[1].colour: unknown key (allowed: author, collection, name, registry, tags)",
        "ingredients[1].author: required (the models' owner), or give a collection",
        "ingredients[2]: give either collection, or author (with name and tags), not both",
        "ingredients[3].glob: a glob is required, e.g. runs/*/final",
        "ingredients[4].tags: must be a mapping of tag names to values, got ['x']",
        "publish.mlflow: the registered model's name is required, got ''",
        "tracking_uri: must be a string, got 5",
    ]


def test_rules_over_queries_are_checked_at_run_time_not_refused_early(tmp_path):
    """With a query the number of ingredients is known at run time only: `take: 2` is not refused."""
    r = soup.recipe.parse_recipe({"ingredients": [{"registry": "folder", "glob": "runs/*"}], "strategy": "average",
                                  "rules": [{"pattern": "model.vision_tower.*", "take": 2}]}, base=tmp_path)
    assert r.rules[0].ingredient == 2


# ---- hub ----------------------------------------------------------------------------------------------


@pytest.fixture
def fine_tunes(hub, hf_isolated, tmp_path):
    """acme/sft-chat (tagged instruct), acme/sft-ocr, acme/base, bob/sft-chat."""
    shas = {}
    for i, repo in enumerate(("acme/sft-chat", "acme/sft-ocr", "acme/base", "bob/sft-chat")):
        folder = write_checkpoint(tmp_path / "src" / repo, make_state(10 + i, big=2000))
        if repo == "acme/sft-chat":
            _card(folder, ["instruct", "chat"])
        shas[repo] = push(folder, repo, endpoint=hub.url).commit
    return shas


def test_hub_query_lists_models_pinned_to_their_head(hub, fine_tunes):
    ctx = Context(endpoint=hub.url)
    found = HubQuery("ingredients[0]", author="acme", name="sft-*").resolve(ctx)
    assert [(p.source, p.label, p.revision) for p in found] == [
        (f"hf://acme/sft-chat@{fine_tunes['acme/sft-chat']}", "sft-chat", fine_tunes["acme/sft-chat"]),
        (f"hf://acme/sft-ocr@{fine_tunes['acme/sft-ocr']}", "sft-ocr", fine_tunes["acme/sft-ocr"])]
    tagged = HubQuery("ingredients[0]", author="acme", tags=("instruct",)).resolve(ctx)
    assert [p.label for p in tagged] == ["sft-chat"]
    assert HubQuery("i", author="nobody").resolve(ctx) == []
    hub.collections["acme/sfts-0123"] = ["bob/sft-chat", "acme/sft-chat", "acme/base"]
    coll = HubQuery("i", collection="acme/sfts-0123").resolve(ctx)
    # two owners share a name: those get the full id as a label, so neither is renamed by the other
    assert [p.label for p in coll] == ["base", "acme/sft-chat", "bob/sft-chat"]
    assert coll[2].source == f"hf://bob/sft-chat@{fine_tunes['bob/sft-chat']}"


def test_dry_run_prints_what_queries_resolve_to_and_empty_query_is_one_line(hub, fine_tunes, tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "ingredients": [{"registry": "hub", "author": "acme", "name": "sft-*"}, "hf://acme/base"],
        "strategy": "average", "endpoint": hub.url, "output": "out"}))
    res = runner.invoke(app, ["run", str(tmp_path / "r.yaml"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "ingredients[0]: hub models by acme named sft-* -> 2 match(es)" in res.stdout
    assert f"sft-ocr: hf://acme/sft-ocr@{fine_tunes['acme/sft-ocr']}" in res.stdout
    assert not (tmp_path / "out").exists()
    # the run itself: pinned shas in soup.json, stable labels
    res = runner.invoke(app, ["run", str(tmp_path / "r.yaml"), "-q", "--no-cache"])
    assert res.exit_code == 0, res.output
    m = soup.read_manifest(tmp_path / "out")
    assert [(i.name, i.revision) for i in m.ingredients] == [
        ("sft-chat", fine_tunes["acme/sft-chat"]), ("sft-ocr", fine_tunes["acme/sft-ocr"]),
        ("base", fine_tunes["acme/base"])]
    (tmp_path / "e.yaml").write_text(yaml.safe_dump({
        "ingredients": [{"registry": "hub", "author": "acme", "name": "rl-*"}],
        "strategy": "average", "endpoint": hub.url, "output": "out2"}))
    res = runner.invoke(app, ["run", str(tmp_path / "e.yaml"), "-q"])
    assert res.exit_code == 1
    assert res.stderr.strip().splitlines() == [
        "error: ingredients[0]: hub models by acme named rl-*: no match (an empty query is an error: nothing to soup)"]
    assert not (tmp_path / "out2").exists()


# ---- folders ------------------------------------------------------------------------------------------


def test_folder_registry_resoups_when_a_run_lands(tmp_path):
    for i, run in enumerate(("chat", "ocr")):
        write_checkpoint(tmp_path / "runs" / run / "final", make_state(20 + i, big=2000))
    (tmp_path / "runs" / "math").mkdir()  # still training: no final/ yet
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "ingredients": [{"registry": "folder", "glob": "runs/*/final"}], "strategy": "greedy",
        "evaluator": _evaluator(tmp_path), "output": "soups/latest", "cache": "scores.sqlite"}))
    first = soup.run_recipe(tmp_path / "r.yaml", if_changed=True)
    out = tmp_path / "soups" / "latest"
    assert first.changed and first.published == str(out) and first.line.startswith(f"wrote {out}: new soup: greedy")
    assert [i.name for i in soup.read_manifest(out).ingredients] == ["chat", "ocr"]
    assert len(_evaluations(tmp_path)) == 3
    res = runner.invoke(app, ["run", str(tmp_path / "r.yaml"), "--if-changed", "-q"])
    assert res.exit_code == 0 and res.stdout.strip() == f"up to date: {out}"
    assert len(_evaluations(tmp_path)) == 3
    write_checkpoint(tmp_path / "runs" / "math" / "final", make_state(22, big=2000))
    update = soup.run_recipe(tmp_path / "r.yaml", if_changed=True)
    assert update.reasons == ["+ math"]
    new = _evaluations(tmp_path)[3:]
    assert new and all("math" in w for w in new)
    assert "+ math (" in update.line and "greedy kept" in update.line
    assert [i.name for i in soup.read_manifest(out).ingredients] == ["chat", "math", "ocr"]
    # a run folder that is retrained in place is the same ingredient at a new revision
    write_checkpoint(tmp_path / "runs" / "ocr" / "final", make_state(23, big=2000))
    update = soup.run_recipe(tmp_path / "r.yaml", if_changed=True)
    assert update.reasons == ["~ ocr"] and update.line.startswith(f"wrote {out}: ~ ocr (")


# ---- MLflow -------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` (sqlite backend, local artifact folder) on 127.0.0.1."""
    pytest.importorskip("mlflow")
    port = _free_port()
    log = open(tmp_path / "mlflow-server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                             "--artifacts-destination", str(tmp_path / "mlartifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # starts 2x faster
                                 # webhooks may be delivered to a receiver on 127.0.0.1 over plain http
                                 "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true", "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(tmp_path / 'mlflow-server.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _register(url: str, tmp_path: Path, name: str, seed: int, **tags: str) -> str:
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=url, registry_uri=url)
    if not c.search_registered_models(f"name = '{name}'"):
        c.create_registered_model(name)
    exp = c.get_experiment_by_name("training") or None
    exp_id = exp.experiment_id if exp else c.create_experiment("training")
    run = c.create_run(exp_id)
    ck = write_checkpoint(tmp_path / "train" / f"{name}-{seed}", make_state(seed, big=2000))
    c.log_artifacts(run.info.run_id, str(ck), artifact_path="model")  # an HF layout under model/
    c.set_terminated(run.info.run_id)
    return c.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                  tags=tags or None).version


def test_mlflow_registry_in_and_out(mlflow_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    url = mlflow_server
    _register(url, tmp_path, "sft", 31, stage="done")
    _register(url, tmp_path, "sft", 32, stage="done")
    _register(url, tmp_path, "sft", 33, stage="training")  # filtered out by the tag
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "ingredients": [{"registry": "mlflow", "model": "sft", "tags": {"stage": "done"}}], "strategy": "greedy",
        "evaluator": _evaluator(tmp_path), "output": "out", "cache": "scores.sqlite",
        "tracking_uri": url, "publish": {"mlflow": "sft-soup"}}))
    res = runner.invoke(app, ["run", str(tmp_path / "r.yaml"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "mlflow model sft (tag stage=done) -> 2 match(es)" in res.stdout and "sft-v2: models:/sft/2" in res.stdout
    first = soup.run_recipe(tmp_path / "r.yaml", if_changed=True)
    assert first.published == "models:/sft-soup/1" and first.line.startswith("published models:/sft-soup/1: new soup")
    assert len(_evaluations(tmp_path)) == 3
    assert soup.run_recipe(tmp_path / "r.yaml", if_changed=True).line == "up to date: models:/sft-soup/1"
    version = _register(url, tmp_path, "sft", 34, stage="done")
    update = soup.run_recipe(tmp_path / "r.yaml", if_changed=True)
    assert update.reasons == [f"+ models:/sft/{version}"] and update.published == "models:/sft-soup/2"
    new = _evaluations(tmp_path)[3:]
    assert new and all(f"sft-v{version}" in w for w in new)
    mv = MlflowClient(tracking_uri=url, registry_uri=url).get_model_version("sft-soup", "2")
    assert mv.description.startswith(f"+ models:/sft/{version} (") and "greedy kept" in mv.description
    assert mv.tags["soup.method"] == "greedy" and mv.tags["soup.io.ingredients"] == "3"
    assert mv.tags["soup.ingredient.2"].startswith(f"models:/sft/{version} weight=")
    assert "score=" in mv.tags["soup.ingredient.0"] and float(mv.tags["soup.score"]) < 0
    m = soup.read_manifest(tmp_path / "out")
    assert [i.source for i in m.ingredients] == ["models:/sft/1", "models:/sft/2", f"models:/sft/{version}"]


def test_mlflow_missing_tracking_uri_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "ingredients": [{"registry": "mlflow", "model": "sft"}], "strategy": "average", "output": "out"}))
    res = runner.invoke(app, ["run", str(tmp_path / "r.yaml"), "-q"])
    assert res.exit_code == 1
    assert res.stderr.strip().splitlines() == [
        "error: ingredients[0]: no MLflow tracking URI: set tracking_uri in the recipe or MLFLOW_TRACKING_URI"]
