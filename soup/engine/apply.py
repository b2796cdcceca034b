"""A merge method applied to one tensor, block by block (``Job.kind == "method"``).

The ingredients' views (and the base model's) are read in blocks of the same flat positions and
converted to the work dtype: float32 for 16- and 8-bit inputs, float64 when any input is float32 or
float64 (``accumulate`` forces one). The method's ``statistics`` first makes its own passes over the
blocks (each pass a fresh iteration: nothing of the tensor's size is kept), then every block's output
is computed, tested for non-finite values (the ingredient at fault is named) and cast to the output
dtype into the consumer's buffer. Memory: a block per input, whatever the tensor's size, except for
methods marked ``whole_tensor`` (one tensor at a time).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

from soup.engine.plan import Job
from soup.errors import CheckpointError
from soup.methods.base import At, TensorInput

__all__ = ["method_blocks"]


def method_blocks(job: Job, views: Sequence[torch.Tensor | None], *, work: torch.dtype, step: int,
                  device: torch.device, out_buf: Callable[[torch.dtype, int], torch.Tensor],
                  where: Callable[[int, str], str], labels: Sequence[str]) -> Iterator[torch.Tensor]:
    """Yield ``job``'s output as consecutive 1-D blocks of ``job.out_dtype`` (valid until the next)."""
    method, params = job.method, job.params
    srcs = job.sources()
    base = views[job.base] if job.base is not None else None
    if method.whole_tensor:
        step = max(1, job.numel)

    def blocks() -> Iterator[tuple[At, torch.Tensor, torch.Tensor | None]]:
        for start in range(0, job.numel, step):
            stop = min(start + step, job.numel)
            xs = torch.empty((len(srcs), stop - start), dtype=work, device=device)  # (n, block)
            for row, i in enumerate(srcs):
                xs[row].copy_(views[i][start:stop])
            b = base[start:stop].to(device=device, dtype=work) if base is not None else None
            yield At(job.name, job.shape, start, stop), xs, b

    tensor = TensorInput(job.name, job.shape, len(srcs), work, base is not None, blocks)
    stats = method.statistics(tensor, params)
    for at, xs, b in blocks():
        y = method.block(xs, b, params, stats, at)
        if y.shape != (at.stop - at.start,):
            raise CheckpointError(f"tensor {job.name}: method {method.name} returned shape {tuple(y.shape)} "
                                  f"for a block of {at.stop - at.start} values")
        if not _finite(y):
            _trace(job, views, srcs, at, y, where, labels)
        out = out_buf(job.out_dtype, at.stop - at.start) if job.out_dtype != y.dtype or y.device.type != "cpu" \
            else y
        if out is not y:
            out.copy_(y)
            if not _finite(out):
                bad = int((~torch.isfinite(out)).nonzero()[0])
                raise CheckpointError(f"tensor {job.name}: the {method.name} merge overflows "
                                      f"{str(job.out_dtype).removeprefix('torch.')} at flat index {at.start + bad} "
                                      f"(value {float(y[bad]):.6g})")
        yield out


def _finite(t: torch.Tensor) -> bool:
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def _trace(job: Job, views, srcs, at: At, y: torch.Tensor, where, labels) -> None:
    """A non-finite output: the input that holds one, or the method's own overflow."""
    inputs = list(srcs) + ([job.base] if job.base is not None else [])
    for i in inputs:
        x = views[i][at.start:at.stop]
        bad = (~torch.isfinite(x.float() if x.dtype.itemsize == 1 else x)).nonzero()
        if len(bad):
            k = int(bad[0])
            raise CheckpointError(f"{where(i, job.name)}: tensor {job.name}: non-finite value {float(x[k])} at "
                                  f"flat index {at.start + k} (ingredient {labels[i]})")
    k = int((~torch.isfinite(y)).nonzero()[0])
    raise CheckpointError(f"tensor {job.name}: the {job.method.name} merge gives a non-finite value at flat index "
                          f"{at.start + k}")
