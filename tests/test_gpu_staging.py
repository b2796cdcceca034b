"""``--device cuda``: means fed through pinned staging buffers and asynchronous copies (soup.engine.staging).

Two halves:
- everywhere: the staging schedule on a CPU with a simulated runtime whose side streams run their
  queued copies only when something waits for them (a missing wait shows as wrong values), driven
  by ``Combiner`` itself and compared bit for bit with the CPU path;
- with a CUDA device: merges to disk, to memory and into a model on the GPU, bit for bit equal to
  the CPU merge; pinned buffers really pinned and reused; non-finite inputs still named.
"""

from __future__ import annotations

from collections import deque

import pytest
import torch

import soup
from soup.engine.combine import Combiner
from soup.errors import CheckpointError
from soup.engine.plan import Job
from soup.engine.staging import CudaStaging

from conftest import load_soup, reference_mean, write_checkpoint

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --- a simulated runtime: side streams are queues run lazily ----------------------------------------


class SimStream:
    """A stream: ``sync`` runs work at once (the compute stream: torch ops on the CPU); otherwise
    work is queued and runs only when an event recorded after it is waited for."""

    def __init__(self, sync: bool = False) -> None:
        self.sync = sync
        self.queue: deque = deque()

    def enqueue(self, fn) -> None:
        if self.sync:
            fn()
        else:
            self.queue.append(fn)

    def run_until(self, marker) -> None:
        while marker in self.queue:
            item = self.queue.popleft()
            if item is not marker:
                item()

    def wait_event(self, ev: "SimEvent") -> None:
        target = ev.pending  # the record at the time of the wait, as cudaStreamWaitEvent does
        self.enqueue(lambda: SimEvent.complete(target))


class SimEvent:
    def __init__(self) -> None:
        self.pending = None  # (stream, marker) of the last record, None when complete

    def record(self, stream: SimStream) -> None:
        if stream.sync:
            self.pending = None
        else:
            marker = object()
            stream.queue.append(marker)
            self.pending = (stream, marker)

    def synchronize(self) -> None:
        SimEvent.complete(self.pending)

    @staticmethod
    def complete(target) -> None:
        if target is not None:
            target[0].run_until(target[1])


class SimRuntime:
    """``soup.engine.staging.CudaRuntime``'s interface on the CPU."""

    def __init__(self) -> None:
        self.current = SimStream(sync=True)
        self.side: list[SimStream] = []
        self.allocated: list[int] = []

    def stream(self) -> SimStream:
        self.side.append(SimStream())
        return self.side[-1]

    def current_stream(self) -> SimStream:
        return self.current

    def event(self) -> SimEvent:
        return SimEvent()

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        self.allocated.append(nbytes)
        return torch.full((nbytes,), 0xEE, dtype=torch.uint8)  # garbage, as fresh memory is

    def device_buffer(self, nbytes: int, side_stream) -> torch.Tensor:
        return torch.full((nbytes,), 0xEE, dtype=torch.uint8)

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, stream: SimStream) -> None:
        stream.enqueue(SimCopy(dst, src))


class SimCopy:
    """A queued copy, run when its stream gets that far."""

    def __init__(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.dst, self.src = dst, src

    def __call__(self) -> None:
        self.dst.copy_(self.src)


def _simulated(comb: Combiner) -> SimRuntime:
    """Route ``comb``'s means through staging on the CPU, as on a CUDA device."""
    rt = SimRuntime()
    comb._staged, comb._staging = True, CudaStaging("cpu", runtime=rt)
    return rt


def _inputs(n: int, dtype: torch.dtype, k: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(dtype) for _ in range(k)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _run(comb: Combiner, job: Job, xs) -> torch.Tensor:
    """Every block of ``job``, each copied before the next is asked for (the Combiner contract)."""
    return torch.cat([b.clone() for b in comb.blocks(job, xs)])


# --- everywhere: the schedule, simulated -------------------------------------------------------------


@pytest.mark.parametrize("host_output", [True, False])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                             (torch.float32, torch.float32), (torch.float32, torch.bfloat16)])
def test_staged_mean_is_the_cpu_mean_bit_for_bit(dtype, out_dtype, host_output):
    """Several blocks and an odd tail, through double-buffered staging with lazy side streams."""
    n = 10_007
    xs = _inputs(n, dtype)
    job = Job("t", (n,), "mean", out_dtype, weights=(0.2, 0.3, 0.5))
    comb = Combiner(["a", "b", "c"], where=lambda i, name: name, block=1000, identical=False,
                    host_output=host_output)
    _simulated(comb)
    got = _run(comb, job, xs)
    cpu = _run(Combiner(["a", "b", "c"], where=lambda i, name: name, block=1000, identical=False), job, xs)
    ref = reference_mean([{"t": x} for x in xs], [0.2, 0.3, 0.5], out_dtype)["t"]
    assert got.dtype == out_dtype and torch.equal(_bits(got), _bits(cpu)) and torch.equal(_bits(got), _bits(ref))


