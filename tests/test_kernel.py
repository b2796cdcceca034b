"""The fused CPU kernel gives bit-identical results to the torch ops it replaces."""

from __future__ import annotations

import pytest
import torch

from soup import kernel
from soup.combine import Combiner
from soup.errors import CheckpointError
from soup.plan import Job

lib = kernel.load()
pytestmark = pytest.mark.skipif(lib is None, reason="no C compiler here: the engine uses torch ops (tested elsewhere)")


def _adversarial(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-40, 38, n).flip(0)[torch.randperm(n, generator=g)]
    x[:8] = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3.3e38, -3.3e38, 1.17e-38, 6e-39])  # subnormals, near max
    return x.to(dtype)


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_fused_equals_torch_ops(in_dtype, out_dtype):
    n = 300_001
    xs = [_adversarial(n, in_dtype, s) / 4 for s in range(3)]
    job = Job("t", (n,), "mean", out_dtype, weights=(0.2, 0.3, 0.5))
    fused = Combiner(["a", "b", "c"], where=lambda i, name: name, block=65536)
    plain = Combiner(["a", "b", "c"], where=lambda i, name: name, block=65536)
    plain._fused = None
    assert fused._fused is not None
    got = torch.cat([b.clone() for b in fused.blocks(job, xs)])
    want = torch.cat([b.clone() for b in plain.blocks(job, xs)])
    assert got.dtype == want.dtype == out_dtype
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))  # bit for bit, signed zeros included


def test_fused_reports_non_finite_with_ingredient():
    xs = [torch.ones(1000, dtype=torch.bfloat16), torch.ones(1000, dtype=torch.bfloat16)]
    xs[1][777] = float("inf")
    comb = Combiner(["a", "b"], where=lambda i, name: f"file{i}")
    with pytest.raises(CheckpointError, match="file1: tensor t: non-finite value inf at flat index 777"):
        list(comb.blocks(Job("t", (1000,), "mean", torch.bfloat16, weights=(0.5, 0.5)), xs))


def test_disabled_kernel_falls_back(monkeypatch):
    monkeypatch.setenv("SOUP_NO_KERNEL", "1")
    assert kernel.load() is None
    assert Combiner(["a"], where=lambda i, n: n)._fused is None
