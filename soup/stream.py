"""Streaming reads: each ingredient's tensors as flat, memory-mapped views, one tensor at a time.

Safetensors files are memory-mapped (private, read-only use) and each tensor is a zero-copy
``torch.frombuffer`` view into the mapping, so input pages live in the page cache, never in the
process's anonymous memory. ``.bin`` files are opened with ``torch.load(mmap=True)``. While one
tensor is combined, the kernel is asked to read the next one ahead (``madvise(WILLNEED)``), so disk
reads overlap the math.
"""

from __future__ import annotations

import mmap
import warnings
from pathlib import Path

import torch

from .checkpoint import Checkpoint, TensorInfo, load_torch_file
from .errors import CheckpointError

__all__ = ["TensorReader"]

_PAGE = mmap.PAGESIZE


class TensorReader:
    """Flat views of one checkpoint's tensors; files are opened on first use and kept open."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self._maps: dict[Path, mmap.mmap] = {}
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}

    def view(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a 1-D tensor of its dtype (a view: no copy for safetensors)."""
        info = self.checkpoint.tensors[name]
        if self.checkpoint.memory is not None:
            return self.checkpoint.memory[name].detach().reshape(-1)
        if info.numel == 0:
            return torch.empty(0, dtype=info.dtype)
        if info.offset is None:
            t = self._bin(info.file)[name]
            if t.dtype != info.dtype or tuple(t.shape) != info.shape:
                raise CheckpointError(f"{info.file}: tensor {name} changed since it was indexed")
            return t.reshape(-1)
        mm = self._map(info.file)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer warns about read-only buffers; we never write
            return torch.frombuffer(mm, dtype=info.dtype, count=info.numel, offset=info.offset)

    def readahead(self, name: str) -> None:
        """Ask the kernel to start reading ``name`` from disk (no-op for .bin / memory)."""
        info: TensorInfo = self.checkpoint.tensors[name]
        if info.offset is None or info.numel == 0 or not hasattr(mmap, "MADV_WILLNEED"):
            return
        start = info.offset - info.offset % _PAGE
        try:
            self._map(info.file).madvise(mmap.MADV_WILLNEED, start, info.offset + info.nbytes - start)
        except (OSError, ValueError):
            pass  # advice only

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:
                pass  # a view is still alive somewhere; the mapping goes when it does
        self._maps.clear()
        self._bins.clear()

    def _map(self, file: Path) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            try:
                with open(file, "rb") as fh:
                    mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{file}: cannot map file ({e})") from None
            expected = max(t.offset + t.nbytes for t in self.checkpoint.tensors.values()
                           if t.file == file and t.offset is not None)
            if len(mm) < expected:
                raise CheckpointError(f"{file}: shrank to {len(mm)} bytes since it was indexed: truncated")
            self._maps[file] = mm
        return mm

    def _bin(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._bins:
            self._bins[file] = load_torch_file(file)
        return self._bins[file]

