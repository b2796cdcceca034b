"""Evaluating on several machines (soup.workers): real `soup run --storage` and `soup worker` processes
on real storages (an sqlite file; a throwaway PostgreSQL server), a worker SIGKILLed mid-candidate,
and optuna-dashboard reading the queue study."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import soup
from soup.soups.cache import ScoreCache
from soup.cli import app
from soup.errors import EvaluatorError
from soup.run import run_recipe
from soup.recipe import load_recipe

runner = CliRunner()

# Scores a soup by how close its mean norm weight is to 1 and logs "pid key name" per evaluation.
# ``slow``: the candidate it stalls on the first time (writing ``marker`` with its pid first);
# ``fail``: the candidate it raises on; ``delay``: seconds each evaluation takes.
EVALUATOR = '''
import os, time
from pathlib import Path
from soup.soups.evaluate import Evaluator

class LogEval(Evaluator):
    name = "logeval"

    def score(self, candidate):
        a = self.args
        if a.get("slow") == candidate.name and not Path(a["marker"]).exists():
            Path(a["marker"]).write_text(str(os.getpid()))
            time.sleep(300)
        if a.get("fail") == candidate.name:
            raise RuntimeError("this candidate breaks the evaluator")
        time.sleep(float(a.get("delay", 0)))
        value = round(-abs(float(candidate.state_dict("cpu")["model.norm.weight"].double().mean()) - 1.0), 6)
        with open(a["log"], "a") as f:
            f.write(f"{os.getpid()} {candidate.key} {candidate.name}\\n")
        return value
'''

# greedy over these: best ing1 (0.9), + ing0 (1.2) kept, + ing2 (0.7) rejected, + ing3 (3.0) rejected
NORMS = (1.2, 0.9, 0.7, 3.0)
EXPECTED = {"ing0": 0.5, "ing1": 0.5, "ing2": 0.0, "ing3": 0.0}


def _kitchen(tmp_path: Path, n: int = 4, **args) -> Path:
    for i, c in enumerate(NORMS[:n]):
        d = tmp_path / f"ing{i}"
        d.mkdir()
        g = torch.Generator().manual_seed(i)
        save_file({"model.norm.weight": torch.full((8,), c), "model.layers.0.w": torch.randn(16, 16, generator=g)},
                  str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text("{}")
    (tmp_path / "logeval.py").write_text(EVALUATOR)
    ev_args = {"log": "./eval.log", **args}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"ingredients: [{', '.join(f'ing{i}' for i in range(n))}]\nstrategy: greedy\n"
                      f"evaluator: {{name: ./logeval.py:LogEval, args: {json.dumps(ev_args)}}}\noutput: soup-out\n")
    return recipe


def _env(tmp_path: Path) -> dict[str, str]:
    tmp = tmp_path / "tmp"  # workers' scratch folders (a killed one's is left there)
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "SOUP_HEARTBEAT_INTERVAL": "1", "SOUP_HEARTBEAT_GRACE": "3", "TMPDIR": str(tmp)}


def _start(tmp_path: Path, name: str, args: list[str], **env: str) -> subprocess.Popen:
    """A process with its stdout/stderr in files (``name.out``, ``name.err``)."""
    out, err = open(tmp_path / f"{name}.out", "w"), open(tmp_path / f"{name}.err", "w")
    proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=err, env={**_env(tmp_path), **env},
                            cwd=tmp_path)
    proc.name, proc.files = name, (tmp_path / f"{name}.out", tmp_path / f"{name}.err")
    return proc


def _cli(tmp_path: Path, name: str, *args: str, **env: str) -> subprocess.Popen:
    return _start(tmp_path, name, ["-c", "from soup.cli import main; main()", *args], **env)


def _api_worker(tmp_path: Path, name: str, recipe: Path, storage: str) -> subprocess.Popen:
    code = ("import sys, soup; r = soup.worker(sys.argv[1], storage=sys.argv[2], idle_timeout=60, progress=True); "
            "print(r.study, r.evaluated, r.reason)")
    return _start(tmp_path, name, ["-c", code, str(recipe), storage])


def _wait_for(procs: list[subprocess.Popen], text: str, timeout: float = 60) -> None:
    """Until every process has printed ``text`` on stderr."""
    deadline = time.monotonic() + timeout
    while not all(text in p.files[1].read_text() for p in procs):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            pytest.fail(f"no {text!r}:\n" + "\n".join(p.files[1].read_text() for p in procs))
        time.sleep(0.1)


def _finish(procs: list[subprocess.Popen], timeout: float = 90) -> dict[str, tuple[int, str, str]]:
    """Wait for every process; on a timeout kill them all and fail with their output."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        pytest.fail("timed out:\n" + "\n".join(f"--- {p.name}\n{p.files[0].read_text()}{p.files[1].read_text()}"
                                               for p in procs))
    return {p.name: (p.returncode, p.files[0].read_text(), p.files[1].read_text()) for p in procs}


