"""The safetensors header, read as strictly as the safetensors library reads it.

A safetensors file is an 8-byte little-endian header length, a UTF-8 JSON header, then the tensor
data. The header maps each tensor name to ``{"dtype", "shape", "data_offsets"}`` (offsets relative to
the data) and may hold ``__metadata__``, a mapping of names to strings. The library deserialises it
into typed fields, so ``[16.5]``, ``["16"]``, ``[true]`` or ``4.0`` are refused there; the checks here
are the same: types, not only values. The data ranges must tile the data exactly: no overlap, no gap,
nothing after the last tensor, nothing past the end of the file. Every problem is one CheckpointError
line naming the file and the tensor.

FIFOs, devices and sockets are refused by name before anything opens them (``refuse_special``).
"""

from __future__ import annotations

import json
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soup.errors import CheckpointError

__all__ = ["HeaderEntry", "read_header", "refuse_special", "MAX_HEADER"]

MAX_HEADER = 100_000_000  # the safetensors limit


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors header, checked."""

    name: str
    dtype: str  # the safetensors name (F32, BF16...)
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of its data in the file
    nbytes: int


def read_header(file: Path, itemsize: Mapping[str, int]) -> tuple[bytes, list[HeaderEntry]]:
    """The header's bytes (for a fingerprint) and its tensors in file order.

    Args:
        file: a ``.safetensors`` file.
        itemsize: the known dtype names and their sizes in bytes; any other dtype is refused.

    Raises:
        CheckpointError: truncated, not safetensors, or a field of the wrong type or value.
    """
    refuse_special(file)
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated ({size} bytes, no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{file}: header length {n} does not fit the file ({size} bytes): truncated or not safetensors")
        raw = fh.read(n)
    try:  # UTF-8 as the format requires: json.loads(bytes) would also accept UTF-16/32
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{file}: safetensors header is not valid UTF-8") from None
    try:
        header = json.loads(text)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except ValueError as e:
        raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    data_start = 8 + n
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{file}: __metadata__ {_brief(meta)} is not a mapping of names to strings")
    table: list[HeaderEntry] = []
    for name, entry in header.items():
        info = _entry(file, name, entry, data_start, itemsize)
        if info.offset + info.nbytes > size:
            raise CheckpointError(f"{file}: tensor {name}: data ends at byte {info.offset + info.nbytes} but the "
                                  f"file has {size} bytes: truncated")
        table.append(info)
    table.sort(key=lambda t: t.offset)
    pos = data_start
    for info in table:
        if info.offset != pos:
            what = "overlaps the previous tensor" if info.offset < pos else "leaves a gap before it"
            raise CheckpointError(f"{file}: tensor {info.name}: data_offsets {what}: corrupt header")
        pos += info.nbytes
    if pos != size:
        last = f"tensor {table[-1].name}: " if table else ""
        raise CheckpointError(f"{file}: {last}{size - pos} bytes after the last tensor: header offsets do not "
                              "match the file")
    return head + raw, table


def refuse_special(path: Path) -> None:
    """A FIFO, device or socket (links followed) is refused by name: reading a FIFO blocks forever,
    ``/dev/zero`` never ends. A missing path passes (the caller says what is missing)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    for test, kind in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            raise CheckpointError(f"{path}: is {kind}, not a regular file: soup reads weights from files only")


def _entry(file: Path, name: str, entry: Any, data_start: int, itemsize: Mapping[str, int]) -> HeaderEntry:
    """One entry, typed as the library types it: ``dtype`` a known name, ``shape`` a list and
    ``data_offsets`` a pair of JSON integers in [0, 2**64) (not ``4.0``, ``"4"`` or ``true``), the
    offsets spanning exactly shape x dtype bytes."""
    def whole(v: Any) -> bool:
        return type(v) is int and 0 <= v < 2**64

    where = f"{file}: tensor {name}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{where}: malformed header entry {_brief(entry)} (needs dtype, shape, data_offsets)")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in itemsize:
        raise CheckpointError(f"{where}: unknown dtype {_brief(dtype)}")
    if not isinstance(shape, list) or not all(whole(d) for d in shape):
        raise CheckpointError(f"{where}: shape {_brief(shape)} is not a list of whole numbers >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(whole(o) for o in offsets):
        raise CheckpointError(f"{where}: data_offsets {_brief(offsets)} are not two whole numbers >= 0")
    begin, end = offsets
    nbytes = itemsize[dtype]
    for d in shape:
        nbytes *= d
    if end - begin != nbytes:
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] do not match dtype {dtype} and shape "
                              f"{shape} ({nbytes} bytes)")
    return HeaderEntry(name, dtype, tuple(shape), data_start + begin, nbytes)


def _brief(value: Any) -> str:
    text = repr(value)  # repr: control characters from the file are escaped
    return text if len(text) <= 60 else text[:57] + "..."
