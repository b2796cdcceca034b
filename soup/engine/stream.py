"""Streaming reads: each ingredient's tensors as flat, memory-mapped views, one tensor at a time.

Safetensors files are memory-mapped (read-only) and each tensor is a zero-copy ``torch.frombuffer``
view into the mapping, so input pages live in the page cache, never in the process's anonymous
memory. Torch files (``.bin``, ``.pt``, ``.pth``) are opened with ``torch.load(mmap=True)``. The
pages are read ahead of the math by ``soup.engine.prefetch``, so disk reads overlap it.

Open files: a Python ``mmap`` keeps a duplicate of its file descriptor until it is closed, so a
reader keeps at most ``MAX_OPEN`` mappings (least recently used closed first; tensors are read in
file order, so a closed file is rarely needed again). A merge of 24 ingredients x 48 shards then
runs under ``ulimit -n 512``. A mapping that still has live views cannot be closed (``BufferError``):
it stays open until a later eviction or ``close()`` finds it free.

Why not ``torch.UntypedStorage.from_file``, which keeps no descriptor: it maps files privately and
writable, which the kernel refuses for a file larger than RAM + swap (a 30 GB single-file model on a
24 GB machine); and ``mmap``'s ``trackfd=False`` needs Python 3.13.
"""

from __future__ import annotations

import mmap
import os
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from soup.io.checkpoint import Checkpoint, load_torch_file
from soup.errors import CheckpointError

__all__ = ["TensorReader"]

_PAGE = mmap.PAGESIZE


class TensorReader:
    """Flat views of one checkpoint's tensors; at most ``MAX_OPEN`` files mapped (and open) at a time."""

    MAX_OPEN = 4  # the current tensor's file, the previous one's (a view may still be alive), slack

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self._maps: OrderedDict[Path, mmap.mmap] = OrderedDict()  # least recently used first
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}
        self._ends: dict[Path, int] | None = None  # file -> where its last tensor ends

    def view(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a 1-D tensor of its dtype (a view: no copy for safetensors)."""
        info = self.checkpoint.tensors[name]
        if self.checkpoint.memory is not None:
            return self.checkpoint.memory[name].detach().reshape(-1)
        if info.numel == 0:
            return torch.empty(0, dtype=info.dtype)
        if info.offset is None:
            t = self._bin(info.file)[info.stored or name]
            if t.dtype != info.dtype or tuple(t.shape) != info.shape:
                raise CheckpointError(f"{info.file}: tensor {name} changed since it was indexed")
            return t.reshape(-1)
        mm = self._map(info.file)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer warns about read-only buffers; we never write
            return torch.frombuffer(mm, dtype=info.dtype, count=info.numel, offset=info.offset)

    def release(self, name: str, *, drop: bool = False) -> None:
        """The math is done with ``name``: unmap its pages from this process (``MADV_DONTNEED``: the
        page cache keeps them, and reclaiming an unmapped page is cheap). With ``drop``, also evict
        them from the page cache (``POSIX_FADV_DONTNEED``): for inputs larger than the memory, which
        cannot stay cached anyway, so the kernel never has to hunt for pages to reclaim. Neither
        changes a byte: a view still alive reads the file again."""
        info = self.checkpoint.tensors[name]
        mm = self._maps.get(info.file) if info.offset is not None else None
        if mm is None or info.nbytes < 2 * _PAGE:
            return
        start = -(-info.offset // _PAGE) * _PAGE  # whole pages inside the tensor only
        stop = (info.offset + info.nbytes) // _PAGE * _PAGE
        if stop <= start:
            return
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, stop - start)
            if drop and hasattr(os, "posix_fadvise"):
                fd = os.open(info.file, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, start, stop - start, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
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
        if mm is not None:
            self._maps.move_to_end(file)
            return mm
        self._evict(self.MAX_OPEN - 1)
        try:
            with open(file, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{file}: cannot map file ({e})") from None
        if self._ends is None:
            self._ends = {}
            for t in self.checkpoint.tensors.values():
                if t.offset is not None:
                    self._ends[t.file] = max(self._ends.get(t.file, 0), t.offset + t.nbytes)
        if (size := len(mm)) < self._ends[file]:
            mm.close()
            raise CheckpointError(f"{file}: shrank to {size} bytes since it was indexed: truncated")
        self._maps[file] = mm
        return mm

    def _evict(self, keep: int) -> None:
        """Close least recently used mappings until at most ``keep`` remain (skipping ones in use)."""
        for file in list(self._maps):
            if len(self._maps) <= keep:
                return
            try:
                self._maps[file].close()
            except BufferError:
                continue  # a view of it is alive (the tensor being combined): keep it
            del self._maps[file]

    def _bin(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._bins:
            self._bins[file] = load_torch_file(file, self.checkpoint.state_dict_key)
        return self._bins[file]

