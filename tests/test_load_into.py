"""The in-place sink: ``soup.merge(ingredients, model)`` and ``candidate.load_into(model)`` compute the
soup straight into existing tensors, bit for bit equal to the definition, with no second copy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import soup
from conftest import reference_mean
from soup.soups.scorer import Scorer
from soup.errors import IncompatibleIngredients
from soup.evaluators.python import PythonEvaluator
from soup.io.ingredients import resolve_all


class Tiny(torch.nn.Module):
    """Embeddings tied to the head, a bf16 layer, a buffer: the cases a resident model has."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 6)
        self.body = torch.nn.Linear(6, 6).to(torch.bfloat16)
        self.head = torch.nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.ones(6))


def fine_tunes(tmp_path: Path, n: int = 3) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    paths, states = [], []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        sd = {k: torch.randn(v.shape, generator=g).to(v.dtype) for k, v in Tiny().state_dict().items()
              if k != "head.weight"}  # checkpoints store tied weights once
        (tmp_path / f"ft{i}").mkdir()
        save_file(sd, str(tmp_path / f"ft{i}" / "model.safetensors"))
        paths.append(tmp_path / f"ft{i}")
        states.append(sd)
    return paths, states


def test_merge_into_a_module_is_the_exact_soup(tmp_path):
    paths, states = fine_tunes(tmp_path)
    model = Tiny()
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    res = soup.merge(paths, model, weights=[1, 2, 3])
    ref = reference_mean(states, [1 / 6, 2 / 6, 3 / 6])
    got = model.state_dict()
    assert res.state_dict is None
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert torch.equal(got["head.weight"], ref["embed.weight"])  # tied: written once, seen twice
    assert {k: v.data_ptr() for k, v in got.items()} == ptrs  # in place: the same storage
    assert got["body.weight"].dtype == torch.bfloat16


def test_into_a_mapping_converts_to_each_tensors_dtype(tmp_path):
    paths, states = fine_tunes(tmp_path, 2)
    target = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in states[0].items()}
    soup.merge(paths, target)
    ref = reference_mean(states, [0.5, 0.5])
    assert all(torch.equal(target[k], ref[k].double()) for k in ref)


def test_target_and_soup_must_fit(tmp_path):
    paths, _ = fine_tunes(tmp_path, 2)

    class Bigger(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.extra = torch.nn.Linear(2, 2)

    with pytest.raises(IncompatibleIngredients, match=r"Bigger has 2 tensor\(s\) the soup does not provide"):
        soup.merge(paths, Bigger())
    small = {k: v for k, v in Tiny().state_dict().items() if k not in ("scale", "head.weight")}
    with pytest.raises(IncompatibleIngredients, match="tensor scale: in the soup but not in the target"):
        soup.merge(paths, small)
    wrong = dict(Tiny().state_dict(), scale=torch.ones(7))
    with pytest.raises(IncompatibleIngredients, match=r"tensor scale: shape \[6\] in the soup but \[7\]"):
        soup.merge(paths, wrong)


@pytest.mark.parametrize("weights", [[0.2, 0.3, 0.5], [0.5, 0.0, 0.5]])
def test_candidate_load_into_equals_its_state_dict(tmp_path, weights):
    paths, _ = fine_tunes(tmp_path)
    cks = resolve_all(paths)
    bench = Scorer(cks, [PythonEvaluator(fn=lambda c: 0.0)])
    cand = bench.candidate(weights, "weighted")
    model = Tiny()
    cand.load_into(model)
    sd = cand.state_dict("cpu")
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)


def test_load_into_from_a_state_dict_candidate():
    src = Tiny()
    sd = {k: v for k, v in src.state_dict().items() if k != "head.weight"}
    model = Tiny()
    soup.Candidate.from_state_dict("memory", sd).load_into(model)
    assert all(torch.equal(model.state_dict()[k], src.state_dict()[k]) for k in sd)


def test_peak_memory_of_load_into_is_the_model_plus_blocks(tmp_path):
    """benchmarks/bench_load_into.py: a 64 MB model, its candidate loaded both ways in fresh processes."""
    bench = Path(__file__).parent.parent / "benchmarks" / "bench_load_into.py"
    res = subprocess.run([sys.executable, str(bench), "--size", "64MB", "--dir", str(tmp_path), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    import json

    r = json.loads(res.stdout)
    assert r["load_into"]["peak_over_model"] < 1.3, r
    assert r["state_dict"]["peak_over_model"] > 1.7, r  # the copy that load_into avoids