def _log(tmp_path: Path) -> list[tuple[int, str, str]]:
    lines = (tmp_path / "eval.log").read_text().splitlines()
    return [(int(pid), key, name) for pid, key, name in (line.split(" ", 2) for line in lines)]


def _queue(storage: str) -> optuna.Study:
    names = [n for n in optuna.get_all_study_names(storage) if n.startswith("soup-queue-")]
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=storage)


def _same_soup(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    sa, sb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path) -> str:
    """The queue's storage: an sqlite file, and a database on a throwaway PostgreSQL server (the ``postgres``
    fixture skips when PostgreSQL is not installed, and fails in CI)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("postgres")


def _wait_marker(marker: Path, timeout: float = 60) -> int:
    """The pid a stalled evaluator wrote into ``marker``."""
    deadline = time.monotonic() + timeout
    while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return int(marker.read_text())


def test_two_workers_finish_a_greedy_soup_evaluating_each_candidate_once(tmp_path):
    recipe = _kitchen(tmp_path, delay=0.4)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    w1 = _cli(tmp_path, "w1", "worker", str(recipe), "--storage", storage, "--idle-timeout", "60")
    w2 = _api_worker(tmp_path, "w2", recipe, storage)  # the Python API's worker
    _wait_for([w1, w2], "waiting for a coordinator")  # both up before there is work: both get some
    coord = _cli(tmp_path, "coord", "run", str(recipe), "--storage", storage, "--no-local-worker", "-q")
    res = _finish([coord, w1, w2])
    assert [res[k][0] for k in ("coord", "w1", "w2")] == [0, 0, 0], res
    assert res["w1"][1].split()[-2] == "done" and res["w2"][1].split()[2] == "done"

    log = _log(tmp_path)
    keys = [k for _, k, _ in log]
    assert len(keys) == 7 == len(set(keys))  # 4 ingredients + 3 greedy candidates, each evaluated once
    assert {pid for pid, _, _ in log} == {w1.pid, w2.pid}  # both workers did some
    study = _queue(storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["key"] for t in done) == sorted(keys)
    assert study.user_attrs["soup"]["settings"] == {"heartbeat": 1, "grace": 3, "max_retry": 3}
    assert [r["done"] for k, r in study.user_attrs.items() if k.startswith("run:")] == [True]

    # the same soup as one process alone, bit for bit (the shared cache is the storage's database)
    assert ScoreCache(storage).count() == 7
    plain = load_recipe(recipe)
    plain.evaluator.args["delay"] = 0  # the same scores, at once
    ref = run_recipe(plain, output=tmp_path / "ref", cache=ScoreCache(None))
    assert ref.weights == EXPECTED
    assert soup.read_manifest(tmp_path / "soup-out").ingredients[0].weight == 0.5
    _same_soup(tmp_path / "soup-out", tmp_path / "ref")


def test_a_worker_killed_mid_candidate_has_it_run_again_by_the_other(tmp_path, storage):
    marker = tmp_path / "marker"
    recipe = _kitchen(tmp_path, delay=0.2, slow="ing2", marker=str(marker))
    workers = [_cli(tmp_path, f"w{i}", "worker", str(recipe), "--storage", storage, "--idle-timeout", "60", "-q")
               for i in (1, 2)]
    coord = _cli(tmp_path, "coord", "run", str(recipe), "--storage", storage, "--no-local-worker", "-q")
    deadline = time.monotonic() + 60
    while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    victim = int(marker.read_text())
    assert victim in (workers[0].pid, workers[1].pid)
    os.kill(victim, signal.SIGKILL)  # mid-candidate: it holds ing2, RUNNING
    res = _finish([coord, *workers])
    survivor = next(w for w in workers if w.pid != victim)
    assert res["coord"][0] == 0 and res[survivor.name][0] == 0 and res[survivor.name][1].split()[-2] == "done"
    assert next(w for w in workers if w.pid == victim).returncode == -signal.SIGKILL

    log = _log(tmp_path)
    keys = [k for _, k, _ in log]
    assert len(keys) == 7 == len(set(keys))
    assert [pid for pid, _, name in log if name == "ing2"] == [survivor.pid]  # re-run by the other worker
    study = _queue(storage)
    ing2 = [t for t in study.trials if t.user_attrs["name"] == "ing2"]
    states = sorted(t.state.name for t in ing2)
    assert states == ["COMPLETE", "FAIL"]  # the stale trial failed, its retry completed: counted once
    retry = next(t for t in ing2 if t.state.name == "COMPLETE")
    assert retry.system_attrs["failed_trial"] == next(t for t in ing2 if t.state.name == "FAIL").number
    assert run_recipe(load_recipe(recipe), output=tmp_path / "ref", cache=ScoreCache(storage)).weights == EXPECTED
    assert len(_log(tmp_path)) == 7  # the reference run took every score from the shared cache


def test_workers_on_postgresql(tmp_path, postgres):
    recipe = _kitchen(tmp_path, n=3, delay=0.3)
    workers = [_cli(tmp_path, f"w{i}", "worker", str(recipe), "--storage", postgres, "--idle-timeout", "60", "-q")
               for i in (1, 2)]
    coord = _cli(tmp_path, "coord", "run", str(recipe), "--storage", postgres, "--no-local-worker", "-q")
    res = _finish([coord, *workers])
    assert [r[0] for r in res.values()] == [0, 0, 0], res
    keys = [k for _, k, _ in _log(tmp_path)]
    assert len(keys) == 5 == len(set(keys))  # 3 ingredients + 2 greedy candidates
    assert ScoreCache(postgres).count() == 5  # the score cache is the same database (table soup_scores)
    assert len([t for t in _queue(postgres).trials if t.state.name == "COMPLETE"]) == 5
    assert soup.read_manifest(tmp_path / "soup-out").ingredients[0].weight == 0.5


def test_one_process_alone_finishes_and_optuna_dashboard_lists_the_queue(tmp_path, monkeypatch):
    from wsgiref.util import setup_testing_defaults

    import optuna_dashboard

    recipe = _kitchen(tmp_path)
    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    r = load_recipe(recipe)
    res = soup.greedy_soup([tmp_path / f"ing{i}" for i in range(4)], evaluator=r.evaluator.name,
                           evaluator_args=r.evaluator.args, out=tmp_path / "api-soup", storage=storage)
    assert res.weights == EXPECTED and len(_log(tmp_path)) == 7  # the coordinator's own worker did it all

    environ: dict = {}
    setup_testing_defaults(environ)
    environ["PATH_INFO"] = "/api/studies"
    status: list[str] = []
    body = b"".join(optuna_dashboard.wsgi(storage)(environ, lambda s, headers, exc=None: status.append(s)))
    assert status == ["200 OK"]
    listed = json.loads(body)["study_summaries"]
    assert [s["study_name"] for s in listed] == [_queue(storage).study_name]


def test_an_evaluator_failure_on_a_worker_is_one_error_naming_it(tmp_path):
    recipe = _kitchen(tmp_path, n=3, fail="ing1")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    with pytest.raises(EvaluatorError, match="logeval failed on ing1: RuntimeError: this candidate breaks the evaluator "
                                             r"\(on worker .* pid \d+\)"):
        run_recipe(load_recipe(recipe), storage=storage)
    study = _queue(storage)
    assert [r["done"] for k, r in study.user_attrs.items() if k.startswith("run:")] == [True]
    assert not [t for t in study.trials if t.state.name in ("WAITING", "RUNNING")]  # nothing left queued
    assert not (tmp_path / "soup-out").exists()


def test_a_worker_without_a_coordinator_stops_after_its_idle_timeout(tmp_path):
    recipe = _kitchen(tmp_path, n=2)
    res = runner.invoke(app, ["worker", str(recipe), "--storage", f"sqlite:///{tmp_path / 'study.db'}",
                              "--idle-timeout", "0.5", "-q"])
    assert res.exit_code == 1
    assert res.stderr.startswith("error: no study soup-queue-") and "after 0.5s: start `soup run RECIPE" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_a_storage_password_is_never_printed(tmp_path):
    recipe = _kitchen(tmp_path, n=2)
    url = "postgresql+psycopg://soup:Sup3rSecret@127.0.0.1:9/soup"
    for args in (["worker", str(recipe), "--storage", url, "-q"],
                 ["run", str(recipe), "--storage", url, "-q"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 1 and "Sup3rSecret" not in res.output + res.stderr
        assert "postgresql+psycopg://soup:***@127.0.0.1:9/soup" in res.stderr


def test_a_worker_told_to_stop_hands_its_candidate_back_at_once(tmp_path, storage):
    marker = tmp_path / "marker"
    recipe = _kitchen(tmp_path, n=3, slow="ing2", marker=str(marker))
    w1 = _cli(tmp_path, "w1", "worker", str(recipe), "--storage", storage, "--idle-timeout", "60")
    # no heartbeat expiry in this test: the hand-back alone must put the candidate back in the queue
    coord = _cli(tmp_path, "coord", "run", str(recipe), "--storage", storage, "--no-local-worker", "-q",
                 SOUP_HEARTBEAT_GRACE="600")
    deadline = time.monotonic() + 60
    while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert int(marker.read_text()) == w1.pid
    w1.send_signal(signal.SIGTERM)
    assert w1.wait(timeout=30) == 143
    assert "handed ing2 back to the queue" in w1.files[1].read_text()
    w2 = _cli(tmp_path, "w2", "worker", str(recipe), "--storage", storage, "--idle-timeout", "60", "-q")
    res = _finish([coord, w2])
    assert res["coord"][0] == 0 and res["w2"][0] == 0
    assert [pid for pid, _, name in _log(tmp_path) if name == "ing2"] == [w2.pid]
    ing2 = sorted((t.state.name, t.user_attrs["worker"].endswith(str(w2.pid)))
                  for t in _queue(storage).trials if t.user_attrs["name"] == "ing2")
    assert ing2 == [("COMPLETE", True), ("FAIL", False)]
    assert not list((tmp_path / "tmp").glob("soup-worker-*"))  # both workers removed their scratch folders


def test_a_candidate_whose_workers_die_more_than_soup_max_retry_times_stops_the_run(tmp_path, storage):
    """SOUP_MAX_RETRY=1: the first SIGKILLed worker's candidate is queued again once; when the worker
    that took the copy is killed too, the coordinator stops with one line naming the candidate."""
    marker = tmp_path / "marker"
    recipe = _kitchen(tmp_path, n=3, slow="ing2", marker=str(marker))
    workers = [_cli(tmp_path, f"w{i}", "worker", str(recipe), "--storage", storage, "--idle-timeout", "60", "-q")
               for i in (1, 2)]
    coord = _cli(tmp_path, "coord", "run", str(recipe), "--storage", storage, "--no-local-worker", "-q",
                 SOUP_MAX_RETRY="1")
    first = _wait_marker(marker)
    assert first in (workers[0].pid, workers[1].pid)
    marker.unlink()  # the next worker to take ing2 stalls too
    os.kill(first, signal.SIGKILL)
    second = _wait_marker(marker)
    assert second in (workers[0].pid, workers[1].pid) and second != first  # the retry went to the other
    os.kill(second, signal.SIGKILL)
    res = _finish([coord, *workers])
    assert [w.returncode for w in workers] == [-signal.SIGKILL] * 2
    code, stdout, stderr = res["coord"]
    assert code == 1 and stdout == "", stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("error: ing2: its worker died or stopped 2 times (last: ")
    assert "; see study soup-queue-" in stderr
    assert not (tmp_path / "soup-out").exists()
    study = _queue(storage)
    assert study.user_attrs["soup"]["settings"]["max_retry"] == 1
    ing2 = [t for t in study.trials if t.user_attrs["name"] == "ing2"]
    assert sorted(t.state.name for t in ing2) == ["FAIL", "FAIL"]  # one retry, then no more copies
    assert "ing2" not in {name for _, _, name in _log(tmp_path)}  # never scored
