"""Racing through the worker queue (issue 21, item 5): a race's batches, and a ranking's, are queued as
parts (one candidate's scores on some examples) that `soup worker` processes share, split among their
devices when these outnumber the sides. Checked on real processes and a real sqlite storage against the
same soup raced in one process: the same decisions on the same examples, each example of a candidate
evaluated once, and the run's accounting equal to what the evaluators logged."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import optuna
import pytest
import torch
from safetensors.torch import save_file

import soup
from soup.soups.cache import ScoreCache
from test_workers import _cli, _finish, _queue, _same_soup, _wait_for

# Per example i: right (1.0) when u(i) < the soup's ability, 1 - |mean norm weight - 1|; logs
# "pid key i,j,..." per call (one line per batch or part it is given).
EVALUATOR = '''
import hashlib, os, time
from soup.soups.evaluate import Evaluator

N = 640

def u(i):
    return int(hashlib.sha256(str(i).encode()).hexdigest()[:8], 16) / 16 ** 8

class RaceEval(Evaluator):
    name = "raceeval"
    score_is_mean = True
    example_range = (0.0, 1.0)

    def examples(self):
        return N

    def score_examples(self, candidate, indices):
        c = float(candidate.state_dict("cpu")["model.norm.weight"].double().mean())
        ability = max(0.0, 1.0 - abs(c - 1.0))
        time.sleep(float(self.args.get("delay", 0)))
        if self.args.get("fail") and self.args["fail"] in candidate.name:
            raise RuntimeError("this candidate breaks the evaluator")
        with open(self.args["log"], "a") as f:
            f.write(f"{os.getpid()} {candidate.key} {','.join(map(str, indices))}\\n")
        return [1.0 if u(i) < ability else 0.0 for i in indices]

    def score(self, candidate):
        return sum(self.score_examples(candidate, list(range(N)))) / N
'''

# greedy: ing1 (ability 0.9) first, + ing0 (0.95) kept, + ing2 (0.933) rejected, + ing3 (0.3) rejected
NORMS = (1.2, 0.9, 0.7, 3.0)


def _kitchen(tmp_path: Path, **args) -> Path:
    for i, c in enumerate(NORMS):
        d = tmp_path / f"ing{i}"
        d.mkdir()
        g = torch.Generator().manual_seed(i)
        save_file({"model.norm.weight": torch.full((8,), c), "model.layers.0.w": torch.randn(8, 8, generator=g)},
                  str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text("{}")
    (tmp_path / "raceeval.py").write_text(EVALUATOR)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("ingredients: [ing0, ing1, ing2, ing3]\nstrategy: greedy\n"
                      f"evaluator: {{name: ./raceeval.py:RaceEval, args: {json.dumps({'log': './eval.log', **args})}}}\n"
                      "output: soup-out\n")
    return recipe


def _calls(log: Path) -> list[tuple[int, str, list[int]]]:
    return [(int(pid), key, [int(i) for i in idx.split(",")])
            for pid, key, idx in (line.split(" ") for line in log.read_text().splitlines())]


def _steps(out: Path) -> list[tuple]:
    """What each evaluation decided and used: (candidate, examples, stopped, score when complete)."""
    ev = soup.read_manifest(out).evaluation
    return [(t.candidate, t.examples, t.of, t.stopped, None if t.partial else round(t.score, 9)) for t in ev.history]


def _reference(tmp_path: Path, recipe: Path) -> Path:
    """The same soup raced in one process, without a queue or a cache."""
    from soup.recipe import load_recipe
    from soup.run import run_recipe

    plain = load_recipe(recipe)
    plain.evaluator.args.update(log=str(tmp_path / "ref.log"), delay=0)
    run_recipe(plain, output=tmp_path / "ref", cache=ScoreCache(None))
    return tmp_path / "ref"


def _parts(storage: str) -> list[optuna.trial.FrozenTrial]:
    return [t for t in _queue(storage).trials if t.user_attrs.get("indices") is not None]


def test_a_race_through_the_queue_decides_as_in_one_process(tmp_path, monkeypatch):
    recipe = _kitchen(tmp_path)
    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    from soup.recipe import load_recipe

    r = load_recipe(recipe)
    res = soup.greedy_soup([tmp_path / f"ing{i}" for i in range(4)], evaluator=r.evaluator.name,
                           evaluator_args=r.evaluator.args, out=tmp_path / "soup-out", storage=storage)
    ref = _reference(tmp_path, recipe)
    assert res.weights == {"ing0": 0.5, "ing1": 0.5, "ing2": 0.0, "ing3": 0.0}
    assert _steps(tmp_path / "soup-out") == _steps(ref)
    assert any(s[3] == "separated" for s in _steps(ref))  # something was decided early
    _same_soup(tmp_path / "soup-out", ref)

    parts = _parts(storage)
    assert parts and all(t.state.name == "COMPLETE" for t in parts)
    calls = _calls(tmp_path / "eval.log")
    seen = Counter((key, i) for _, key, idx in calls for i in idx)
    assert max(seen.values()) == 1  # no example of a candidate evaluated twice
    assert sorted(seen) == sorted((t.user_attrs["candidate"], i) for t in parts for i in t.user_attrs["indices"])
    for t in parts:  # each part's values are the evaluator's, in its order
        cand = [c for c in calls if c[1] == t.user_attrs["candidate"] and c[2] == t.user_attrs["indices"]]
        assert len(cand) == 1 and t.value == pytest.approx(sum(t.user_attrs["values"]) / len(t.user_attrs["values"]))
    examples = soup.read_manifest(tmp_path / "soup-out").evaluation.examples
    assert examples["evaluated"] == sum(seen.values()) == sum(len(i) for _, _, i in _calls(tmp_path / "ref.log"))

    # a re-run reuses every example already seen: nothing is evaluated again
    before = len(calls)
    soup.greedy_soup([tmp_path / f"ing{i}" for i in range(4)], evaluator=r.evaluator.name,
                     evaluator_args=r.evaluator.args, out=tmp_path / "again", storage=storage)
    assert len(_calls(tmp_path / "eval.log")) == before
    _same_soup(tmp_path / "again", ref)


def test_workers_share_the_batches_of_one_race(tmp_path):
    recipe = _kitchen(tmp_path, delay=0.2)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    w1 = _cli(tmp_path, "w1", "worker", str(recipe), "--storage", storage, "--devices", "cpu,cpu",
              "--idle-timeout", "60")
    w2 = _cli(tmp_path, "w2", "worker", str(recipe), "--storage", storage, "--idle-timeout", "60")
    _wait_for([w1, w2], "waiting for a coordinator")  # both up before there is work: three devices
    coord = _cli(tmp_path, "coord", "run", str(recipe), "--storage", storage, "--no-local-worker", "-q")
    res = _finish([coord, w1, w2], timeout=150)
    assert [res[k][0] for k in ("coord", "w1", "w2")] == [0, 0, 0], res

    ref = _reference(tmp_path, recipe)
    assert _steps(tmp_path / "soup-out") == _steps(ref)
    _same_soup(tmp_path / "soup-out", ref)
    calls = _calls(tmp_path / "eval.log")
    assert {pid for pid, _, _ in calls} == {w1.pid, w2.pid}  # both workers took parts; the coordinator none
    seen = Counter((key, i) for _, key, idx in calls for i in idx)
    assert max(seen.values()) == 1
    assert soup.read_manifest(tmp_path / "soup-out").evaluation.examples["evaluated"] == sum(seen.values())
    # three devices, two sides: each side of a race's batch was split in two parts (the first batch of 128
    # in parts of 64, the later ones of 64 in parts of 32); a ranking's four candidates were not split; the
    # soup's missing examples (one request) in three parts
    sizes = Counter(len(t.user_attrs["indices"]) for t in _parts(storage))
    assert sizes[128] == 4 and sizes[32] >= 2 and max(sizes) == 128, sizes


def test_search_trials_raced_through_the_queue_are_pruned_as_in_one_process(tmp_path, monkeypatch):
    recipe = _kitchen(tmp_path)
    monkeypatch.chdir(tmp_path)
    from soup.recipe import load_recipe

    r = load_recipe(recipe)
    paths = [tmp_path / f"ing{i}" for i in range(4)]
    kw = dict(evaluator=r.evaluator.name, n_trials=8, sampler="random", seed=3)
    queued = soup.search_soup(paths, evaluator_args=r.evaluator.args, out=tmp_path / "soup-out",
                              storage=f"sqlite:///{tmp_path / 'study.db'}", **kw)
    alone = soup.search_soup(paths, evaluator_args=dict(r.evaluator.args, log=str(tmp_path / "ref.log")),
                             out=tmp_path / "ref", cache=None, **kw)
    assert queued.weights == alone.weights
    assert _steps(tmp_path / "soup-out") == _steps(tmp_path / "ref")
    assert any(s[3] == "separated" for s in _steps(tmp_path / "ref"))  # some trial was pruned
    assert _parts(f"sqlite:///{tmp_path / 'study.db'}")


def test_a_part_that_fails_on_a_worker_stops_the_run_with_one_error_naming_it(tmp_path):
    from soup.errors import EvaluatorError
    from soup.recipe import load_recipe
    from soup.run import run_recipe

    recipe = _kitchen(tmp_path, fail="(+ing2)")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    with pytest.raises(EvaluatorError, match=r"raceeval failed on greedy candidate 3/4 \(\+ing2\).*: RuntimeError: "
                                             r"this candidate breaks the evaluator \(on worker .* pid \d+\)"):
        run_recipe(load_recipe(recipe), storage=storage)
    study = _queue(storage)
    assert [r["done"] for k, r in study.user_attrs.items() if k.startswith("run:")] == [True]
    assert not [t for t in study.trials if t.state.name in ("WAITING", "RUNNING")]  # nothing left queued
    assert _parts(storage) and not (tmp_path / "soup-out").exists()
