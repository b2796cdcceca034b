"""Scheduled merging against the local hub: `soup run --if-changed`, `soup watch`, webhooks.

Ingredients are hub repos found by a registry query (``{registry: hub, author: acme, name: "sft-*"}``);
the evaluator appends one line per evaluation to a log file, so every test counts exactly what was
evaluated; the soup is published to ``acme/sft-soup`` (which the query matches too: a soup is never its
own ingredient) and the tests count its commits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import soup
from soup.cli import app
from soup.errors import HubError, SoupError
from soup.hub import push

from conftest import make_state, write_checkpoint

pytestmark = pytest.mark.usefixtures("hf_isolated")

runner = CliRunner()
SECRET = "whsec-test-0123456789"

EVALS = '''
import json, os

def score(candidate, log, fail_flag):
    """Closer to 0.5 is better; one log line per evaluation; crashes while ``fail_flag`` exists."""
    if os.path.exists(fail_flag):
        raise RuntimeError("evaluator crashed (test)")
    w = candidate.state_dict("cpu")["model.norm.weight"].float()
    with open(log, "a") as f:
        f.write(json.dumps(candidate.weights, sort_keys=True) + "\\n")
    return float(-((w - 0.5) ** 2).mean())
'''


class Shop:
    """A registry of fine-tunes on the local hub, a recipe over it, and the evidence."""

    def __init__(self, hub, tmp_path: Path) -> None:
        self.hub, self.tmp = hub, tmp_path
        self.log, self.flag = tmp_path / "evals.log", tmp_path / "FAIL"
        (tmp_path / "evals.py").write_text(EVALS)
        self.recipe = tmp_path / "soup.yaml"
        self.recipe.write_text(yaml.safe_dump({
            "ingredients": [{"registry": "hub", "author": "acme", "name": "sft-*"}],
            "strategy": "greedy",
            "evaluator": {"name": "python", "args": {"fn": "./evals.py:score",
                                                    "kwargs": {"log": str(self.log), "fail_flag": str(self.flag)}}},
            "endpoint": hub.url, "output": "out", "push_to": "acme/sft-soup", "cache": "scores.sqlite"}))

    def add(self, name: str, seed: int) -> str:
        folder = write_checkpoint(self.tmp / "src" / name, make_state(seed, big=3000))
        return push(folder, f"acme/{name}", endpoint=self.hub.url).commit

    def evaluations(self) -> list[dict[str, float]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def commits(self) -> list[str]:
        """Commit titles of acme/sft-soup's main branch, oldest first."""
        with self.hub.lock:
            repo = self.hub.repos.get("acme/sft-soup")
            if repo is None:
                return []
            titles, sha = [], repo.branches["main"]
            while sha is not None:
                titles.append(repo.commits[sha].title)
                sha = repo.commits[sha].parent
            return titles[::-1]


@pytest.fixture
def shop(hub, tmp_path):
    s = Shop(hub, tmp_path)
    s.add("sft-a", 1)
    s.add("sft-b", 2)
    return s


