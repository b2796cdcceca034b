"""Writing a soup: sharded safetensors, tensor by tensor, into a folder that appears atomically.

- Shards are planned up front from the known shapes (huggingface_hub's splitting rule and its
  ``model-0000i-of-0000N.safetensors`` names, without importing the hub client: a local merge never
  loads it); each shard's header is written first, then tensors
  stream in block by block: no shard is ever held in memory.
- Bytes are written and sha256-hashed by two background threads, so disk writes and hashing overlap
  the math and each other.
- The folder written into is a temporary one (``soup.engine.output.OutputDir``); ``soup.json`` (the
  manifest) is written last, then the folder is renamed into place.
- The files a checkpoint needs beside its weights (config, tokenizer, processor, chat templates,
  remote code: ``soup.io.modelfiles``) are copied from one ingredient; weight files never are.
"""

from __future__ import annotations

import hashlib
import json
import queue
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from soup.io.checkpoint import SAFETENSORS_INDEX, dtype_name
from soup.errors import SoupError, os_error_line
from soup.io.manifest import MANIFEST, Manifest  # MANIFEST re-exported: soup.io.manifest owns soup.json
from soup.io.modelfiles import support_files
from soup.engine.plan import Job

__all__ = ["ShardWriter", "copy_aux_files", "parse_size", "MANIFEST",
           "AUX_FILES"]

# well-known config, generation, tokenizer and processor files; copy_aux_files copies these and every
# other file soup.io.modelfiles finds (remote code, chat templates, files the config names)
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
             "merges.txt", "spiece.model", "preprocessor_config.json", "processor_config.json",
             "video_preprocessor_config.json", "chat_template.json", "chat_template.jinja")


def parse_size(size: str | int) -> int:
    """``"5GB"``, ``"500MB"`` or a byte count -> bytes (RecipeError naming shard_size if not positive)."""
    from soup.options import parse_size as checked

    return checked(size, where="shard_size")


