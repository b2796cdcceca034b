"""Where a soup goes when it is not written to disk: a new state dict, or tensors that already exist.

The engine yields each output tensor as consecutive 1-D blocks; a sink puts them somewhere. The
disk sink is ``soup.engine.writer.ShardWriter``; here are the in-memory ones:

- ``MemorySink``: a new ``{name: tensor}`` on one device (``candidate.state_dict(device)``);
- ``InPlaceSink``: the blocks are copied straight into existing tensors — a resident
  ``torch.nn.Module``'s parameters and buffers, or a ``{name: tensor}`` mapping — each on its own
  device and in its own dtype. An evaluator that keeps one model resident loads every candidate
  this way with no second copy of the weights: peak memory is the model plus a few blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from soup.errors import IncompatibleIngredients
from soup.engine.plan import Job

__all__ = ["MemorySink", "InPlaceSink", "Produce"]

Produce = Callable[[Job], Iterable[torch.Tensor]]  # job -> its output blocks, in order


class MemorySink:
    """A new ``{name: tensor}`` on ``device``, for in-process evaluators and the Python API."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.state_dict: dict[str, torch.Tensor] = {}
        self._filling = _Filling()

    def reserve(self, dtype: torch.dtype, n: int) -> torch.Tensor | None:
        """Where the next ``n`` output values go, when the math can write them there (``Combiner.dest``)."""
        return self._filling.reserve(dtype, n)

    def select(self, jobs: Sequence[Job]) -> list[Job]:
        """Every job is wanted."""
        return list(jobs)

    def write(self, jobs: Sequence[Job], produce: Produce) -> dict[str, torch.Tensor]:
        for job in jobs:
            t = torch.empty(job.shape, dtype=job.out_dtype, device=self.device)
            self._filling.fill(t.reshape(-1), job, produce)
            self.state_dict[job.name] = t
        return self.state_dict


class InPlaceSink:
    """Writes the soup into existing tensors, in place (``candidate.load_into(model)``).

    Args:
        target: an ``nn.Module`` (its parameters and persistent buffers, by ``state_dict`` name) or a
            mapping ``{name: tensor}``.
        strict: soup tensors the target lacks are an error (default); with False they are skipped
            (never computed). Target tensors the soup lacks are always an error, unless they share
            storage with one that is written (tied weights such as ``lm_head`` -> embeddings).

    Blocks are converted to each target tensor's dtype and device as they are copied; a
    non-contiguous target tensor is filled through one temporary of its size.
    """

    def __init__(self, target: torch.nn.Module | Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
        if isinstance(target, torch.nn.Module):
            self.tensors = dict(target.state_dict(keep_vars=True))
            self.what = type(target).__name__
        else:
            self.tensors = dict(target)
            self.what = "the target mapping"
        self.strict = strict
        self._filling = _Filling()

    def reserve(self, dtype: torch.dtype, n: int) -> torch.Tensor | None:
        """Where the next ``n`` output values go, when the math can write them there (``Combiner.dest``):
        the target tensor itself, when it is contiguous, on the CPU and of the output dtype."""
        return self._filling.reserve(dtype, n)

    def select(self, jobs: Sequence[Job]) -> list[Job]:
        """The jobs to run: checked against the target's names and shapes before anything is computed."""
        wanted = []
        for job in jobs:
            t = self.tensors.get(job.name)
            if t is None:
                if self.strict:
                    raise IncompatibleIngredients(f"tensor {job.name}: in the soup but not in {self.what} "
                                                  "(strict=False skips such tensors)")
                continue
            if tuple(t.shape) != tuple(job.shape):
                raise IncompatibleIngredients(f"tensor {job.name}: shape {list(job.shape)} in the soup but "
                                              f"{list(t.shape)} in {self.what}")
            wanted.append(job)
        written = {_storage(self.tensors[j.name]) for j in wanted}
        missing = [n for n, t in self.tensors.items() if _storage(t) not in written]
        if missing:
            raise IncompatibleIngredients(f"{self.what} has {len(missing)} tensor(s) the soup does not provide, "
                                          f"e.g. {', '.join(missing[:3])}")
        return wanted

    def write(self, jobs: Sequence[Job], produce: Produce) -> None:
        with torch.no_grad():
            for job in jobs:
                t = self.tensors[job.name]
                if t.is_contiguous():
                    self._filling.fill(t.detach().view(-1), job, produce)
                else:
                    flat = torch.empty(t.numel(), dtype=t.dtype, device=t.device)
                    self._filling.fill(flat, job, produce)
                    t.detach().copy_(flat.view(t.shape))


class _Filling:
    """Copies a job's blocks into a flat tensor; a block the math computed in place (``reserve``: the
    next values of the tensor being filled) is not copied again."""

    def __init__(self) -> None:
        self.flat: torch.Tensor | None = None
        self.pos = 0

    def reserve(self, dtype: torch.dtype, n: int) -> torch.Tensor | None:
        flat = self.flat
        if flat is None or flat.dtype != dtype or flat.device.type != "cpu" or self.pos + n > flat.numel():
            return None
        return flat[self.pos:self.pos + n]

    def fill(self, flat: torch.Tensor, job: Job, produce: Produce) -> None:
        """Copy ``job``'s blocks into ``flat`` (converting dtype and device as needed)."""
        self.flat, self.pos = flat, 0
        try:
            for block in produce(job):
                n = block.numel()
                dest = flat[self.pos:self.pos + n]
                if not (block.dtype == flat.dtype and block.device == flat.device and n
                        and block.data_ptr() == dest.data_ptr()):
                    dest.copy_(block)
                self.pos += n
            if self.pos != flat.numel():
                raise RuntimeError(f"tensor {job.name}: produced {self.pos} elements, expected {flat.numel()}")
        finally:
            self.flat = None


def _storage(t: torch.Tensor) -> Any:
    return (t.device, t.untyped_storage().data_ptr()) if t.numel() else ("empty", id(t))