def test_next_block_is_staged_before_the_math_of_this_one():
    """The overlap: when block b is handed to the math, block b+1's H2D copies are already queued
    (and not yet waited for); the math's inputs are block b's, in full."""
    n, step = 5_000, 1000
    xs = _inputs(n, torch.bfloat16)
    rt = SimRuntime()
    staging = CudaStaging("cpu", runtime=rt)
    copy_stream = rt.side[0]
    seen = []
    for start, stop, chunks in staging.inputs(xs, step, n):
        assert all(torch.equal(c, x[start:stop]) for c, x in zip(chunks, xs))
        queued = [f for f in copy_stream.queue if isinstance(f, SimCopy)]
        seen.append((start, len(queued)))
    blocks = n // step
    assert seen == [(b * step, 3 if b + 1 < blocks else 0) for b in range(blocks)]  # 3 inputs of block b+1


def test_host_output_is_one_block_behind_and_in_order():
    """``to_host``: the D2H copy of block b is queued before block b is handed out, and block b is
    handed out only after block b+1's math (its D2H copy then overlaps that math)."""
    rt = SimRuntime()
    staging = CudaStaging("cpu", runtime=rt)
    made = []

    def device_blocks():
        acc = torch.empty(100)
        for b in range(4):
            acc.fill_(b)  # one reused accumulator, as Combiner's: overwritten by the next block
            made.append(b)
            yield acc[: 100 - b]

    got = []
    for block in staging.to_host(device_blocks(), reserve=400):
        got.append((len(made), block.clone()))
    assert [m for m, _ in got] == [2, 3, 4, 4]  # block b is yielded once block b+1 is computed
    assert all(torch.equal(t, torch.full((100 - b,), float(b))) for b, (_, t) in enumerate(got))


@pytest.mark.parametrize("host_output", [True, False])
def test_staging_buffers_are_reused_across_jobs_and_grown_when_needed(host_output):
    comb = Combiner(["a", "b"], where=lambda i, name: name, block=1000, identical=False, host_output=host_output)
    rt = _simulated(comb)
    job = Job("t", (3_001,), "mean", torch.bfloat16, weights=(0.5, 0.5))
    _run(comb, job, _inputs(3_001, torch.bfloat16, 2, seed=1))
    first = [b.data_ptr() for b in comb._staging.buffers()]
    assert len(first) == 2 * 2 + (2 if host_output else 0)  # two per input slot, two for outputs
    assert rt.allocated[:4] == [1000 * 2] * 4  # a full block of bfloat16 (float32 accumulation)
    _run(comb, Job("u", (2_500,), "mean", torch.bfloat16, weights=(0.5, 0.5)), _inputs(2_500, torch.bfloat16, 2))
    assert [b.data_ptr() for b in comb._staging.buffers()] == first
    # float32 accumulated in float32: a block of 1000 float32 values, twice the bytes: grown
    forced = Job("v", (2_500,), "mean", torch.float32, weights=(0.5, 0.5))
    comb.accumulate = torch.float32
    xs = _inputs(2_500, torch.float32, 2)
    cpu = Combiner(["a", "b"], where=lambda i, name: name, block=1000, identical=False, accumulate=torch.float32)
    assert torch.equal(_run(comb, forced, xs), _run(cpu, forced, xs))
    assert min(b.numel() for b in comb._staging.buffers()) == 4000


