"""Hard edges (issue 25): nothing created where the user did not ask, nothing outlives soup, nothing hangs.

- ``--overwrite`` replaces only soup's own files; anything else in the folder is named and kept.
- No output, cache or storage is created through a dangling link or in a folder nobody named; ``soup demo``
  follows ``merge``'s output rules and leaves nothing of its own behind after a failure.
- A ``command`` evaluator's process group dies with soup, even when soup is SIGKILLed.
- Every hub request has a timeout; one retry layer (soup's), one line per retry, ``Retry-After`` honoured.
- A published soup whose ``soup.json`` cannot be read is named, and replaced with ``replace_corrupt``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import soup
import soup.hub.errors as hub_errors
from soup.cli import app
from soup.errors import HubError, SoupError
from soup.hub import RetryPolicy, pull, push
from soup.recipe import load_recipe
from soup.registry import Context
from soup.registry.hub import HubQuery
from soup.run import run_if_changed

from conftest import make_state, write_checkpoint

runner = CliRunner()
SOUP = [sys.executable, "-c", "from soup.cli import main; main()"]
QUICK = RetryPolicy(tries=2, base_delay=0.1, max_delay=0.1, timeout=1)


@pytest.fixture
def two(tmp_path):
    """Two tiny fine-tunes, g and b."""
    return [write_checkpoint(tmp_path / name, make_state(seed, big=2000)) for seed, name in ((1, "g"), (2, "b"))]


def _merge(*args: str):
    return runner.invoke(app, ["merge", *args, "-q"])


def _one_line(res) -> str:
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


# ---- 1. --overwrite removes only what soup wrote --------------------------------------------------------
def test_overwrite_keeps_a_folder_that_only_holds_a_copied_manifest(two, tmp_path):
    g, b = map(str, two)
    assert _merge(g, b, "-o", str(tmp_path / "s1")).exit_code == 0
    out = tmp_path / "out"
    out.mkdir()
    (out / "soup.json").write_bytes((tmp_path / "s1" / "soup.json").read_bytes())
    (out / "notes.txt").write_text("precious")
    res = _merge(g, b, "-o", str(out), "--overwrite")
    assert res.exit_code == 1
    assert "holds files soup did not write (notes.txt)" in _one_line(res)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "soup.json"]
    assert (out / "notes.txt").read_text() == "precious"


def test_overwrite_names_whatever_soup_did_not_write(two, tmp_path):
    g, b = map(str, two)
    out = tmp_path / "soup"
    assert _merge(g, b, "-o", str(out)).exit_code == 0
    assert _merge(g, b, "-o", str(out), "--overwrite").exit_code == 0  # a soup of its own files: replaced
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text("{}")
    (out / "link").symlink_to(tmp_path / "g")
    res = _merge(g, b, "-o", str(out), "--overwrite")
    assert res.exit_code == 1 and "(eval/results.json, link)" in _one_line(res)
    assert (out / "eval" / "results.json").exists() and (out / "link").is_symlink()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before
    # a shard that is not the one soup wrote (another size) is the user's too
    (out / "eval" / "results.json").unlink()
    (out / "eval").rmdir()
    (out / "link").unlink()
    (out / "model.safetensors").write_bytes(b"user weights")
    res = _merge(g, b, "-o", str(out), "--overwrite")
    assert res.exit_code == 1 and "(model.safetensors)" in _one_line(res)
    assert (out / "model.safetensors").read_bytes() == b"user weights"


# ---- 2. nothing created through a link or in a folder nobody named ----------------------------------------
def test_an_output_through_a_dangling_link_is_refused(two, tmp_path):
    g, b = map(str, two)
    target = tmp_path / "elsewhere" / "made-by-soup"
    (tmp_path / "dangling").symlink_to(target)
    for out in ("dangling", "dangling/soup"):
        res = _merge(g, b, "-o", str(tmp_path / out))
        assert res.exit_code == 1
        assert "is a symbolic link to" in _one_line(res) and "does not exist" in res.output
    assert not (tmp_path / "elsewhere").exists()
    (tmp_path / "real").mkdir()  # a link to a folder that exists is a place like any other
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    assert _merge(g, b, "-o", str(tmp_path / "linked" / "soup")).exit_code == 0
    assert (tmp_path / "real" / "soup" / "soup.json").exists()


def _recipe(tmp_path: Path, ingredients, **extra) -> Path:
    (tmp_path / "ev.py").write_text("def score(candidate):\n    return 1.0\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"ingredients": [str(p) for p in ingredients], "strategy": "greedy",
                                      "evaluator": {"name": "python", "args": {"fn": "./ev.py:score"}},
                                      "output": str(tmp_path / "out"), **extra}))
    return recipe


@pytest.mark.parametrize("flag,value", [
    ("--storage", "sqlite:///{missing}/x.db"),
    ("--cache", "sqlite:///{missing}/x.db"),
    ("--cache", "{missing}/scores.sqlite"),
])
def test_a_database_in_a_missing_folder_is_refused(two, tmp_path, flag, value):
    missing = tmp_path / "missing" / "dir"
    recipe = _recipe(tmp_path, two)
    res = runner.invoke(app, ["run", str(recipe), flag, value.format(missing=missing), "-q"])
    assert res.exit_code == 1
    assert f"the folder {missing} does not exist" in _one_line(res)
    assert not (tmp_path / "missing").exists() and not (tmp_path / "out").exists()


def test_a_cache_file_through_a_dangling_link_is_refused(two, tmp_path):
    (tmp_path / "cache.sqlite").symlink_to(tmp_path / "nowhere" / "cache.sqlite")
    (tmp_path / "nowhere").mkdir()  # the folder exists; the link's target does not: sqlite would create it
    res = runner.invoke(app, ["run", str(_recipe(tmp_path, two)), "--cache", str(tmp_path / "cache.sqlite"), "-q"])
    assert res.exit_code == 1 and "is a symbolic link to" in _one_line(res)
    assert not any((tmp_path / "nowhere").iterdir())


def test_demo_refuses_the_working_directory(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.chdir(tmp_path)
    for out in (".", str(tmp_path.parent)):
        res = runner.invoke(app, ["demo", "--output", out, "--seeds", "1", "-q"])
        assert res.exit_code == 1 and "working directory" in _one_line(res), res.output
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def fake_build(monkeypatch):
    """``build_ingredients`` replaced by two tiny checkpoints the digits evaluator cannot load: the demo then
    fails in the middle of cooking, after it has written ingredients and the score cache."""
    pytest.importorskip("sklearn")
    import soup.demo.run as demo

    calls = []

    def build(out, *, seed=0):
        calls.append(Path(out))
        return [write_checkpoint(Path(out) / name, make_state(i, big=2000)) for i, name in enumerate(("a", "b"))]

    monkeypatch.setattr(demo, "build_ingredients", build)
    return calls


def test_demo_leaves_nothing_of_its_own_after_a_failure(fake_build, tmp_path):
    from soup.demo import run_demo

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(SoupError):
        run_demo(mine)
    assert fake_build and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    new = tmp_path / "new" / "deeper"
    with pytest.raises(SoupError):
        run_demo(new)
    assert not (tmp_path / "new").exists()


def test_demo_checks_before_building(fake_build, tmp_path):
    from soup.demo import run_demo

    (tmp_path / "d" / "greedy-seed0").mkdir(parents=True)
    (tmp_path / "d" / "greedy-seed0" / "mine.txt").write_text("x")  # not a soup: merge would refuse it
    with pytest.raises(SoupError, match="is not a soup"):
        run_demo(tmp_path / "d")
    assert not fake_build and sorted(p.name for p in (tmp_path / "d").iterdir()) == ["greedy-seed0"]


# ---- 3. children die with soup ----------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting to be reaped is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(os.name != "posix", reason="process groups and signals")
@pytest.mark.parametrize("shape", ["child", "grandchild"])
def test_sigkill_of_soup_kills_the_benchmark(two, tmp_path, shape):
    pidfile = tmp_path / "bench.pid"
    if shape == "child":  # the benchmark itself
        cmd = [sys.executable, "-c", f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); "
               "time.sleep(300)"]
    else:  # a wrapper script that starts the benchmark (lm_eval, accelerate launch...)
        cmd = ["bash", "-c", f"sleep 300 & echo $! > {pidfile}; wait"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"ingredients": [str(p) for p in two], "strategy": "greedy",
                                      "evaluator": {"name": "command", "args": {"cmd": cmd}},
                                      "output": str(tmp_path / "out"), "cache": False}))
    proc = subprocess.Popen([*SOUP, "run", str(recipe), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.01)
    pid = int(pidfile.read_text())
    try:
        proc.kill()  # SIGKILL: soup runs no cleanup at all
        proc.communicate(timeout=30)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the benchmark outlived soup"
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


# ---- 4. every network call has a timeout; one retry layer ----------------------------------------------
@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never answers; yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    held, stop = [], threading.Event()

    def accept() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for c in held:
        c.close()
    sock.close()


def _retry_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "retrying in" in line]


def test_push_to_a_server_that_never_answers_ends(hf_isolated, silent_server, two, capsys):
    t0 = time.monotonic()
    with pytest.raises(HubError, match=r"^hub: cannot reach the hub for owner/x@main \(ReadTimeout\)") as info:
        push(two[0], "owner/x", endpoint=silent_server, retry=QUICK)
    assert time.monotonic() - t0 < 15 and "\n" not in str(info.value)
    err = capsys.readouterr().err
    assert len(_retry_lines(err)) == 1 and "Retrying in" not in err


def test_a_registry_query_against_a_silent_or_dead_hub_ends(hf_isolated, silent_server, monkeypatch, capsys,
                                                            caplog):
    monkeypatch.setattr(hub_errors, "DEFAULT_RETRY", RetryPolicy(tries=3, base_delay=0.1, max_delay=0.1, timeout=1))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    for url, kind in ((silent_server, "ReadTimeout"), (dead, "ConnectError")):
        t0 = time.monotonic()
        with pytest.raises(HubError, match=rf"^hub: cannot reach the hub for hub models by acme.*\({kind}\), "
                                           "still failing after retries$"):
            HubQuery("ingredients[0]", author="acme", name="sft-*").resolve(Context(endpoint=url))
        assert time.monotonic() - t0 < 15
        err = capsys.readouterr().err
        assert len(_retry_lines(err)) == 2, err  # soup's retries only: huggingface_hub's never run
    assert "Retrying in" not in caplog.text


def test_retry_after_is_honoured_with_one_line_per_retry(hf_isolated, hub, two, capsys, caplog):
    caplog.set_level(logging.WARNING)
    fast = RetryPolicy(tries=4, base_delay=0.01, max_delay=0.02)
    first = push(two[0], "owner/busy", endpoint=hub.url, retry=fast)
    capsys.readouterr()
    hub.fail_next("info", times=2, status=503, headers={"Retry-After": "1"})
    t0 = time.monotonic()
    assert pull("owner/busy", endpoint=hub.url, retry=fast).commit == first.commit
    assert time.monotonic() - t0 >= 2  # the hub's Retry-After, not the policy's 0.01 s
    lines = _retry_lines(capsys.readouterr().err)
    assert len(lines) == 2 and all("HTTP 503" in line and "retrying in 1s" in line for line in lines), lines
    # a call that huggingface_hub retries itself (list_models: its http_backoff) is retried by soup alone
    hub.fail_next("list_models", times=2, status=503, headers={"Retry-After": "1"})
    found = HubQuery("i", author="owner").resolve(Context(endpoint=hub.url))
    assert [p.label for p in found] == ["busy"]
    assert [s for _, r, s in hub.requests if r == "list_models"] == [503, 503, 200]
    assert len(_retry_lines(capsys.readouterr().err)) == 2
    assert "Retrying" not in caplog.text and "Rate limited" not in caplog.text


def test_a_retry_after_beyond_the_policy_fails_at_once(hf_isolated, hub, two):
    push(two[0], "owner/busy", endpoint=hub.url, retry=QUICK)
    hub.fail_next("info", times=1, status=429, headers={"Retry-After": "3600"})
    t0 = time.monotonic()
    with pytest.raises(HubError, match="429 server error for owner/busy"):
        pull("owner/busy", endpoint=hub.url, retry=RetryPolicy(tries=4, base_delay=0.01))
    assert time.monotonic() - t0 < 5


def test_a_webhook_client_that_sends_nothing_is_dropped(monkeypatch):
    from soup.schedule import webhooks

    assert isinstance(webhooks._Handler.timeout, (int, float)) and webhooks._Handler.timeout <= 60
    monkeypatch.setattr(webhooks._Handler, "timeout", 1)
    server = webhooks.WebhookServer("127.0.0.1:0", "secret-0123", lambda event: False)
    server.start()
    try:
        host, port = server.httpd.server_address[:2]
        with socket.create_connection((host, port), timeout=10) as c:
            c.settimeout(10)
            t0 = time.monotonic()
            assert c.recv(1) == b""  # closed by the server
            assert time.monotonic() - t0 < 5
    finally:
        server.close()


def test_mlflow_requests_are_bounded_by_default(monkeypatch):
    pytest.importorskip("mlflow")
    from soup.registry.mlflow import client

    for var in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(var, raising=False)
    client("http://127.0.0.1:9")
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")  # the user's own setting wins
    client("http://127.0.0.1:9")
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"


# ---- 5. an unreadable published soup.json is named and can be replaced ----------------------------------
def test_a_corrupt_soup_json_on_the_hub_is_named_and_replaced(hf_isolated, hub, two, tmp_path):
    from huggingface_hub import HfApi

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"ingredients": [str(p) for p in two], "strategy": "average",
                                      "output": str(tmp_path / "out"), "endpoint": hub.url,
                                      "push_to": "acme/soup", "cache": False}))
    assert soup.run_recipe(recipe, if_changed=True).changed
    HfApi(endpoint=hub.url).upload_file(path_or_fileobj=b"{not json", path_in_repo="soup.json", repo_id="acme/soup")
    head = hub.head("acme/soup")
    with pytest.raises(SoupError) as info:
        soup.run_recipe(recipe, if_changed=True)
    msg = str(info.value)
    assert msg.startswith(f"acme/soup@{head}: the published soup.json cannot be read (corrupt manifest")
    assert "--replace-corrupt" in msg and "soup-previous" not in msg and "\n" not in msg
    assert hub.head("acme/soup") == head  # nothing published
    update = run_if_changed(load_recipe(recipe), replace_corrupt=True)
    assert update.changed and update.reasons[0].startswith(f"unreadable soup.json at acme/soup@{head}")
    assert update.published == f"acme/soup@{hub.head('acme/soup')}" and hub.head("acme/soup") != head
    assert json.loads(hub.files("acme/soup")["soup.json"])["method"]["name"] == "average"
    assert not soup.run_recipe(recipe, if_changed=True).changed  # readable again: the schedule goes on


def test_a_corrupt_soup_json_at_the_output_is_named_and_moved_aside(two, tmp_path):
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"ingredients": [str(p) for p in two], "strategy": "average",
                                      "output": str(out), "cache": False}))
    assert soup.run_recipe(recipe, if_changed=True).changed
    (out / "soup.json").write_text('{"schema_version": 1')
    (out / "notes.txt").write_text("precious")
    with pytest.raises(SoupError, match=rf"^output {out}: the published soup.json cannot be read \(corrupt manifest"):
        soup.run_recipe(recipe, if_changed=True)
    update = run_if_changed(load_recipe(recipe), replace_corrupt=True)
    assert update.changed and soup.read_manifest(out).method.name == "average"
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("out.unreadable-")]
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "precious"
    assert update.reasons[-1] == f"moved it to {aside[0]}"


def test_replace_corrupt_on_the_command_line(two, tmp_path):
    """``soup run --if-changed --replace-corrupt`` (the flag the refusal names) moves the unreadable soup aside
    and writes a new one; without --if-changed the flag is refused in one line."""
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"ingredients": [str(p) for p in two], "strategy": "average",
                                      "output": str(out), "cache": False}))
    runner = CliRunner()
    assert runner.invoke(app, ["run", str(recipe), "--if-changed", "-q"]).exit_code == 0
    (out / "soup.json").write_text("{broken")
    res = runner.invoke(app, ["run", str(recipe), "--if-changed", "-q"])
    assert res.exit_code == 1 and "--replace-corrupt" in res.stderr and "Traceback" not in res.stderr
    res = runner.invoke(app, ["run", str(recipe), "--replace-corrupt"])
    assert res.exit_code != 0 and res.stderr.strip() == "error: --replace-corrupt: applies with --if-changed only"
    res = runner.invoke(app, ["run", str(recipe), "--if-changed", "--replace-corrupt", "-q"])
    assert res.exit_code == 0, res.stderr
    assert soup.read_manifest(out).method.name == "average"
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("out.unreadable-")]
    assert len(aside) == 1 and (aside[0] / "soup.json").read_text() == "{broken"
