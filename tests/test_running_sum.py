"""Greedy's running sum: placed where it fits (device, host memory, disk), updated in place, and its
candidates computed straight into a resident model."""

from __future__ import annotations

import pytest
import torch

import soup.soups.scorer as scorer_mod
from soup.errors import RecipeError
from soup.evaluators.python import PythonEvaluator
from soup.io.ingredients import resolve_all
from soup.pipeline import greedy_soup
from soup.soups.scorer import RunningSum, Scorer, place_running_sum

from conftest import make_state, write_checkpoint

GiB = 1 << 30


@pytest.fixture
def four(tmp_path):
    paths, states = [], []
    for i, name in enumerate("abcd"):
        st = make_state(20 + i)
        paths.append(write_checkpoint(tmp_path / name, st))
        states.append(st)
    return paths, states


def _pool(paths, storage: str, device: str = "cpu") -> RunningSum:
    bench = Scorer(resolve_all(paths), [PythonEvaluator(fn=lambda c: 0.0)], devices=[device])
    return RunningSum(bench, 0, storage=storage, device=device)


def test_placement_from_free_memory(monkeypatch):
    host = {"free": 20 * GiB, "total": 24 * GiB}
    gpu = {"free": 10 * GiB, "total": 140 * GiB}
    monkeypatch.setattr(scorer_mod, "host_memory", lambda: (host["free"], host["total"]))
    monkeypatch.setattr(scorer_mod, "device_memory", lambda dev: (gpu["free"], gpu["total"]))
    # the margin is max(1 GiB, 10% of the total): 2.4 GiB on the host, 14 GiB on the GPU
    assert place_running_sum(17 * GiB, "cpu") == "memory"
    assert place_running_sum(18 * GiB, "cpu") == "disk"
    assert place_running_sum(17 * GiB, "cuda:0") == "memory"  # 10 GiB free < 14 GiB of margin
    gpu["free"] = 100 * GiB
    assert place_running_sum(86 * GiB, "cuda:1") == "device"
    assert place_running_sum(87 * GiB, "cuda:1") == "disk"  # nor does the host have room
    host["free"] = 2 * GiB
    assert place_running_sum(1, "cpu") == "disk"  # less than the margin: nothing fits


def test_host_memory_reads_proc_meminfo():
    free, total = scorer_mod.host_memory()
    assert 0 < free <= total


@pytest.mark.parametrize("storage,placement", [("auto", "memory"), ("memory", "memory"), ("device", "device"),
                                               ("disk", "disk")])
def test_sums_placed_and_updated_in_place(four, storage, placement, monkeypatch):
    paths, states = four
    monkeypatch.setattr(scorer_mod, "host_memory", lambda: (64 * GiB, 64 * GiB))
    pool = _pool(paths, storage)
    s1 = pool._current()
    assert pool.placement == placement and (pool._tmp is not None) == (placement == "disk")
    ptrs = {k: v.data_ptr() for k, v in s1.memory.items()} if s1.memory is not None else None
    pool.add(2)
    pool.add(1)
    s3 = pool._current()
    assert s3.label == "pool-sum-of-3"
    if ptrs is not None:  # in memory the sum is updated in place: one sum, never two
        assert {k: v.data_ptr() for k, v in s3.memory.items()} == ptrs
    for name, x in states[0].items():  # ((x0 + x2) + x1), each sum rounded to float32
        got = s3.memory[name] if s3.memory is not None else _read(s3, name)
        if not x.is_floating_point():
            assert torch.equal(got, x)
            continue
        want = ((x.double() + states[2][name].double()).float().double() + states[1][name].double()).float()
        assert torch.equal(got, want), name
    pool.close()


def _read(ck, name):
    from soup.engine.stream import TensorReader

    r = TensorReader(ck)
    try:
        return r.view(name).clone().reshape(ck.tensors[name].shape)
    finally:
        r.close()


def test_auto_goes_to_disk_when_memory_is_short(four, monkeypatch):
    paths, _ = four
    monkeypatch.setattr(scorer_mod, "host_memory", lambda: (GiB, 8 * GiB))
    pool = _pool(paths, "auto")
    assert pool._current().memory is None and pool.placement == "disk"
    pool.close()


def test_candidate_load_into_a_resident_model(four):
    """A running-sum candidate computed into resident tensors equals its state dict, bit for bit,
    and the resident tensors are the ones written (no copy swapped in)."""
    paths, _ = four
    pool = _pool(paths, "auto")
    pool.add(1)
    cand = pool.candidate(3, "pool+d")
    model = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in make_state(0).items()}
    ptrs = {k: v.data_ptr() for k, v in model.items()}
    cand.load_into(model)
    sd = cand.state_dict("cpu")
    assert all(torch.equal(model[k], sd[k]) for k in sd)
    assert {k: v.data_ptr() for k, v in model.items()} == ptrs
    pool.close()


@pytest.mark.parametrize("sums", ["auto", "device", "memory", "disk"])
def test_greedy_same_choice_wherever_the_sum_lives(four, sums):
    paths, _ = four

    table = {"a": 0.8, "b": 0.6, "c": 0.9, "d": 0.5, "ac": 0.91, "abc": 0.92, "abcd": 0.5}

    def by_members(candidate):
        return table["".join(sorted(candidate.weights))]

    res = greedy_soup(paths, PythonEvaluator(fn=by_members), cache=None, sums=sums)
    assert res.weights == {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3, "d": 0.0}


def test_bad_sums_value():
    from soup.soups.strategies import make_strategy

    with pytest.raises(RecipeError, match="strategy.sums: 'gpu' must be one of auto, device, memory, disk"):
        make_strategy("greedy", sums="gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sum_on_the_gpu_and_candidates_into_a_gpu_model(four):
    paths, _ = four
    pool = _pool(paths, "auto", device="cuda")
    pool.add(1)
    cand = pool.candidate(2, "pool+c")
    assert pool.placement == "device" and all(t.is_cuda for t in pool._sum.memory.values())
    model = {k: torch.zeros(v.shape, dtype=v.dtype, device="cuda") for k, v in make_state(0).items()}
    cand.load_into(model)
    on_cpu = _pool(paths, "memory")
    on_cpu.add(1)
    ref = on_cpu.candidate(2, "pool+c").state_dict("cpu")
    assert all(torch.equal(model[k].cpu(), ref[k]) for k in ref)
    pool.close()
    on_cpu.close()


def test_benchmark_memory_is_model_plus_sum_plus_blocks(tmp_path):
    """benchmarks/bench_greedy_candidate.py, small and warm only: a candidate built from the running
    sum into a resident model allocates no more than a few blocks besides the model and the sum."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).parent.parent / "benchmarks" / "bench_greedy_candidate.py"
    res = subprocess.run([sys.executable, str(bench), "--size", "32MB", "--repeats", "1", "--no-cold",
                          "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["placement"] == "memory" and r["sum_bytes"] == 2 * r["model_bytes"]
    peak = max(row["peak_anon_above_base"] for row in r["rows"])
    assert peak < r["model_bytes"] + r["sum_bytes"] + (48 << 20), r
    assert "peak anonymous memory" in res.stdout