def test_if_changed_publishes_once_and_evaluates_only_what_is_new(shop, tmp_path):
    first = soup.run_recipe(shop.recipe, if_changed=True)
    assert first.changed and first.reasons == ["no previous soup"]
    assert shop.commits() == ["initial commit", "soup: greedy soup of 2 ingredients"]
    assert len(shop.evaluations()) == first.evaluated == 3  # a, b, then the candidate a+b
    head = shop.hub.head("acme/sft-soup")
    assert first.published == f"acme/sft-soup@{head}"
    manifest = json.loads(shop.hub.files("acme/sft-soup")["soup.json"])
    assert [i["source"] for i in manifest["ingredients"]] == [
        f"hf://acme/sft-a@{shop.hub.head('acme/sft-a')}", f"hf://acme/sft-b@{shop.hub.head('acme/sft-b')}"]

    # nothing changed: one line, no evaluation, no commit, nothing written
    before = sorted(p.name for p in tmp_path.iterdir())
    res = runner.invoke(app, ["run", str(shop.recipe), "--if-changed", "-q"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == f"up to date: acme/sft-soup@{head}"
    assert len(shop.evaluations()) == 3 and len(shop.commits()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before

    # a new fine-tune lands: one new commit saying what changed; only it and new candidates are evaluated
    sha_c = shop.add("sft-c", 3)
    update = soup.run_recipe(shop.recipe, if_changed=True)
    assert update.reasons == [f"+ acme/sft-c@{sha_c[:7]}"]
    new = shop.evaluations()[3:]
    assert new and all("sft-c" in w for w in new), new  # nothing without sft-c was evaluated again
    assert {"sft-c": 1.0} in new and update.evaluated == len(new) and update.cached >= 2
    titles = shop.commits()
    assert len(titles) == 3
    assert titles[-1].startswith(f"+ acme/sft-c@{sha_c[:7]} (") and "; greedy kept " in titles[-1]
    assert "/3; score " in titles[-1] and titles[-1].endswith(")")  # the score's change since the last soup
    assert update.line == f"published acme/sft-soup@{shop.hub.head('acme/sft-soup')}: {titles[-1]}"


def test_recipe_or_evaluator_change_is_a_change(shop):
    soup.run_recipe(shop.recipe, if_changed=True)
    data = yaml.safe_load(shop.recipe.read_text())
    data["strategy"] = {"name": "greedy", "tie": ">"}
    shop.recipe.write_text(yaml.safe_dump(data))
    update = soup.run_recipe(shop.recipe, if_changed=True)
    assert update.reasons == ["recipe changed"] and len(shop.evaluations()) == 3  # the scores were cached
    (shop.tmp / "evals.py").write_text(EVALS + "\n# edited\n")  # the evaluator's source: a new identity
    update = soup.run_recipe(shop.recipe, if_changed=True)
    assert update.reasons == ["evaluator changed"] and len(shop.evaluations()) == 6
    assert shop.commits()[-1].startswith("evaluator changed; greedy kept")


def test_two_concurrent_runs_publish_one_commit(shop, tmp_path, monkeypatch):
    soup.run_recipe(shop.recipe, if_changed=True)
    shop.add("sft-c", 3)
    import soup.run as schedule  # run_if_changed reads the previous soup through soup.run

    barrier, read = threading.Barrier(2, timeout=30), schedule.read_previous

    def read_then_wait(*args, **kwargs):  # both runs see the same previous soup before either publishes
        prev = read(*args, **kwargs)
        barrier.wait()
        return prev

    monkeypatch.setattr(schedule, "read_previous", read_then_wait)
    results: dict[str, object] = {}

    def run(name: str) -> None:  # two machines: each its own output
        try:
            results[name] = soup.run_recipe(shop.recipe, if_changed=True, output=tmp_path / name)
        except SoupError as e:
            results[name] = e

    threads = [threading.Thread(target=run, args=(n,)) for n in ("m1", "m2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(shop.commits()) == 3  # initial, the first soup, ONE re-soup
    errors = [r for r in results.values() if isinstance(r, HubError)]
    updates = [r for r in results.values() if isinstance(r, soup.Update)]
    assert len(errors) + len(updates) == 2, results
    for error in errors:  # the loser saw the branch move: before evaluating, or at the commit (412)
        assert "moved since" in str(error) and "another soup was published first" in str(error)
    # or the loser's soup was byte-identical (same second): huggingface_hub then skips the empty commit
    assert len({u.published for u in updates}) == 1 and updates[0].published.endswith(shop.hub.head("acme/sft-soup"))
    monkeypatch.setattr(schedule, "read_previous", read)
    assert not soup.run_recipe(shop.recipe, if_changed=True).changed  # the loser's next tick: up to date


def test_a_run_that_saw_an_older_soup_fails_before_evaluating(shop, tmp_path, monkeypatch):
    """Machine 2 read the soup, machine 1 published a new one meanwhile: machine 2 publishes nothing."""
    soup.run_recipe(shop.recipe, if_changed=True)
    shop.add("sft-c", 3)
    import soup.run as schedule  # run_if_changed reads the previous soup through soup.run

    stale = schedule.read_previous(soup.recipe.load_recipe(shop.recipe))
    assert soup.run_recipe(shop.recipe, if_changed=True, output=tmp_path / "m1").changed
    n = len(shop.evaluations())
    monkeypatch.setattr(schedule, "read_previous", lambda *a, **k: stale)
    with pytest.raises(HubError, match=r"moved since \w+ \(another soup was published first\)"):
        soup.run_recipe(shop.recipe, if_changed=True, output=tmp_path / "m2")
    assert len(shop.evaluations()) == n and len(shop.commits()) == 3
    assert not (tmp_path / "m2").exists()


def test_watch_survives_a_failing_tick_and_never_republishes(shop):
    """Ticks: first soup; +sft-c; evaluator crash (+sft-d pending); retry succeeds; up to date; the hub
    answers an error; the retry is up to date."""
    seen: list[dict] = []

    def on_log(entry: dict) -> None:
        seen.append(entry)
        if entry.get("tick") == 1:
            shop.add("sft-c", 3)
        elif entry.get("tick") == 2:
            shop.flag.write_text("crash")
            shop.add("sft-d", 4)
        elif entry.get("tick") == 3:
            shop.flag.unlink()
        elif entry.get("tick") == 5:
            shop.hub.fail_next("list_models", status=400)

    entries = soup.watch(shop.recipe, every=0.2, max_ticks=7, log=on_log, retry_after=0.05)
    assert entries == seen and entries[0]["event"] == "start"
    ticks = [e for e in entries if e["event"] == "tick"]
    assert [t["status"] for t in ticks] == ["published", "published", "failed", "published", "up-to-date",
                                            "failed", "up-to-date"]
    assert [t["trigger"] for t in ticks] == ["schedule", "schedule", "schedule", "retry", "schedule", "schedule",
                                             "retry"]
    assert ticks[5]["message"].startswith("failed: hub: ") and "\n" not in ticks[5]["message"]
    assert "evaluator crashed (test)" in ticks[2]["message"] and ticks[2]["retry_in"] == 0.05
    assert ticks[3]["changes"] == [f"+ acme/sft-d@{shop.hub.head('acme/sft-d')[:7]}"]
    assert ticks[4]["evaluated"] == 0 and ticks[4]["message"].startswith("up to date: acme/sft-soup@")
    assert len(shop.commits()) == 4  # initial + three soups; the failed tick committed nothing
    assert sum(1 for w in shop.evaluations() if w == {"sft-d": 1.0}) == 1
    leftovers = [p.name for p in shop.tmp.iterdir() if p.name.startswith(".out.soup-")]
    assert leftovers == [], leftovers


def _post(url: str, payload: dict, headers: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _hub_event(repo: str, scope: str = "repo.content") -> dict:
    return {"event": {"action": "update", "scope": scope}, "repo": {"type": "model", "name": repo, "id": "x"},
            "webhook": {"id": "w", "version": 3}}


def test_webhook_secret_and_matching_event_trigger_a_tick(shop):
    entries: list[dict] = []
    ticked = threading.Event()

    def on_log(entry: dict) -> None:
        entries.append(entry)
        if entry.get("event") == "tick":
            ticked.set()

    thread = threading.Thread(target=soup.watch, args=(shop.recipe,), daemon=True,
                              kwargs=dict(every="1h", max_ticks=2, log=on_log, webhook="127.0.0.1:0",
                                          webhook_secret=SECRET))
    thread.start()
    assert ticked.wait(60) and entries[1]["status"] == "published"
    ticked.clear()
    url = entries[0]["webhook"]
    assert SECRET not in json.dumps(entries)
    shop.add("sft-c", 3)
    assert _post(url, _hub_event("acme/sft-c"), {"X-Webhook-Secret": "wrong"}) == (401, {"error": "unauthorized"})
    assert _post(url, _hub_event("acme/sft-c"), {}) [0] == 401
    assert _post(url, _hub_event("acme/other"), {"X-Webhook-Secret": SECRET}) == (200, {"status": "ignored"})
    assert _post(url, _hub_event("acme/sft-c", "discussion"), {"X-Webhook-Secret": SECRET})[1]["status"] == "ignored"
    assert _post(url, _hub_event("acme/sft-soup"), {"X-Webhook-Secret": SECRET})[1]["status"] == "ignored"  # our own
    assert not ticked.wait(0.5)  # no tick for any of those
    assert _post(url, _hub_event("acme/sft-c"), {"X-Webhook-Secret": SECRET}) == (202, {"status": "queued"})
    thread.join(60)
    assert not thread.is_alive()
    tick = entries[-1]
    assert tick["trigger"] == "webhook acme/sft-c" and tick["status"] == "published"
    assert tick["changes"][0].startswith("+ acme/sft-c@") and len(shop.commits()) == 3


def test_mlflow_webhook_signature(monkeypatch):
    """Deliveries made by mlflow's own sender (mlflow.webhooks.delivery), signed by mlflow, to soup's
    receiver: a mismatch in the signing scheme would fail here, which signing with soup's own cannot show."""
    pytest.importorskip("mlflow")
    from mlflow.entities.webhook import Webhook, WebhookEvent
    from mlflow.webhooks import delivery

    from soup.registry import Event
    from soup.schedule.webhooks import WebhookServer

    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "true")  # mlflow refuses 127.0.0.1 otherwise
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "http,https")  # and plain http
    monkeypatch.setenv("MLFLOW_WEBHOOK_REQUEST_MAX_RETRIES", "0")
    got: list[Event] = []
    server = WebhookServer("127.0.0.1:0", SECRET, lambda e: got.append(e) or e.name == "example_model")
    server.start()

    def hook(secret: str | None) -> Webhook:
        return Webhook("w-1", "soup", server.url, [WebhookEvent.from_str("model_version.created")], 0, 0,
                       secret=secret)

    try:
        for event in ("model_version.created", "model_version_alias.created", "model_version_tag.set"):
            sent = delivery.test_webhook(hook(SECRET), WebhookEvent.from_str(event))
            assert (sent.success, sent.response_status, json.loads(sent.response_body)) == (
                True, 202, {"status": "queued"}), sent
        assert got == [Event("mlflow", "example_model", e) for e in (
            "model_version.created", "model_version_alias.created", "model_version_tag.set")]
        got.clear()
        assert delivery.test_webhook(hook("not-the-secret")).response_status == 401
        assert delivery.test_webhook(hook(None)).response_status == 401  # mlflow sends no signature without a secret
        assert got == []

        # a replayed delivery: mlflow's signature of an hour-old timestamp
        raw = json.dumps({"entity": "model_version", "action": "created", "timestamp": "x",
                          "data": {"name": "example_model", "version": "3"}})
        old = str(int(time.time()) - 3600)
        req = urllib.request.Request(server.url, data=raw.encode(), method="POST", headers={
            "X-MLflow-Signature": delivery._generate_hmac_signature(SECRET, "d-1", old, raw),
            "X-MLflow-Delivery-Id": "d-1", "X-MLflow-Timestamp": old})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 401 and got == []
    finally:
        server.close()


def test_cli_watch_stops_cleanly_on_sigterm(shop, tmp_path):
    env = {**os.environ, "SOUP_WEBHOOK_SECRET": SECRET, "PYTHONUNBUFFERED": "1"}
    cli = "import sys; from soup.cli import main; sys.argv[0] = 'soup'; main()"
    proc = subprocess.Popen([sys.executable, "-c", cli, "watch", str(shop.recipe), "--every", "1h",
                             "--log-json", "--webhook", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        lines = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if '"event": "tick"' in line:
                break
        entries = [json.loads(x) for x in lines if x.startswith("{")]
        assert entries and entries[-1]["status"] == "published", lines
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, rest
    assert "interrupted (SIGTERM)" in rest
    assert SECRET not in "".join(lines) + rest
    assert [p.name for p in tmp_path.iterdir() if ".soup-" in p.name] == []  # no temp folder, no lock left


def test_every_and_webhook_options_are_checked(shop):
    res = runner.invoke(app, ["watch", str(shop.recipe), "--every", "soon"])
    assert res.exit_code == 1 and "--every: 'soon' is not a duration" in res.stderr
    res = runner.invoke(app, ["watch", str(shop.recipe), "--webhook", "127.0.0.1:0", "--max-ticks", "1"],
                        env={"SOUP_WEBHOOK_SECRET": ""})
    assert res.exit_code == 1 and "a secret is required" in res.stderr
    assert soup.schedule.watch.parse_every("1h30m") == 5400 and soup.schedule.watch.parse_every("500ms") == 0.5


# ---- the cron line and Kubernetes CronJob of docs/scheduled.md, run as written -------------------------

ROOT = Path(__file__).parent.parent
SCHEDULED_DOCS = ROOT / "docs" / "scheduled.md"


def test_docs_cron_line_and_cronjob_run_as_written(hub, tmp_path):
    """The cron line and the CronJob's command from docs/scheduled.md, on recipes/scheduled.yaml, against the
    local hub (HF_ENDPOINT), with tiny real language models scored by the perplexity evaluator."""
    import re
    import shutil

    pytest.importorskip("transformers")
    from tiny_lm import build_tiny_lm

    def add(name: str, seed: int, tags: list[str]) -> None:
        folder = build_tiny_lm(tmp_path / "train" / name, seed=seed)
        (folder / "README.md").write_text(f"---\ntags: {json.dumps(tags)}\n---\n")
        push(folder, f"acme/{name}", endpoint=hub.url)

    add("sft-chat", 1, ["instruct"])
    add("sft-qa", 2, ["instruct"])
    add("sft-raw", 3, [])  # not tagged instruct: not an ingredient
    text = SCHEDULED_DOCS.read_text()
    val = "\n".join(json.dumps({"text": t}) for t in ("the cat sat on the mat .", "a dog ran to the park .",
                                                      "hello world , good day ."))
    # soup on PATH and in the cron host's .venv
    wrapper = tmp_path / "bin" / "soup"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -c \"import sys; from soup.cli import main; "
                       f"sys.argv[0] = 'soup'; main()\" \"$@\"\n")
    wrapper.chmod(0o755)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "PATH": f"{wrapper.parent}:{os.environ['PATH']}"}

    # the CronJob: the container's command with the ConfigMap at /config and the volume at /work
    block = re.search(r"```yaml\n(apiVersion: batch/v1\nkind: CronJob\n.*?)```", text, re.S).group(1)
    job = yaml.safe_load(block)
    pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert job["spec"]["schedule"] == "*/30 * * * *" and job["spec"]["concurrencyPolicy"] == "Forbid"
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    config, work = tmp_path / "config", tmp_path / "work"
    config.mkdir()
    work.mkdir()  # a mounted volume exists before the container starts
    shutil.copy(ROOT / "recipes" / "scheduled.yaml", config / "scheduled.yaml")
    (config / "val.jsonl").write_text(val)
    command = [c.replace("/config/", f"{config}/").replace("/work/", f"{work}/") for c in container["command"]]
    pod_env = {e["name"]: e.get("value", "").replace("/work/", f"{work}/") for e in container["env"] if "value" in e}
    res = subprocess.run(command, env={**env, **pod_env}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    head = hub.head("acme/sft-soup")
    assert res.stdout.strip().splitlines()[-1] == f"published acme/sft-soup@{head}: new soup: greedy kept " + \
        res.stdout.strip().splitlines()[-1].split("greedy kept ")[1]
    soup_json = json.loads(hub.files("acme/sft-soup")["soup.json"])
    assert [i["name"] for i in soup_json["ingredients"]] == ["sft-chat", "sft-qa"]
    assert (work / "soups" / "latest" / "soup.json").exists() and (work / "scores.sqlite").exists()

    # the cron line, on another machine: the soup is up to date there too (state lives in the registry)
    line = re.search(r"^\*/30 \* \* \* \* (.*)$", text, re.M).group(1)
    srv = tmp_path / "srv" / "soup"
    (srv / ".venv" / "bin").mkdir(parents=True)
    (srv / ".venv" / "bin" / "soup").symlink_to(wrapper)
    shutil.copy(ROOT / "recipes" / "scheduled.yaml", srv / "scheduled.yaml")
    (srv / "val.jsonl").write_text(val)
    cron = line.replace("/srv/soup", str(srv))
    subprocess.run(["sh", "-c", cron], env=env, check=True, timeout=300)
    assert (srv / "soup.log").read_text().strip().splitlines() == [f"up to date: acme/sft-soup@{head}"]
    add("sft-math", 4, ["instruct"])
    subprocess.run(["sh", "-c", cron], env=env, check=True, timeout=300)
    log = (srv / "soup.log").read_text().strip().splitlines()
    assert log[-1].startswith(f"published acme/sft-soup@{hub.head('acme/sft-soup')}: + acme/sft-math@"), log
    assert len(hub.files("acme/sft-soup")) > 3 and hub.head("acme/sft-soup") != head