@pytest.mark.parametrize("host_output", [True, False])
def test_staged_non_finite_input_names_the_ingredient(host_output):
    xs = _inputs(5_000, torch.bfloat16)
    xs[1][3_456] = float("nan")
    comb = Combiner(["a", "b", "c"], where=lambda i, name: f"file{i}", block=1000, host_output=host_output)
    _simulated(comb)
    with pytest.raises(CheckpointError, match=r"file1: tensor t: non-finite value nan at flat index 3456 "
                                              r"\(ingredient b\)"):
        _run(comb, Job("t", (5_000,), "mean", torch.bfloat16, weights=(0.2, 0.3, 0.5)), xs)


def test_staged_cast_overflow_is_caught():
    xs = [torch.full((3_000,), 3.4e38), torch.full((3_000,), 3.398e38)]  # different: the mean is computed
    xs[0][:2_500], xs[1][:2_500] = 1.0, 2.0
    comb = Combiner(["a", "b"], where=lambda i, name: f"file{i}", block=1000, host_output=True)
    _simulated(comb)
    with pytest.raises(CheckpointError, match=r"tensor t: the weighted mean overflows bfloat16 .* at flat index 2500 "):
        _run(comb, Job("t", (3_000,), "mean", torch.bfloat16, weights=(0.5, 0.5)), xs)


def test_identical_tensors_and_takes_never_reach_the_staging():
    """The soup of identical tensors is their bytes: no staging, even when means are staged."""
    x = _inputs(3_000, torch.bfloat16, 1)[0]
    comb = Combiner(["a", "b"], where=lambda i, name: name, block=1000, host_output=True)
    rt = _simulated(comb)
    got = _run(comb, Job("t", (3_000,), "mean", torch.bfloat16, weights=(0.5, 0.5)), [x, x.clone()])
    assert torch.equal(_bits(got), _bits(x)) and rt.allocated == []


def test_a_cpu_combiner_never_stages(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("staging on a CPU")

    monkeypatch.setattr("soup.engine.combine.CudaStaging", refuse)
    for host_output in (False, True):
        comb = Combiner(["a", "b"], where=lambda i, name: name, block=1000, identical=False, host_output=host_output)
        _run(comb, Job("t", (3_000,), "mean", torch.bfloat16, weights=(0.5, 0.5)), _inputs(3_000, torch.bfloat16, 2))
        assert not comb._staged and comb._staging is None


# --- with a CUDA device -------------------------------------------------------------------------------


def _states(dtype: torch.dtype, n: int = 3, big: int = 2 * 4_194_304 + 4_097) -> list[dict[str, torch.Tensor]]:
    """Fine-tunes: a tensor of several GPU blocks with an odd tail, odd small ones, a frozen one
    (identical in every ingredient), an integer buffer."""
    frozen = torch.randn(333, generator=torch.Generator().manual_seed(99)).to(dtype)
    states = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        states.append({"big": torch.randn(big, generator=g).to(dtype),
                       "odd": torch.randn(1001, 3, generator=g).to(dtype),
                       "tiny": torch.randn(7, generator=g).to(dtype),
                       "scalar": torch.randn((), generator=g).to(dtype),
                       "frozen": frozen.clone(),
                       "ids": torch.arange(5)})
    return states


def _write(tmp_path, states) -> list:
    return [write_checkpoint(tmp_path / f"ing{i}", st) for i, st in enumerate(states)]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(_bits(a[k].cpu()), _bits(b[k].cpu()))
                                    for k in a)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_merge_to_disk_is_the_cpu_merge_bit_for_bit(tmp_path, dtype):
    states = _states(dtype)
    paths = _write(tmp_path, states)
    gpu = load_soup(soup.merge(paths, tmp_path / "gpu", weights=[1, 2, 5], device="cuda").path)
    cpu = load_soup(soup.merge(paths, tmp_path / "cpu", weights=[1, 2, 5]).path)
    assert _same(gpu, cpu)
    assert _same(gpu, reference_mean(states, [1 / 8, 2 / 8, 5 / 8]))


