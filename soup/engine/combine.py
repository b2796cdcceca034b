"""The math: each job's output, computed block by block into reused buffers.

A weighted mean is accumulated in cache-sized blocks, which runs several times faster than
whole-tensor ops and keeps memory flat whatever the tensor's size:

    acc  = float(x_0) * w_0            # (block,) in the accumulation dtype
    acc += float(x_i) * w_i            # for i = 1..n-1, each product rounded, then the sum
    out  = acc.to(out_dtype)

This exact sequence of IEEE operations is the definition of the soup, so a reference computed the
same way over whole tensors is bit-identical whatever the block size. The accumulation dtype
(``accumulation_dtype``) is float32 for 16- and 8-bit inputs and float64 when any input of the
tensor is float32 or float64: at least twice the inputs' mantissa for 8- to 32-bit inputs (float64
inputs are accumulated in their own precision), so the mean of copies of one tensor is that
tensor (``x*w + x*w + x*w`` rounds back to ``x``), and near-identical inputs lose nothing either.
``accumulate`` float32 or float64 forces one dtype for every tensor.

One exception, by definition: a tensor whose inputs are bit-identical in every ingredient read (a
frozen vision tower) is written as those bytes (cast to the output dtype), when the weights sum to 1
(within 1e-6) — the soup of identical tensors is that tensor, whatever the dtype. The inputs are compared block by
block before any math (``same_bits``: an 8-byte-wide ``torch.equal``), stopping at the first
difference, so fine-tuned tensors cost one short comparison; the decision is per tensor, never per
block, so the result does not depend on the block size.

Nothing non-finite is written silently. Per block, a cheap test (a sum: one fast pass, no
temporaries) finds non-finite values, which are then located and traced back to the ingredient that
holds them, or reported as an overflow of the mean. Every path is covered:

- ``mean``: the accumulator is tested (the fused kernel counts non-finite values as it goes); the
  cast to the output dtype is tested too, but only when it can overflow: when the largest value
  the inputs' dtypes can hold, times the sum of |weights| (plus rounding), may round to inf in the
  output dtype (fp32 ingredients to float16 or bfloat16, unnormalised weights). A bfloat16 mean of
  bfloat16 ingredients with normalised weights cannot overflow and costs nothing extra.
- ``take`` (take rules, one-hot weights such as a maximum soup with p=1): the written block, raw
  bytes of the ingredient or their cast, is tested.
- ``copy`` is for integer and bool buffers only (taken from the first ingredient in the soup), which
  have no non-finite values.

On a CUDA device, a mean's inputs reach the GPU through pinned staging buffers and asynchronous
copies overlapped with the math, and its output comes back the same way when the consumer wants
host blocks (``host_output``, the disk writer): ``soup.engine.staging``. The arithmetic is the same code
(``_weighted_sum``, ``_finish``), so the result is bit-identical to the CPU's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from soup.engine import kernel
from soup.engine.apply import method_blocks
from soup.errors import CheckpointError, IncompatibleIngredients
from soup.engine.plan import Job
from soup.engine.staging import CudaStaging
from soup.engine.vocab import row_blocks

__all__ = ["Combiner", "BLOCK_ELEMENTS", "accumulation_dtype", "same_bits"]

# CPU block: 4 MB of float32. Each block costs a hand-over to the kernel's threads and some Python;
# measured on 2 cores, a greedy candidate (fp32 sum + a bf16 ingredient into a resident model, 0.94
# GiB) took 0.61 s with 256K-element blocks, 0.41 s with 1M; a 3 x 0.94 GiB merge to disk the same.
BLOCK_ELEMENTS = 1 << 20


def accumulation_dtype(in_dtypes: Iterable[torch.dtype], accumulate: torch.dtype | None = None) -> torch.dtype:
    """The dtype a weighted mean of inputs of these dtypes is accumulated in.

    ``accumulate`` given (float32 or float64): that one. None ("auto"): at least twice the inputs'
    mantissa — float64 when any input is float32 or float64, else float32 (bfloat16, float16, fp8).
    """
    if accumulate is not None:
        return accumulate
    return torch.float64 if any(d.itemsize >= 4 for d in in_dtypes) else torch.float32


class Combiner:
    """Computes job outputs as 1-D blocks of the output dtype.

    A yielded block is only valid until the next one is requested (buffers are reused).

    Args:
        labels: ingredient labels, for error messages.
        where: ``fn(ingredient, tensor) -> str`` naming the file a tensor is read from.
        accumulate: torch.float32 or torch.float64 for every tensor; None (auto): per tensor, by
            ``accumulation_dtype`` (float32 for 16-bit inputs, float64 for 32-bit ones).
        device: where the math runs ("cpu", "cuda", "cuda:1").
        strict: differing non-float buffers are an error instead of a warning.
        warn: called with a message for each warning.
        threads: compute threads (the fused kernel splits blocks over them).
        identical: write a tensor that is bit-identical in every ingredient as its bytes (the soup
            of identical tensors); False computes the mean anyway (tests of the arithmetic).
        host_output: yield blocks in host memory (for the disk writer) whatever the device; with a
            CUDA device, means are copied back asynchronously and taken tensors never go to the GPU.
            False: blocks of means are on ``device``.
    """

    def __init__(self, labels: Sequence[str], *, where: Callable[[int, str], str],
                 accumulate: torch.dtype | None = None, device: str | torch.device = "cpu",
                 strict: bool = False, warn: Callable[[str], None] = print,
                 block: int | None = None, threads: int | None = None, identical: bool = True,
                 host_output: bool = False) -> None:
        self.labels = list(labels)
        self.where = where
        self.accumulate = accumulate
        self.device = torch.device(device)
        self.strict = strict
        self.warn = warn
        self.identical = identical
        self.host_output = host_output
        # ``fn(dtype, n) -> tensor | None``: the consumer's memory for the next output block (set by
        # the engine to the disk writer's ``reserve``); None: blocks go into the Combiner's buffers
        self.dest: Callable[[torch.dtype, int], torch.Tensor | None] | None = None
        on_gpu = self.device.type != "cpu"
        self.block = block or (BLOCK_ELEMENTS * 4 if on_gpu else BLOCK_ELEMENTS)  # GPU: 4M elements
        self._acc: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}  # dtype -> (acc, tmp), made when used
        self._out: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self._staged = self.device.type == "cuda"  # means fed through soup.engine.staging
        self._staging: CudaStaging | None = None  # made at the first such mean
        lib = kernel.load() if self.device.type == "cpu" else None
        self._fused = kernel.FusedMean(lib, threads or torch.get_num_threads()) if lib is not None else None

    def blocks(self, job: Job, views: Sequence[torch.Tensor | None]) -> Iterator[torch.Tensor]:
        """Yield the output of ``job`` as consecutive 1-D blocks; ``views[i]`` is ingredient i's flat tensor."""
        if job.rows is not None:  # vocabulary-indexed: rows gathered by token (soup.engine.vocab)
            work = self.acc_dtype([views[i].dtype for i in job.reads(len(views))])
            host = torch.device("cpu") if self.host_output else None
            yield from row_blocks(job, views, work=work, step=self._step(work), device=self.device,
                                  out_buf=lambda dt, k: self._out_buf(dt, k, host), where=self.where, labels=self.labels)
        elif job.kind == "mean":
            yield from self._mean(job, views)
        elif job.kind == "method":
            srcs = job.reads(len(views))
            work = self.acc_dtype([views[i].dtype for i in srcs])
            # a quarter of a mean's block: a method's temporaries (keys, masks, deltas) are several per input
            yield from method_blocks(job, views, work=work, step=self._step(work) // 4, device=self.device,
                                     out_buf=lambda dt, k: self._out_buf(dt, k, torch.device("cpu") if self.host_output else None),
                                     where=self.where, labels=self.labels)
        elif job.kind == "copy":
            yield from self._copy(job, views)
        else:
            yield from self._take(job, views[job.source], job.source)

    def acc_dtype(self, in_dtypes: Iterable[torch.dtype]) -> torch.dtype:
        """The accumulation dtype of a weighted mean of inputs of these dtypes."""
        return accumulation_dtype(in_dtypes, self.accumulate)

    def fused_covers(self, in_dtypes, out_dtypes) -> bool:
        """True when every weighted mean with these dtypes runs through the fused kernel."""
        if self._fused is None:
            return False
        accs = {self.acc_dtype([d]) for d in in_dtypes}  # a mixed tensor's is one of these
        return all(self._fused.supports(in_dtypes, out, acc, self.device) for acc in accs for out in out_dtypes)

    def close(self) -> None:
        """Stop the kernel's worker threads, if any."""
        if self._fused is not None:
            self._fused.close()
        if self._staging is not None:
            self._staging.close()
            self._staging = None

    def _step(self, acc_dtype: torch.dtype) -> int:
        """Elements per block of a mean: ``block`` float32 values' worth of bytes (L2-sized on a CPU)."""
        return max(1, self.block * 4 // acc_dtype.itemsize)

    def _acc_bufs(self, dtype: torch.dtype, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        bufs = self._acc.get(dtype)
        if bufs is None:
            bufs = self._acc[dtype] = tuple(torch.empty(self._step(dtype), dtype=dtype, device=self.device)
                                            for _ in range(2))
        return bufs[0][:n], bufs[1][:n]

    def _out_buf(self, dtype: torch.dtype, n: int, device: torch.device | None = None) -> torch.Tensor:
        """Where a block of ``n`` output values is computed: the consumer's buffer when it offers
        one (``dest``: the disk writer's, so the block is not copied again), else a reused one."""
        device = device or self.device
        if self.dest is not None and device.type == "cpu":
            out = self.dest(dtype, n)
            if out is not None:
                return out
        buf = self._out.get((dtype, device))
        if buf is None:
            buf = self._out[dtype, device] = torch.empty(self.block, dtype=dtype, device=device)
        return buf[:n]

    def _mean(self, job: Job, views: Sequence[torch.Tensor | None]) -> Iterator[torch.Tensor]:
        srcs = job.sources()
        if self.identical and len(srcs) > 1 and abs(math.fsum(job.weights) - 1.0) <= 1e-6 and \
                self._identical([views[i] for i in srcs], job.numel):
            yield from self._take(job, views[srcs[0]], srcs[0], mean=True)  # the soup of identical tensors
            return
        pairs = [(views[i], job.weights[i]) for i in srcs]
        in_dtypes = [x.dtype for x, _ in pairs]
        acc_dtype = self.acc_dtype(in_dtypes)
        check_cast = self._cast_may_overflow(job, in_dtypes, acc_dtype)
        if self._staged:
            yield from self._staged_mean(job, views, srcs, pairs, acc_dtype, check_cast)
            return
        if self._fused is not None and self._fused.supports(in_dtypes, job.out_dtype, acc_dtype, self.device):
            yield from self._fused_mean(job, views, srcs, pairs, acc_dtype, check_cast)
            return
        step = self._step(acc_dtype)
        for start in range(0, job.numel, step):
            stop = min(start + step, job.numel)
            n = stop - start
            acc, tmp = self._acc_bufs(acc_dtype, n)
            _weighted_sum(acc, tmp, [(x[start:stop], w) for x, w in pairs])
            yield self._finish(job, views, srcs, start, stop, acc, check_cast)

    def _staged_mean(self, job: Job, views, srcs, pairs, acc_dtype: torch.dtype,
                     check_cast: bool) -> Iterator[torch.Tensor]:
        """``_mean`` on a CUDA device: the same arithmetic on blocks staged by ``soup.engine.staging``."""
        if self._staging is None:
            self._staging = CudaStaging(self.device)
        staging, step = self._staging, self._step(acc_dtype)

        def means() -> Iterator[torch.Tensor]:  # device blocks
            for start, stop, chunks in staging.inputs([x for x, _ in pairs], step, job.numel):
                acc, tmp = self._acc_bufs(acc_dtype, stop - start)
                _weighted_sum(acc, tmp, [(c, w) for c, (_, w) in zip(chunks, pairs)])
                yield self._finish(job, views, srcs, start, stop, acc, check_cast)

        if self.host_output:
            yield from staging.to_host(means(), reserve=step * job.out_dtype.itemsize)
        else:
            yield from means()

    def _finish(self, job: Job, views, srcs, start: int, stop: int, acc: torch.Tensor,
                check_cast: bool) -> torch.Tensor:
        """A block's output: the accumulator tested for non-finite values, then cast (and tested when
        the cast may overflow)."""
        if not _all_finite(acc):
            self._trace_nonfinite(job, views, srcs, start, stop, acc)
        if job.out_dtype == acc.dtype:
            return acc
        out = self._out_buf(job.out_dtype, stop - start)
        out.copy_(acc)
        if check_cast and not _all_finite(out):
            self._cast_overflow(job, start, acc, out)
        return out

    def _fused_mean(self, job: Job, views, srcs, pairs, acc_dtype: torch.dtype,
                    check_cast: bool) -> Iterator[torch.Tensor]:
        """The same arithmetic as ``_mean`` through the compiled kernel (see soup.engine.kernel)."""
        pairs = [(x if x.is_contiguous() else x.contiguous(), w) for x, w in pairs]
        step = self._step(acc_dtype)
        for start in range(0, job.numel, step):
            stop = min(start + step, job.numel)
            n = stop - start
            acc = self._acc_bufs(acc_dtype, n)[0]
            out = None if job.out_dtype == acc_dtype else self._out_buf(job.out_dtype, n)
            if self._fused.block(pairs, start, stop, acc, out):  # counts non-finite values of acc
                self._trace_nonfinite(job, views, srcs, start, stop, acc)
            if out is not None and check_cast and not _all_finite(out):
                self._cast_overflow(job, start, acc, out)
            yield acc if out is None else out

    def _cast_may_overflow(self, job: Job, in_dtypes: Sequence[torch.dtype], acc_dtype: torch.dtype) -> bool:
        """False when no finite mean of these inputs can round to inf in the output dtype.

        |acc| <= max|x| * sum|w| * (1 + u)^(n+1), u the accumulator's unit roundoff (the weights are
        rounded too); a value below max + half an ulp of the output dtype rounds to a finite value.
        """
        out = job.out_dtype
        if out == acc_dtype:
            return False  # the accumulator is the output: tested as such
        largest = max(torch.finfo(d).max for d in in_dtypes)
        total = sum(abs(job.weights[i]) for i in job.sources())
        bound = largest * total * (1 + 4 * (len(in_dtypes) + 1) * torch.finfo(acc_dtype).eps)
        return bound >= torch.finfo(out).max * (1 + torch.finfo(out).eps / 4)

    def _trace_nonfinite(self, job: Job, views, srcs, start: int, stop: int, acc: torch.Tensor) -> None:
        for i in srcs:
            bad = _first_nonfinite(views[i][start:stop])
            if bad is not None:
                bad += start
                raise CheckpointError(f"{self.where(i, job.name)}: tensor {job.name}: non-finite value "
                                      f"{float(views[i][bad])} at flat index {bad} (ingredient {self.labels[i]})")
        bad = _first_nonfinite(acc)
        if bad is not None:  # finite inputs, overflowing mean (unnormalised weights)
            raise CheckpointError(f"tensor {job.name}: the weighted mean overflows {_name(acc.dtype)} "
                                  f"(max {torch.finfo(acc.dtype).max:.6g}) at flat index {start + bad} "
                                  f"(weights sum to {sum(job.weights):.6g})")

    def _cast_overflow(self, job: Job, start: int, acc: torch.Tensor, out: torch.Tensor) -> None:
        """The mean is finite in the accumulator but not in the output dtype: name where."""
        bad = _first_nonfinite(out)
        raise CheckpointError(f"tensor {job.name}: the weighted mean overflows {_name(job.out_dtype)} "
                              f"(max {torch.finfo(job.out_dtype).max:.6g}) at flat index {start + bad} "
                              f"(value {float(acc[bad]):.6g})")

    def _identical(self, xs: Sequence[torch.Tensor], numel: int) -> bool:
        """True when every view holds the same bytes; block by block, so a difference is found early."""
        x0 = xs[0]
        if any(x.dtype != x0.dtype for x in xs):
            return False
        for start in range(0, numel, self.block):
            stop = min(start + self.block, numel)
            if not all(same_bits(x0[start:stop], x[start:stop]) for x in xs[1:]):
                return False
        return True

    def _take(self, job: Job, x: torch.Tensor, source: int, mean: bool = False) -> Iterator[torch.Tensor]:
        host = self.device.type == "cpu" or self.host_output  # no round trip through a GPU for the host
        same, where = x.dtype == job.out_dtype and host, torch.device("cpu") if host else self.device
        for start in range(0, job.numel, self.block):
            stop = min(start + self.block, job.numel)
            if same:
                out = x[start:stop]  # zero-copy: raw bytes of the ingredient
            else:
                out = self._out_buf(job.out_dtype, stop - start, where)
                out.copy_(x[start:stop])
            if not _all_finite(out):
                self._trace_take(job, x, start, out, source, mean)
            yield out

    def _trace_take(self, job: Job, x: torch.Tensor, start: int, out: torch.Tensor, source: int,
                    mean: bool) -> None:
        """A taken block holds a non-finite value: the ingredient's own, or its cast's overflow
        (reported as the mean's when ``mean``: the soup of identical tensors)."""
        bad = _first_nonfinite(out)
        i, value = source, float(x[start + bad])
        where = f"{self.where(i, job.name)}: tensor {job.name}"
        if not math.isfinite(value):
            raise CheckpointError(f"{where}: non-finite value {value} at flat index {start + bad} "
                                  f"(ingredient {self.labels[i]})")
        if mean:
            raise CheckpointError(f"tensor {job.name}: the weighted mean overflows {_name(job.out_dtype)} "
                                  f"(max {torch.finfo(job.out_dtype).max:.6g}) at flat index {start + bad} "
                                  f"(value {value:.6g})")
        raise CheckpointError(f"{where}: value {value:.6g} at flat index {start + bad} overflows "
                              f"{_name(job.out_dtype)} (max {torch.finfo(job.out_dtype).max:.6g}) "
                              f"(ingredient {self.labels[i]})")

    def _copy(self, job: Job, views: Sequence[torch.Tensor | None]) -> Iterator[torch.Tensor]:
        ref = job.source  # the first ingredient in the soup; the others are compared with it
        x0 = views[ref]
        differs = []
        for start in range(0, job.numel, self.block):
            stop = min(start + self.block, job.numel)
            for i in range(len(views)):
                if i != ref and i not in differs and not torch.equal(x0[start:stop], views[i][start:stop]):
                    differs.append(i)
            yield x0[start:stop]
        if differs:
            who = ", ".join(self.labels[i] for i in differs)
            msg = (f"tensor {job.name} ({job.out_dtype}, not a float) differs between {self.labels[ref]} and "
                   f"{who}; copied from {self.labels[ref]}")
            if self.strict:
                raise IncompatibleIngredients(msg)
            self.warn(msg)


def _weighted_sum(acc: torch.Tensor, tmp: torch.Tensor, terms: Sequence[tuple[torch.Tensor, float]]) -> None:
    """The definition, in place: ``acc = float(x_0)*w_0; acc += float(x_i)*w_i`` (each product
    rounded to the accumulation dtype, then the sum); ``tmp`` is scratch of ``acc``'s size."""
    (x0, w0), rest = terms[0], terms[1:]
    acc.copy_(x0)  # (n,) converted to the accumulation dtype
    acc.mul_(w0)
    for x, w in rest:
        tmp.copy_(x)
        tmp.mul_(w)
        acc.add_(tmp)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two 1-D contiguous tensors of one dtype hold the same bytes (NaN payloads and the
    sign of zero included). Compared 8 bytes at a time where the views allow it: ``torch.equal`` on
    int64 stops early at a difference and runs at memory speed on equal data, unlike a float compare."""
    if a.numel() != b.numel() or a.dtype != b.dtype:
        return False
    if b.device != a.device:
        b = b.to(a.device)
    ua, ub = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    for width, wide in ((8, torch.int64), (4, torch.int32), (2, torch.int16)):
        if ua.storage_offset() % width == 0 and ub.storage_offset() % width == 0:
            head = ua.numel() - ua.numel() % width
            if head and not torch.equal(ua[:head].view(wide), ub[:head].view(wide)):
                return False
            return torch.equal(ua[head:], ub[head:])
    return torch.equal(ua, ub)


def _all_finite(block: torch.Tensor) -> bool:
    """True when every value of a float block is finite; one fast pass when it is.

    A sum is the cheapest test (no temporary; NaN and inf propagate): it can only be wrong the safe
    way, overflowing on large finite values, so a non-finite sum is confirmed with a max (also
    NaN-propagating, several times faster than ``isfinite().all()``).
    """
    if _is_fp8(block.dtype):  # no reductions for these: test a float32 copy (rare dtypes)
        block = block.to(torch.float32)
    total = block.sum(dtype=torch.float32) if block.dtype == torch.float16 else block.sum()
    if math.isfinite(float(total)):
        return True
    return math.isfinite(float(block.abs().amax()))


def _first_nonfinite(block: torch.Tensor) -> int | None:
    """The index of the first non-finite value of a 1-D block, or None (a slow pass: errors only)."""
    if _is_fp8(block.dtype):
        block = block.to(torch.float32)
    bad = (~torch.isfinite(block)).nonzero()
    return int(bad[0]) if len(bad) else None


def _is_fp8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize == 1


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
