"""Checkpoints on disk: find the weight files, read their headers, build the tensor table.

A checkpoint is a local folder in Hugging Face layout (``model.safetensors``, sharded
``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``, ``pytorch_model.bin`` or its
sharded index) or a single ``.safetensors`` / ``.bin`` / ``.pt`` / ``.pth`` file. The tensor table
(name, dtype, shape, file, byte offset) is built from headers only: safetensors headers are checked
as strictly as the safetensors library checks them (``soup.io.safetensors_header``); torch files (zip
format) are opened with ``torch.load(mmap=True, weights_only=True)``, so no tensor data is read and no
pickled code runs. FIFOs and device files are refused by name, never opened.
Every problem is a CheckpointError naming the file (and tensor).

Training frameworks wrap the weights: DeepSpeed saves ``{"module": ...}``, Lightning and mmengine
(XTuner) ``{"state_dict": ...}``, many loops ``{"model": ...}``. The weights are found under the one
such key that holds a dict of tensors, or under the key the user names (``state_dict_key``). A
prefix on every name (DDP's ``module.``, torch.compile's ``_orig_mod.``) can be stripped
(``strip_prefix``); ``common_prefix`` finds it for ``soup inspect``.

The fingerprint is cheap: file names, sizes, mtimes and the header bytes, hashed; gigabytes of
tensor data are never hashed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soup.errors import CheckpointError
from soup.io.safetensors_header import read_header, refuse_special

__all__ = ["TensorInfo", "Checkpoint", "open_checkpoint", "DTYPES", "dtype_name", "parse_dtype",
           "load_torch_file", "common_prefix", "strip_names", "WRAPPER_KEYS", "WRAPPER_PREFIXES"]

# safetensors dtype names <-> torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {k: v.itemsize for k, v in DTYPES.items()}
_USER_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float64": torch.float64, "fp64": torch.float64}

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
WRAPPER_KEYS = ("state_dict", "module", "model")  # where training frameworks put the weights
# name prefixes added by training wrappers: DDP/DeepSpeed, torch.compile, FSDP, Lightning Fabric
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_forward_module.")


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    return _NAMES[dtype]


def parse_dtype(text: str | torch.dtype | None) -> torch.dtype | None:
    """A user-facing dtype name (``bfloat16``, ``bf16``, ``float16``, ``float32``...) -> torch dtype."""
    if text is None or isinstance(text, torch.dtype):
        return text
    try:
        return _USER_DTYPES[text.lower()]
    except KeyError:
        raise CheckpointError(f"unknown dtype {text!r}; use one of {', '.join(sorted(_USER_DTYPES))}") from None


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint, known from the header only."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path | None  # None for in-memory tensors
    offset: int | None  # absolute byte offset in a safetensors file; None for .bin / memory
    stored: str | None = None  # the name in the file, when a stripped prefix makes it differ

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass
class Checkpoint:
    """An indexed checkpoint: where every tensor lives, and a cheap content fingerprint.

    ``tensors`` is ordered for sequential reading (file by file, by offset). ``root`` is the folder
    holding config/tokenizer files (None for a single file or in-memory weights).
    """

    label: str  # a short name for messages and reports
    source: str  # what the user gave (path, hf://repo@sha)
    root: Path | None
    files: list[Path]
    tensors: dict[str, TensorInfo]
    fingerprint: str
    memory: dict[str, torch.Tensor] | None = None  # in-memory weights, when not on disk
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. hub repo/revision for provenance
    state_dict_key: str | None = None  # torch files: the wrapper key the weights are under
    stats: dict[Path, tuple[int, int, int, int]] = field(default_factory=dict)  # file -> (size, mtime_ns, dev, ino)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def verify(self, doing: str = "") -> None:
        """Raise CheckpointError naming the first weight file that changed since the checkpoint was opened
        (size, modification time or inode: a training job saving again, even at the same size).

        Called before a score is cached and before a soup is put in place, so a score or a soup never
        belongs to bytes that are gone. A few stat calls: microseconds.
        """
        for file, seen in self.stats.items():
            try:
                st = file.stat()
                now = (st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino)
            except OSError:
                now = None
            if now != seen:
                what = "was removed" if now is None else "was rewritten"
                raise CheckpointError(f"{file}: {what} while soup was reading it (ingredient {self.label}); "
                                      f"{doing or 'stopped'}: run again once it is complete")


SAMPLE = 1 << 16  # bytes read at the start, the middle and the end of each file for its fingerprint


def _data_sample(file: Path, size: int) -> bytes:
    """Three 64 KiB samples of a file's bytes, for the fingerprint: two files with one header, size and
    modification time (written within one clock tick; copies that kept their times) still differ
    wherever their data does at those places: a fine-tune's weights differ everywhere."""
    with open(file, "rb") as f:
        parts = []
        for at in sorted({0, max(0, size // 2 - SAMPLE // 2), max(0, size - SAMPLE)}):
            f.seek(at)
            parts.append(f.read(SAMPLE))
    return b"".join(parts)


def open_checkpoint(path: str | Path, *, label: str | None = None, state_dict_key: str | None = None,
                    strip_prefix: str | None = None) -> Checkpoint:
    """Index a local checkpoint folder or file from its headers.

    Args:
        path: an HF-layout folder, or one ``.safetensors`` / ``.bin`` / ``.pt`` / ``.pth`` file.
        label: the ingredient's name (default: the file or folder name).
        state_dict_key: torch files only: the top-level key holding the weights (default: the
            file itself when it is a flat state dict, else the one of ``state_dict``, ``module``,
            ``model`` that holds a dict of tensors).
        strip_prefix: removed from the start of every tensor name that has it (``module.``).

    Raises:
        CheckpointError: the path is missing, holds no weights, or a file is corrupt.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    refuse_special(path)
    if strip_prefix is not None and (not isinstance(strip_prefix, str) or not strip_prefix):
        raise CheckpointError(f"{path}: strip_prefix must be a non-empty string, got {strip_prefix!r}")
    root: Path | None = None
    index_file: Path | None = None
    files_by_tensor: dict[str, str] | None = None
    if path.is_dir():
        root = path
        for name in (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, BIN_INDEX, BIN_SINGLE):
            refuse_special(path / name)
            if (path / name).is_file():
                break
        else:
            others = sorted(f.name for f in path.iterdir() if f.suffix in (".safetensors", *TORCH_SUFFIXES))
            hint = f"; it holds {', '.join(others[:3])}: pass the file itself" if others else ""
            raise CheckpointError(f"{path}: no weights found (looked for {SAFETENSORS_INDEX}, "
                                  f"{SAFETENSORS_SINGLE}, {BIN_INDEX}, {BIN_SINGLE}){hint}")
        target = path / name
        if name.endswith(".json"):
            index_file = target
            files_by_tensor = _read_index(target)
            files = sorted({path / f for f in files_by_tensor.values()})
        else:
            files = [target]
    else:
        files = [path]
    tensors: dict[str, TensorInfo] = {}
    digest = hashlib.sha256()
    stats: dict[Path, tuple[int, int, int, int]] = {}
    key = state_dict_key
    for file in files:
        if not file.is_file():
            refuse_special(file)
            raise CheckpointError(f"{index_file}: names missing file {file.name}" if index_file is not None
                                  else f"{file}: not a file")
        if file.suffix in TORCH_SUFFIXES:
            header, table, key = _read_torch_header(file, key)  # the key found in the first file, for all
        else:
            header, table = _read_header(file)
        st = file.stat()
        stats[file] = (st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino)
        digest.update(f"{file.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        digest.update(header)
        digest.update(_data_sample(file, st.st_size))
        for info in table:
            if files_by_tensor is not None and files_by_tensor.get(info.name) != file.name:
                continue  # the index is the truth: a stray tensor in a shard is not part of the model
            tensors[info.name] = info
    if files_by_tensor is not None:
        for name, fname in files_by_tensor.items():
            if name not in tensors:
                raise CheckpointError(f"{index_file}: tensor {name} is mapped to {fname}, which does not hold it")
        digest.update(index_file.read_bytes())
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    if strip_prefix:
        tensors = strip_names(tensors, strip_prefix, path)
    for what, value in (("key", key), ("strip", strip_prefix)):  # the same file read two ways differs
        if value:
            digest.update(f"\0{what}\0{value}".encode())
    return Checkpoint(label=label or path.name, source=str(path), root=root, files=files,
                      tensors=tensors, fingerprint=digest.hexdigest(), state_dict_key=key, stats=stats)


def strip_names(tensors: dict[str, TensorInfo], prefix: str, path: Path | str) -> dict[str, TensorInfo]:
    """The table with ``prefix`` removed from every name that starts with it (CheckpointError on a clash)."""
    out: dict[str, TensorInfo] = {}
    for name, info in tensors.items():
        new = name[len(prefix):] if name.startswith(prefix) else name
        if not new:
            raise CheckpointError(f"{path}: tensor {name}: stripping {prefix!r} leaves an empty name")
        if new in out:
            raise CheckpointError(f"{path}: tensor {name}: stripping {prefix!r} gives {new}, "
                                  f"which is already a tensor name")
        out[new] = dataclasses.replace(info, name=new, stored=name) if new != name else info
    return out


def common_prefix(names) -> str | None:
    """The dotted prefix every name starts with (``"module."``), or None.

    Only the first component counts, and only when it is shared by at least two names; a model's
    own first component (``model.``) is shared too when its head is tied, so this is reported,
    never stripped automatically.
    """
    names = list(names)
    if len(names) < 2 or any("." not in n for n in names):
        return None
    first = {n.split(".", 1)[0] for n in names}
    return f"{first.pop()}." if len(first) == 1 else None


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not a mapping of tensor -> file")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid index ({type(e).__name__}: {e})") from None
    for fname in weight_map.values():
        if "/" in fname or fname.startswith("."):
            raise CheckpointError(f"{index}: bad file name {fname!r} in weight_map")
    return weight_map


def _read_header(file: Path) -> tuple[bytes, list[TensorInfo]]:
    if file.suffix != ".safetensors":
        raise CheckpointError(f"{file}: unknown weight format (expected .safetensors, .bin, .pt or .pth)")
    return read_safetensors_header(file)


def read_safetensors_header(file: Path) -> tuple[bytes, list[TensorInfo]]:
    """Parse and check a safetensors header (``soup.io.safetensors_header``: typed like the safetensors
    library, dtypes known, offsets contiguous, inside the file)."""
    head, entries = read_header(file, _ITEMSIZE)
    return head, [TensorInfo(e.name, DTYPES[e.dtype], e.shape, file, e.offset) for e in entries]


def _read_torch_header(file: Path, key: str | None) -> tuple[bytes, list[TensorInfo], str | None]:
    state, key = read_torch_weights(file, key)
    table = [TensorInfo(k, v.dtype, tuple(v.shape), file, None) for k, v in state.items()]
    with open(file, "rb") as fh:  # the zip central directory is at the end: hash both ends
        head = fh.read(65536)
        fh.seek(max(0, file.stat().st_size - 65536))
        head += fh.read()
    return head, table, key


def load_torch_file(file: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """A torch file's weights, memory-mapped (``weights_only``): no tensor data is read."""
    return read_torch_weights(file, key)[0]


def read_torch_weights(file: Path, key: str | None = None) -> tuple[dict[str, torch.Tensor], str | None]:
    """A torch file's state dict and the wrapper key it was under (None: the file is the state dict).

    ``torch.load(mmap=True, weights_only=True)``: tensors stay on disk, and a pickle that would
    call anything but tensor and container constructors is refused before it runs.
    """
    try:
        obj = torch.load(file, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        line = _torch_load_error(e)
        if "Weights only load failed" in str(e):  # torch's advice (weights_only=False) is not for soup's users
            found = re.search(r"GLOBAL (\S+)", str(e))
            line = (f"refused: unpickling it would call {found.group(1) if found else 'code'}, which weights_only "
                    "loading does not allow (soup never runs code from a checkpoint)")
        raise CheckpointError(f"{file}: {line}") from None
    state, key = _unwrap(obj, file, key)
    for k, v in state.items():
        if v.dtype not in _NAMES:
            raise CheckpointError(f"{file}: tensor {k}: unsupported dtype {v.dtype}")
    return state, key


def _torch_load_error(e: Exception) -> str:
    """One line for a failed ``torch.load``."""
    text = str(e)
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsafe:
        return (f"refused: unpickling it would call {unsafe.group(1)}, which weights_only loading does not "
                "allow (soup never runs code from a checkpoint)")
    if "WeightsUnpickler error:" in text:
        reason = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0]
        return f"refused by weights_only loading ({reason})"
    if "mmap can only be used" in text:
        return ("not a zip-format torch checkpoint (truncated, or saved with "
                "_use_new_zipfile_serialization=False: load and re-save it with torch.save)")
    first = text.splitlines()[0] if text else ""
    return f"cannot read torch checkpoint ({type(e).__name__}: {first})"


def _is_state(value: Any) -> bool:
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


def _unwrap(obj: Any, file: Path, key: str | None) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict inside a loaded torch file: the file itself, ``obj[key]``, or the one wrapper key."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: holds a {type(obj).__name__}, not a state dict of tensors")
    keys = ", ".join(repr(k) for k in list(obj)[:12]) + (", ..." if len(obj) > 12 else "")
    if key is not None:
        if key not in obj:
            raise CheckpointError(f"{file}: no key {key!r} (--state-dict-key); top-level keys: {keys}")
        if not _is_state(obj[key]):
            raise CheckpointError(f"{file}: {key!r} (--state-dict-key) holds a {type(obj[key]).__name__}, "
                                  "not a dict of tensors")
        return obj[key], key
    if _is_state(obj):
        return obj, None
    found = [k for k in WRAPPER_KEYS if _is_state(obj.get(k))]
    if len(found) == 1:
        return obj[found[0]], found[0]
    states = [repr(k) for k, v in obj.items() if _is_state(v)]
    if len(found) > 1:
        raise CheckpointError(f"{file}: weights under several keys ({', '.join(states)}): choose one with "
                              "--state-dict-key (key: in a recipe)")
    hint = (f"; dicts of tensors under {', '.join(states)}: choose one with --state-dict-key (key: in a recipe)"
            if states else "")
    raise CheckpointError(f"{file}: not a flat state dict, and no {'/'.join(WRAPPER_KEYS)} key holds one "
                          f"(top-level keys: {keys}){hint}")


def memory_checkpoint(state_dict: dict[str, torch.Tensor], *, label: str,
                      fingerprint: str | None = None) -> Checkpoint:
    """Wrap in-memory tensors (a training script's state dict) as a checkpoint.

    The fingerprint is a content hash unless one is given (a pass over the tensors is then saved).
    """
    tensors, digest = {}, hashlib.sha256()
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{label}: {name} is not a tensor")
        tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), None, None)
        if fingerprint is None:
            digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            digest.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return Checkpoint(label=label, source=f"memory:{label}", root=None, files=[], tensors=tensors,
                      fingerprint=fingerprint or "memory-" + digest.hexdigest(), memory=dict(state_dict))