def plan_shards(jobs: Sequence[Job], shard_size: int) -> dict[str, list[Job]]:
    """Group jobs into shard files (in order), named as transformers names them."""
    # huggingface_hub's split_state_dict_into_shards_factory, as transformers uses it: in order, a new shard
    # when the next job would tip the current one over the limit; a job bigger than the limit gets a shard
    # of its own, placed when it is met (so it can precede the shard being filled)
    shards: list[list[Job]] = []
    current: list[Job] = []
    size = 0
    for job in jobs:
        if job.nbytes > shard_size:
            shards.append([job])
            continue
        if size + job.nbytes > shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(job)
        size += job.nbytes
    if current:
        shards.append(current)
    if len(shards) == 1:
        return {"model.safetensors": shards[0]}
    return {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": shard for i, shard in enumerate(shards)}


class _HashingWriter:
    """Writes and hashes bytes on two background threads, from a small pool of reused buffers.

    Blocks are gathered into ``block_bytes`` buffers (few hand-overs between threads); each full
    buffer goes to the writing thread and to the hashing thread, which run side by side (sha256 and
    the write system call each take about as long as the math of a 3-ingredient bf16 soup), and
    returns to the pool once both are done with it.
    """

    def __init__(self, block_bytes: int, depth: int = 4) -> None:
        self._block_bytes = block_bytes
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(depth):
            self._free.put(torch.empty(block_bytes, dtype=torch.uint8))
        self._cur: torch.Tensor | None = None  # the buffer being filled
        self._fill = 0
        self._pending: dict[int, int] = {}  # id(buffer) -> threads still using it
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._fh = None
        self._sha = None
        self._io: queue.Queue[Any] = queue.Queue()
        self._hash: queue.Queue[Any] = queue.Queue()
        self._threads = [threading.Thread(target=self._run_io, name="soup-writer", daemon=True),
                         threading.Thread(target=self._run_hash, name="soup-hasher", daemon=True)]
        for t in self._threads:
            t.start()

    def open(self, path: Path, header: bytes) -> None:
        self._send(("open", path, header))

    def reserve(self, dtype: torch.dtype, n: int) -> torch.Tensor | None:
        """Room for the next ``n`` values of ``dtype`` in the buffer being filled, or None (no room
        or misaligned). A block computed there and then passed to ``write`` is not copied again."""
        nbytes = n * dtype.itemsize
        if self._error is not None or nbytes > self._block_bytes:
            return None
        if self._cur is not None and self._fill + nbytes > self._cur.numel():
            self._flush()  # a partly filled buffer goes now; the block starts a new one
        if self._cur is None:
            self._cur, self._fill = self._free.get(), 0
        if self._fill % dtype.itemsize:
            return None
        return self._cur[self._fill:self._fill + nbytes].view(dtype)

    def write(self, block: torch.Tensor) -> None:
        raw = block.reshape(-1).view(torch.uint8)
        pos, total = 0, raw.numel()
        cur = self._cur
        if cur is not None and total and raw.data_ptr() == cur.data_ptr() + self._fill \
                and self._fill + total <= cur.numel():
            self._fill += total  # computed in place by ``reserve``: nothing to copy
            if self._fill == cur.numel():
                self._flush()
            return
        while pos < total:
            if self._cur is None:
                self._check()
                self._cur, self._fill = self._free.get(), 0
            n = min(self._cur.numel() - self._fill, total - pos)
            self._cur[self._fill:self._fill + n].copy_(raw[pos:pos + n])
            self._fill += n
            pos += n
            if self._fill == self._cur.numel():
                self._flush()

    def close_file(self) -> str:
        """Finish the current file; returns its sha256 hex digest."""
        self._flush()
        done: queue.Queue[str] = queue.Queue()
        self._send(("close", done))
        results = []
        while len(results) < 2:  # the writer's "closed" and the hasher's digest
            self._check()
            try:
                results.append(done.get(timeout=0.1))
            except queue.Empty:
                continue
        self._check()  # an error while writing the file's last bytes
        return next(r for r in results if r != "closed")

    def shutdown(self) -> None:
        self._send(None)
        for t in self._threads:
            t.join()
        if self._fh is not None:
            self._fh.close()

    def _flush(self) -> None:
        if self._cur is not None and self._fill:
            buf, self._cur = self._cur, None
            with self._lock:
                self._pending[id(buf)] = 2
            self._send(("data", buf, self._fill))

    def _send(self, item: Any) -> None:
        self._io.put(item)
        self._hash.put(item)

    def _done_with(self, buf: torch.Tensor) -> None:
        with self._lock:
            left = self._pending[id(buf)] = self._pending[id(buf)] - 1
            if left == 0:
                del self._pending[id(buf)]
        if left == 0:
            self._free.put(buf)

    def _check(self) -> None:
        if self._error is not None:
            if isinstance(self._error, OSError):
                raise SoupError(f"writing the soup failed: {os_error_line(self._error)}") from self._error
            raise SoupError(f"writing the soup failed: {self._error}") from self._error

    def _run_io(self) -> None:
        while (item := self._io.get()) is not None:
            try:
                if item[0] == "data":
                    if self._error is None:
                        self._fh.write(memoryview(item[1].numpy())[:item[2]])
                elif item[0] == "open":
                    self._fh = open(item[1], "wb")
                    self._fh.write(item[2])
                elif item[0] == "close":
                    self._fh.close()
                    self._fh = None
                    item[1].put("closed")
            except BaseException as e:  # reported to the producer on its next call
                if self._error is None:  # the first error is the one to report
                    self._error = e
            finally:
                if item[0] == "data":
                    self._done_with(item[1])

    def _run_hash(self) -> None:
        while (item := self._hash.get()) is not None:
            try:
                if item[0] == "data":
                    if self._error is None:
                        self._sha.update(memoryview(item[1].numpy())[:item[2]])
                elif item[0] == "open":
                    self._sha = hashlib.sha256(item[2])
                elif item[0] == "close":
                    item[1].put(self._sha.hexdigest())
            except BaseException as e:
                if self._error is None:  # the first error is the one to report
                    self._error = e
            finally:
                if item[0] == "data":
                    self._done_with(item[1])


class ShardWriter:
    """The disk sink: writes planned shards into ``folder``; ``on_shard(path, sha256)`` after each file."""

    def __init__(self, folder: Path, jobs: Sequence[Job], *, shard_size: int,
                 on_shard: Callable[[Path, str], None] | None = None, block_bytes: int = 8 << 20) -> None:
        self.folder = folder
        self.shards = plan_shards(jobs, shard_size)
        self.on_shard = on_shard
        self.files: dict[str, dict[str, Any]] = {}
        self._block_bytes = block_bytes
        self._out: _HashingWriter | None = None  # while ``write`` runs

    def reserve(self, dtype: torch.dtype, n: int) -> torch.Tensor | None:
        """Memory for the next output block, inside the write buffer (``Combiner.dest``): a block
        computed there is written without another copy. None outside ``write`` or when it does not fit."""
        return self._out.reserve(dtype, n) if self._out is not None else None

    def write(self, produce: Callable[[Job], Iterable[torch.Tensor]]) -> None:
        """Write every shard; ``produce(job)`` yields the job's output blocks in order."""
        out = self._out = _HashingWriter(self._block_bytes)
        try:
            for fname, jobs in self.shards.items():
                path = self.folder / fname
                header = _header(jobs)
                out.open(path, header)
                for job in jobs:
                    written = 0
                    for block in produce(job):
                        out.write(block)
                        written += block.numel() * block.element_size()
                    if written != job.nbytes:
                        raise SoupError(f"tensor {job.name}: produced {written} bytes, expected {job.nbytes}")
                sha = out.close_file()
                self.files[fname] = {"sha256": sha, "size": path.stat().st_size}
                if self.on_shard is not None:
                    self.on_shard(path, sha)
        finally:
            self._out = None
            out.shutdown()
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": sum(j.nbytes for js in self.shards.values() for j in js)},
                     "weight_map": {j.name: f for f, js in self.shards.items() for j in js}}
            (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _header(jobs: Sequence[Job]) -> bytes:
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for job in jobs:
        entries[job.name] = {"dtype": dtype_name(job.out_dtype), "shape": list(job.shape),
                             "data_offsets": [pos, pos + job.nbytes]}
        pos += job.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as safetensors does
    return len(raw).to_bytes(8, "little") + raw


def copy_aux_files(src: Path, dst: Path, *, dtype: torch.dtype | None = None,
                   warn: Callable[[str], None] | None = None) -> list[str]:
    """Copy the files the checkpoint at ``src`` needs beside its weights to ``dst``.

    Config, generation config, tokenizer and processor files, chat templates, remote code (every
    ``*.py``, ``auto_map`` targets) and files a config names (``soup.io.modelfiles.support_files``);
    never weights, indexes or soup's own files. Sets the config's dtype if given. ``warn`` hears
    about ``auto_map`` targets missing from ``src``. Returns the copied names (relative paths).
    """
    found = support_files(src)
    if warn is not None:
        for name in found.missing_code:
            warn(f"{src}: the config's auto_map names {name}, which is not beside the weights: "
                 "the soup will not load with trust_remote_code")
    copied = []
    for name in found.files:
        f = src / name
        if "/" in name:
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
        if name == "config.json" and dtype is not None:
            cfg = json.loads(f.read_text())
            for key in ("torch_dtype", "dtype"):
                if key in cfg:
                    cfg[key] = str(dtype).removeprefix("torch.")
            (dst / name).write_text(json.dumps(cfg, indent=2) + "\n")
        else:
            shutil.copyfile(f, dst / name)
        copied.append(name)
    return copied


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write ``soup.json`` atomically: the last file of a finished soup (``soup.io.manifest.write``)."""
    from soup.io.manifest import write

    write(folder, manifest)