@cuda
@pytest.mark.parametrize("options", [{"dtype": "bfloat16"}, {"dtype": "float16"}, {"accumulate": "float32"}])
def test_cuda_casts_and_accumulation_match_the_cpu(tmp_path, options):
    states = _states(torch.float32, big=1_000_003)
    paths = _write(tmp_path, states)
    gpu = load_soup(soup.merge(paths, tmp_path / "gpu", device="cuda", **options).path)
    cpu = load_soup(soup.merge(paths, tmp_path / "cpu", **options).path)
    assert _same(gpu, cpu)


@cuda
def test_cuda_many_small_blocks(tmp_path, monkeypatch):
    """Hundreds of blocks: the double buffers change hands many times within one tensor."""
    monkeypatch.setattr("soup.engine.combine.BLOCK_ELEMENTS", 1024)  # GPU blocks of 4096 elements
    states = _states(torch.bfloat16, n=4, big=3_000_017)
    paths = _write(tmp_path, states)
    gpu = load_soup(soup.merge(paths, tmp_path / "gpu", device="cuda").path)
    assert _same(gpu, reference_mean(states, [0.25] * 4))


@cuda
def test_cuda_memory_sink_returns_cuda_tensors(tmp_path):
    states = _states(torch.bfloat16, big=5_000_001)
    paths = _write(tmp_path, states)
    res = soup.merge(paths, device="cuda", weights=[3, 1, 1])
    assert all(t.is_cuda for t in res.state_dict.values())
    assert _same(res.state_dict, soup.merge(paths, weights=[3, 1, 1]).state_dict)


@cuda
def test_cuda_merge_into_a_cuda_model(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = torch.nn.Linear(1024, 4099).to(torch.bfloat16)  # 4.2M weights: two GPU blocks
            self.norm = torch.nn.LayerNorm(1024)
            self.register_buffer("steps", torch.zeros(3, dtype=torch.int64))

    states = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        states.append({k: (torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v.clone())
                       for k, v in Net().state_dict().items()})
    paths = _write(tmp_path, states)
    model = Net().cuda()
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    soup.merge(paths, model, device="cuda", weights=[1, 2, 3])
    got = model.state_dict()
    assert {k: v.data_ptr() for k, v in got.items()} == ptrs and all(v.is_cuda for v in got.values())
    assert _same(got, reference_mean(states, [1 / 6, 2 / 6, 3 / 6]))


@cuda
@pytest.mark.parametrize("host_output", [True, False])
def test_cuda_pinned_buffers_are_pinned_and_reused(host_output):
    comb = Combiner(["a", "b", "c"], where=lambda i, name: name, device="cuda", identical=False,
                    host_output=host_output)
    n = comb.block * 2 + 17
    first = _inputs(n, torch.bfloat16)
    job = Job("t", (n,), "mean", torch.bfloat16, weights=(0.2, 0.3, 0.5))
    blocks = []
    for block in comb.blocks(job, first):
        assert block.is_cuda != host_output
        if host_output:
            assert block.is_pinned()
        blocks.append(block.clone())
    cpu = Combiner(["a", "b", "c"], where=lambda i, name: name, identical=False)
    assert torch.equal(_bits(torch.cat(blocks).cpu()), _bits(_run(cpu, job, first)))
    bufs = comb._staging.buffers()
    assert len(bufs) == 6 + (2 if host_output else 0) and all(b.is_pinned() for b in bufs)
    ptrs = [b.data_ptr() for b in bufs]
    second = _inputs(n, torch.bfloat16, seed=1)
    assert torch.equal(_bits(_run(comb, job, second).cpu()), _bits(_run(cpu, job, second)))
    assert [b.data_ptr() for b in comb._staging.buffers()] == ptrs
    comb.close()


@cuda
@pytest.mark.parametrize("to_disk", [True, False])
def test_cuda_non_finite_input_names_the_ingredient(tmp_path, to_disk):
    states = _states(torch.bfloat16, big=5_000_001)
    states[2]["big"][4_500_000] = float("nan")  # in the second GPU block
    paths = _write(tmp_path, states)
    with pytest.raises(CheckpointError, match=r"tensor big: non-finite value nan at flat index 4500000 "
                                              r"\(ingredient ing2\)"):
        soup.merge(paths, tmp_path / "out" if to_disk else None, device="cuda")
