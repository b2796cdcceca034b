"""The fused CPU kernel gives bit-identical results to the torch ops it replaces, at every CPU level.

The kernel is built with the package (setup.py); where it was not (no compiler at install time) these
tests skip and the engine's torch path is tested elsewhere, except under ``CI``, where a kernel that did not
build fails them (``SOUP_NO_KERNEL=1`` still skips: the kernel is off on purpose). Nothing here compiles or
writes files.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs
import pytest
import torch

import soup
from soup.engine import kernel
from soup.engine.combine import Combiner
from soup.errors import CheckpointError
from soup.engine.plan import Job

lib = kernel.load()
# the levels this CPU runs, by name ("baseline" first); each test below runs at every one (without the
# kernel, at one placeholder, so that each says why it does not run)
LEVELS = ["baseline"] if lib is None else [lib.cdll.soup_level_name(lv).decode() for lv in range(lib.level + 1)
                                           if lib.cdll.soup_level_supported(lv)]


@pytest.fixture(autouse=True)
def _kernel_built(request):
    """Skip without the kernel; fail under CI unless it is off on purpose (as PostgreSQL in conftest.py)."""
    if lib is not None or request.node.name == "test_disabled_kernel_falls_back":
        return
    if os.environ.get("SOUP_NO_KERNEL", "") not in ("", "0"):
        pytest.skip("SOUP_NO_KERNEL=1: the engine uses torch ops, tested elsewhere")
    if os.environ.get("CI"):
        pytest.fail("soup's C kernel was not built with this install (a C compiler at `pip install -e .`); "
                    "the kernel tests must not be skipped in CI", pytrace=False)
    pytest.skip("soup's C kernel was not built with this install: the engine uses torch ops, tested elsewhere")


@pytest.fixture(params=LEVELS)
def level(request, monkeypatch) -> str:
    monkeypatch.setenv("SOUP_KERNEL_VARIANT", request.param)
    assert kernel.variant() == request.param
    return request.param


def _adversarial(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-40, 38, n).flip(0)[torch.randperm(n, generator=g)]
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3.3e38, -3.3e38, 1.17e-38, 6e-39])[:n]  # subnormals, near max
    x[: len(special)] = special
    return x.to(dtype)


def _fused_and_plain(n_ingredients: int, **kw) -> tuple[Combiner, Combiner]:
    labels = [f"i{k}" for k in range(n_ingredients)]
    fused = Combiner(labels, where=lambda i, name: name, **kw)
    plain = Combiner(labels, where=lambda i, name: name, **kw)
    plain._fused = None
    assert fused._fused is not None
    return fused, plain


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("acc,out_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float32),
                                           (torch.float64, torch.bfloat16), (torch.float64, torch.float32),
                                           (torch.float64, torch.float64)])
def test_fused_equals_torch_ops(level, in_dtype, out_dtype, acc):
    n = 300_001
    xs = [_adversarial(n, in_dtype, s) / 4 for s in range(3)]
    job = Job("t", (n,), "mean", out_dtype, weights=(0.2, 0.3, 0.5))
    fused, plain = _fused_and_plain(3, block=65536, accumulate=acc)
    assert fused._fused.lib.variant == level
    got = torch.cat([b.clone() for b in fused.blocks(job, xs)])
    want = torch.cat([b.clone() for b in plain.blocks(job, xs)])
    assert got.dtype == out_dtype
    assert _same_bits(got, want)  # bit for bit, signed zeros and NaN payloads included


@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
def test_vector_tails_and_nan(level, acc):
    """Lengths around every vector width (the loops' scalar epilogues), NaN and inf mixed in."""
    fused, plain = _fused_and_plain(2, block=4096, threads=1, accumulate=acc)
    for n in (1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 129, 1000):
        xs = [_adversarial(n, torch.bfloat16, n), _adversarial(n, torch.float32, n + 1)]
        xs[1][n // 2] = float("nan")
        job = Job("t", (n,), "mean", torch.bfloat16, weights=(0.7, 0.3))
        with pytest.raises(CheckpointError, match="non-finite"):  # the NaN is reported by both paths
            list(fused.blocks(job, xs))
        xs[1][n // 2] = 0.0
        got = torch.cat([b.clone() for b in fused.blocks(job, xs)])
        want = torch.cat([b.clone() for b in plain.blocks(job, xs)])
        assert _same_bits(got, want), n


def test_float64_to_bfloat16_rounds_through_float32(level):
    """torch casts float64 to bfloat16 through float32 (two roundings); the kernel does the same.
    1 + 2^-8 + 2^-30 rounds to 1 + 2^-7 directly, but to 1 + 2^-8 in float32, a tie, then to 1."""
    n = 1000  # vector bodies and tails
    x0 = torch.full((n,), 1 + 2**-8, dtype=torch.float32) * torch.randint(-1, 2, (n,)).float()
    x1 = torch.full((n,), 2**-30, dtype=torch.float32)
    job = Job("t", (n,), "mean", torch.bfloat16, weights=(1.0, 1.0))
    fused, plain = _fused_and_plain(2, block=4096, threads=1, accumulate=torch.float64)
    got = torch.cat([b.clone() for b in fused.blocks(job, [x0, x1])])
    want = torch.cat([b.clone() for b in plain.blocks(job, [x0, x1])])
    assert _same_bits(got, want)
    assert _same_bits(want, (x0.double() + x1.double()).to(torch.bfloat16))
    assert (want[x0 > 0] == 1.0).all()  # not 1 + 2^-7


def test_fused_reports_non_finite_with_ingredient(level):
    xs = [torch.ones(1000, dtype=torch.bfloat16), torch.ones(1000, dtype=torch.bfloat16)]
    xs[1][777] = float("inf")
    comb = Combiner(["a", "b"], where=lambda i, name: f"file{i}")
    with pytest.raises(CheckpointError, match="file1: tensor t: non-finite value inf at flat index 777"):
        list(comb.blocks(Job("t", (1000,), "mean", torch.bfloat16, weights=(0.5, 0.5)), xs))


def test_kernel_is_the_packaged_library():
    """Loaded from the package folder (built with it), never from a user-writable cache."""
    k = kernel.load()
    assert k.path.parent == Path(soup.__file__).resolve().parent / "engine"
    assert k.path.name.startswith("_kernel") and k.path.is_file()
    assert not k.path.is_relative_to(platformdirs.user_cache_path())


def test_variant_is_the_best_this_cpu_runs(monkeypatch):
    monkeypatch.delenv("SOUP_KERNEL_VARIANT", raising=False)
    assert kernel.variant() == LEVELS[-1]
    # torch detects CPU features on its own: where it uses AVX2 / AVX-512 code, so must the kernel
    torch_level = torch.backends.cpu.get_cpu_capability()
    if torch_level in ("AVX2", "AVX512"):
        assert kernel.variant() in ("avx2", "avx512")
    if torch_level == "AVX512":
        assert kernel.variant() == "avx512"


def test_variant_cap(monkeypatch):
    monkeypatch.setenv("SOUP_KERNEL_VARIANT", "baseline")
    assert kernel.variant() == "baseline"
    monkeypatch.setenv("SOUP_KERNEL_VARIANT", "sse9")
    with pytest.warns(UserWarning, match="SOUP_KERNEL_VARIANT='sse9' is not one of baseline"):
        assert kernel.variant() == LEVELS[-1]


def test_library_refuses_levels_this_cpu_lacks():
    """The library runs the baseline for any level the CPU does not support: no illegal instruction."""
    cdll = kernel.load().cdll
    assert cdll.soup_level_supported(0) == 1
    assert cdll.soup_level_supported(-1) == cdll.soup_level_supported(99) == 0
    assert cdll.soup_level_name(99) is None
    x = torch.arange(100, dtype=torch.float32)
    for level in (-1, 99):
        acc = torch.empty(100)
        cdll.soup_accumulate(level, acc.data_ptr(), x.data_ptr(), 1, 0.5, 100, 1)
        assert torch.equal(acc, x * 0.5)
        acc64 = torch.empty(100, dtype=torch.float64)
        cdll.soup_accumulate64(level, acc64.data_ptr(), x.data_ptr(), 1, 0.5, 100, 1)
        assert torch.equal(acc64, x.double() * 0.5)


def test_disabled_kernel_falls_back(monkeypatch):
    monkeypatch.setenv("SOUP_NO_KERNEL", "1")
    assert kernel.load() is None
    assert kernel.variant() is None
    assert Combiner(["a"], where=lambda i, n: n)._fused is None
