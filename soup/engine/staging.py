"""Feeding a CUDA device: pinned staging buffers and asynchronous copies, overlapped with the math.

The inputs of a mean are views into memory-mapped files: pageable memory, which a GPU copies from
synchronously, through a driver bounce buffer. ``CudaStaging`` feeds one mean job to the device
block by block instead (``soup.engine.combine.Combiner`` on a CUDA device; never on a CPU). Every input
slot (ingredient read by the job) has two pinned host buffers and two device buffers, used in turn
(parity ``p``, alternating from block to block), and the host thread, a dedicated copy stream and
the compute stream (torch's current stream, where the math runs) share the work:

    host thread                     copy stream                      compute stream (current)
    memcpy block b+1 -> pinned[q]   H2D pinned[q] -> device[q]       math of block b on device[p]
      after copied[q] (host wait)     after used[q]; records copied[q]   after copied[p]; records used[p]

(p is block b's parity, q = 1 - p is block b+1's.) For a block c of parity q:

- the host memcpy of its slices into ``pinned[slot][q]`` first waits (host side) for the event
  ``copied[q]``, recorded after the H2D copies that last read those buffers (block c-2);
- its H2D copies into ``device[slot][q]`` are queued on the copy stream (non_blocking) after a
  wait for ``used[q]``, recorded on the compute stream once the math that last read those buffers
  (block c-2) was queued; ``copied[q]`` is recorded after them;
- the compute stream waits for ``copied[q]`` before the math reads block c's device buffers, and
  records ``used[q]`` when the next block is requested.

Block b+1 is staged before block b is handed to the math, so the host's memcpy of block b+1 runs
while the copy engine moves block b, and the H2D copy of block b+1 runs while the GPU computes
block b (slot by slot: a slice's H2D copy is queued as soon as its memcpy is done). The math is
the caller's (``Combiner``): staging moves bytes and never changes a value. The caller's per-block
non-finite test waits for block b's math, by which time block b+1 is already on its way.

Outputs for a host consumer (the disk writer) go the other way in ``to_host``, one block behind: a
computed block is copied on the compute stream into an output device buffer (``out[p]``; a
device-to-device copy, so the next block's math can reuse the accumulator at once), a third stream
copies it into a pinned host buffer (non_blocking), and the block is handed out only once the next
block's copy is queued and its own event ``fetched[p]`` has completed: the D2H copy of block b
overlaps the math of block b+1. Order and values are those of the device blocks.

Buffers are allocated once, at the size of a full block, reused across jobs and grown when a
job needs more; device buffers are marked with ``record_stream`` for the side stream that uses
them, so a grown (freed) buffer is not reallocated while a copy may still use it (pinned memory is
protected by torch's host allocator, which records an event for each non_blocking copy).

All CUDA calls go through ``CudaRuntime``; the tests run the same scheduling on a CPU with a
simulated runtime whose side streams execute lazily (tests/test_gpu_staging.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

__all__ = ["CudaStaging", "CudaRuntime"]


class CudaRuntime:
    """The CUDA calls staging makes, in one place: streams, events, buffers, asynchronous copies."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def stream(self) -> Any:
        return torch.cuda.Stream(self.device)

    def current_stream(self) -> Any:
        return torch.cuda.current_stream(self.device)

    def event(self) -> Any:
        return torch.cuda.Event()

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def device_buffer(self, nbytes: int, side_stream: Any) -> torch.Tensor:
        """A buffer of the current stream that ``side_stream`` also uses (``record_stream``)."""
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        buf.record_stream(side_stream)
        return buf

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
        """Queue ``dst.copy_(src)`` on ``stream`` (pinned <-> device: asynchronous to the host)."""
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)


