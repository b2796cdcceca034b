"""Evaluators on GPUs: one resident model per device, candidates loaded into it in place, scores equal
to the CPU's. These tests run only where CUDA is available (two GPUs for the multi-device one)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_lm import build_tiny_lm  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
transformers = pytest.importorskip("transformers")

from soup import greedy_soup  # noqa: E402
from soup.soups.evaluate import Candidate, load_evaluator  # noqa: E402
from soup.evaluators.perplexity import PerplexityEvaluator  # noqa: E402

DOCS = ["the cat sat on the mat .", "a dog ran to the park", "the sun is big and the moon is small ."]


class Recording(PerplexityEvaluator):
    """The perplexity evaluator, noting which evaluator scored on which device with which model."""

    seen: ClassVar[list[tuple[int, str, int]]] = []

    def score(self, candidate):
        out = super().score(candidate)
        Recording.seen.append((id(self), str(next(self.model.parameters()).device), id(self.model)))
        return out


@pytest.fixture(scope="module")
def lms(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("gpu-lms")
    return [build_tiny_lm(root / f"lm{i}", seed=i) for i in range(3)]


@pytest.fixture
def data(tmp_path) -> Path:
    p = tmp_path / "docs.txt"
    p.write_text("\n".join(DOCS))
    return p


def _candidate(name: str, folder: Path) -> Candidate:
    from safetensors.torch import load_file

    return Candidate.from_state_dict(name, load_file(str(folder / "model.safetensors")), key=f"key-{name}")


def test_resident_model_on_cuda_scores_as_on_cpu(lms, data):
    cpu = load_evaluator("perplexity", data=str(data), model=str(lms[0]), device="cpu")
    gpu = load_evaluator("perplexity", data=str(data), model=str(lms[0]), device="cuda")
    got = []
    for i, folder in enumerate(lms):
        want = cpu.score(_candidate(f"lm{i}", folder))["loss"]
        have = gpu.score(_candidate(f"lm{i}", folder))["loss"]
        assert have == pytest.approx(want, rel=1e-4)
        got.append(gpu.model)
        assert next(gpu.model.parameters()).is_cuda
    assert all(m is got[0] for m in got)  # one resident model, every candidate loaded into it


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_greedy_on_two_gpus_keeps_one_resident_model_on_each(lms, data, tmp_path):
    args = {"data": str(data), "model": str(lms[0])}
    Recording.seen = []
    two = greedy_soup(lms, Recording, evaluator_args=args, devices=["cuda:0", "cuda:1"], out=tmp_path / "two",
                      cache=None)
    by_evaluator: dict[int, set[tuple[str, int]]] = {}
    for ev, device, model in Recording.seen:
        by_evaluator.setdefault(ev, set()).add((device, model))
    assert len(by_evaluator) == 2
    assert sorted(d for pairs in by_evaluator.values() for d, _ in pairs) == ["cuda:0", "cuda:1"]
    assert all(len(pairs) == 1 for pairs in by_evaluator.values())  # one device, one model object each
    one = greedy_soup(lms, "perplexity", evaluator_args={**args, "device": "cpu"}, out=tmp_path / "one", cache=None)
    assert [t["kept"] for t in two.trajectory] == [t["kept"] for t in one.trajectory]
    assert two.soup_score.value == pytest.approx(one.soup_score.value, rel=1e-4)