class CudaStaging:
    """Feeds mean jobs' input blocks to a CUDA device, and their output blocks back (see module doc).

    Not thread-safe: one per ``Combiner``. ``runtime`` replaces the CUDA calls (tests).
    """

    def __init__(self, device: str | torch.device, *, runtime: Any = None) -> None:
        self.device = torch.device(device)
        self._rt = runtime if runtime is not None else CudaRuntime(self.device)
        self._copy_stream = self._rt.stream()  # host -> device
        self._out_stream = self._rt.stream()  # device -> host
        self._copied = [self._rt.event(), self._rt.event()]  # H2D of parity p done (pinned[*][p] free)
        self._used = [self._rt.event(), self._rt.event()]  # math on parity p queued before it (device[*][p] free)
        self._computed = [self._rt.event(), self._rt.event()]  # out[p] holds a finished block
        self._fetched = [self._rt.event(), self._rt.event()]  # D2H of out[p] done
        self._pinned: list[list[torch.Tensor | None]] = []  # [slot][parity] uint8, pinned
        self._device: list[list[torch.Tensor | None]] = []  # [slot][parity] uint8, on the device
        self._out_dev: list[torch.Tensor | None] = [None, None]
        self._out_host: list[torch.Tensor | None] = [None, None]
        self._turn = 0  # parity of the next input block (continues across jobs)
        self._out_turn = 0

    def inputs(self, xs: Sequence[torch.Tensor], step: int,
               numel: int) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
        """Yield ``(start, stop, chunks)`` for consecutive blocks of ``step`` elements of flat tensors
        ``xs``; ``chunks[i]`` is ``xs[i][start:stop]`` on the device, ready for the current stream.

        The chunks are valid until the next block is requested. Inputs already on a GPU are passed
        through as slices (not staged).
        """
        spans = [(a, min(a + step, numel)) for a in range(0, numel, step)]
        if not spans:
            return
        cur = self._rt.current_stream()
        self._stage(xs, spans[0], self._turn, step)
        for b, span in enumerate(spans):
            p = self._turn
            self._turn ^= 1
            cur.wait_event(self._copied[p])  # the math waits for this block's H2D copies
            chunks = [self._chunk(i, x, span, p) for i, x in enumerate(xs)]
            if b + 1 < len(spans):
                self._stage(xs, spans[b + 1], p ^ 1, step)  # overlaps the H2D and the math of block b
            try:
                yield span[0], span[1], chunks
            finally:
                self._used[p].record(cur)  # device[*][p] is free once the math queued so far has run

    def to_host(self, blocks: Iterator[torch.Tensor], reserve: int) -> Iterator[torch.Tensor]:
        """The device ``blocks``, in order, as blocks in pinned host memory, one block behind (the
        D2H copy of a block overlaps the math of the next). A yielded block is valid until the next
        one is requested. ``reserve``: bytes of a full block (the buffers' first size)."""
        cur = self._rt.current_stream()
        held = None  # (event, host block) of the block whose D2H copy is in flight
        for block in blocks:
            p = self._out_turn
            self._out_turn ^= 1
            nbytes = block.numel() * block.element_size()
            dev = self._out_dev[p] = self._fit(self._out_dev[p], nbytes, reserve, self._out_stream)
            host = self._out_host[p] = self._fit(self._out_host[p], nbytes, reserve)
            staged = dev[:nbytes].view(block.dtype)
            cur.wait_event(self._fetched[p])  # the D2H copy that last read out[p] is done
            staged.copy_(block)  # device to device, on the compute stream: after the math
            self._computed[p].record(cur)
            self._out_stream.wait_event(self._computed[p])
            self._rt.copy_async(host[:nbytes].view(block.dtype), staged, self._out_stream)
            self._fetched[p].record(self._out_stream)
            if held is not None:
                yield _collect(*held)
            held = (self._fetched[p], host[:nbytes].view(block.dtype))
        if held is not None:
            yield _collect(*held)

    def buffers(self) -> list[torch.Tensor]:
        """Every host (pinned) buffer allocated so far: inputs, then outputs (diagnostics, tests)."""
        bufs = [b for pair in self._pinned for b in pair] + list(self._out_host)
        return [b for b in bufs if b is not None]

    def close(self) -> None:
        """Wait for every queued copy; the buffers go with this object."""
        for ev in self._copied + self._fetched:
            ev.synchronize()

    def _stage(self, xs: Sequence[torch.Tensor], span: tuple[int, int], p: int, step: int) -> None:
        """Queue the H2D copies of one block of every host input into parity ``p``'s buffers."""
        start, stop = span
        self._copied[p].synchronize()  # host: the H2D copies that last read pinned[*][p] are done
        self._copy_stream.wait_event(self._used[p])  # device: the math that last read device[*][p] has run
        for i, x in enumerate(xs):
            if x.device.type != "cpu":
                continue
            size = x.element_size()
            nbytes = (stop - start) * size
            host, dev = self._slot(i, p, nbytes, step * size)
            pinned = host[:nbytes].view(x.dtype)
            pinned.copy_(x[start:stop])  # memcpy out of the page cache, on this thread
            self._rt.copy_async(dev[:nbytes].view(x.dtype), pinned, self._copy_stream)
        self._copied[p].record(self._copy_stream)

    def _chunk(self, i: int, x: torch.Tensor, span: tuple[int, int], p: int) -> torch.Tensor:
        start, stop = span
        if x.device.type != "cpu":
            return x[start:stop]
        return self._device[i][p][:(stop - start) * x.element_size()].view(x.dtype)

    def _slot(self, i: int, p: int, nbytes: int, reserve: int) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self._pinned) <= i:
            self._pinned.append([None, None])
            self._device.append([None, None])
        self._pinned[i][p] = self._fit(self._pinned[i][p], nbytes, reserve)
        self._device[i][p] = self._fit(self._device[i][p], nbytes, reserve, self._copy_stream)
        return self._pinned[i][p], self._device[i][p]

    def _fit(self, buf: torch.Tensor | None, nbytes: int, reserve: int, side_stream: Any = None) -> torch.Tensor:
        """``buf`` if it holds ``nbytes``, else a new buffer of at least ``reserve`` bytes (host when no
        ``side_stream``). Callers have waited for the copies that used ``buf``'s parity."""
        if buf is not None and buf.numel() >= nbytes:
            return buf
        size = max(nbytes, reserve)
        return self._rt.host_buffer(size) if side_stream is None else self._rt.device_buffer(size, side_stream)


def _collect(fetched: Any, host: torch.Tensor) -> torch.Tensor:
    fetched.synchronize()  # the D2H copy into ``host`` is done
    return host
