"""Options as checked values: every bad value is refused before any work, naming its field.

The CLI, recipes and the Python API all build the engine's options through ``MergeOptions``; a bad
value is a ``RecipeError`` whose message starts with the option's name, e.g.
``shard_size: 0 must be a positive size such as 5GB or 500MB``. A recipe reports every bad field at
once (``RecipeError.errors``). ``check_weights`` does the same for weight lists (``--weights``,
rules, recipes), ``check_option_names`` for keyword options of the Python API.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from soup.errors import RecipeError

__all__ = ["MergeOptions", "check_weights", "check_option_names", "check_device", "parse_size"]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}
ACCUMULATE = {"auto": None, "float32": torch.float32, "float64": torch.float64}  # auto: per tensor, see below
MAX_WEIGHT = 1e30  # larger weights overflow float32 products and sums
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _fail(problems: list[str]) -> RecipeError:
    err = RecipeError("; ".join(problems))
    err.errors = problems
    return err


@dataclass(frozen=True)
class MergeOptions:
    """The merge engine's options, validated on construction (RecipeError lists every bad field)."""

    dtype: str | torch.dtype | None = None  # output dtype of float tensors; None: the ingredients'
    accumulate: str = "auto"  # running sum: auto (float32 for 16-bit inputs, float64 for 32-bit), float32, float64
    shard_size: str | int = "5GB"  # bytes per output shard: "5GB", "500MB" or a byte count
    device: str | torch.device = "cpu"  # where the math runs (availability is checked by the engine)
    strict: bool = False  # differing integer/bool buffers are an error, not a warning
    config_from: int | str = 0  # ingredient (index or label) whose config/tokenizer files are copied
    normalize: bool = True  # scale weights to sum to 1
    mixed_float: bool = False  # allow float dtypes to differ between ingredients
    vocab: int | str = "union"  # differing vocabularies: union, first or an ingredient (soup.io.vocab)

    def __post_init__(self) -> None:
        problems = []
        for check in (self._dtype, self._accumulate, self._shard_size, self._device, self._flags,
                      self._config_from, self._vocab):
            try:
                check()
            except RecipeError as e:
                problems.append(str(e))
        if problems:
            raise _fail(problems)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @property
    def torch_dtype(self) -> torch.dtype | None:
        if self.dtype is None or isinstance(self.dtype, torch.dtype):
            return self.dtype
        name = self.dtype.lower()
        return DTYPES[DTYPE_ALIASES.get(name, name)]

    @property
    def accumulate_dtype(self) -> torch.dtype | None:
        """The accumulation dtype forced for every tensor; None for auto (``soup.engine.combine.accumulation_dtype``)."""
        return ACCUMULATE[self.accumulate]

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.shard_size)

    def check_config_from(self, labels: Sequence[str], *, base: bool = False) -> None:
        """``config_from`` names one of these ingredients (by index or label), or ``base``, the base
        model of a merge method, when there is one."""
        c = self.config_from
        if base and c == "base":
            return
        if isinstance(c, int) or c.isdigit():
            if not 0 <= int(c) < len(labels):
                raise RecipeError(f"config_from: index {c} out of range (0..{len(labels) - 1})")
        elif c not in labels:
            raise RecipeError(f"config_from: no ingredient named {c!r} (have: {', '.join(labels)})")

    def _dtype(self) -> None:
        d = self.dtype
        if d is None or (isinstance(d, torch.dtype) and d.is_floating_point):
            return
        if not (isinstance(d, str) and DTYPE_ALIASES.get(d.lower(), d.lower()) in DTYPES):
            raise RecipeError(f"dtype: {d!r} is not one of {', '.join(DTYPES)} "
                              f"(or {'/'.join(DTYPE_ALIASES)})")

    def _accumulate(self) -> None:
        if not (isinstance(self.accumulate, str) and self.accumulate in ACCUMULATE):
            raise RecipeError(f"accumulate: {self.accumulate!r} is not auto, float32 or float64")

    def _shard_size(self) -> None:
        parse_size(self.shard_size)

    def _device(self) -> None:
        check_device(self.device, where="device")

    def _flags(self) -> None:
        for name in ("strict", "normalize", "mixed_float"):
            if not isinstance(getattr(self, name), bool):
                raise RecipeError(f"{name}: must be true or false, got {getattr(self, name)!r}")

    def _config_from(self) -> None:
        c = self.config_from
        if isinstance(c, bool) or not isinstance(c, (int, str)) or (isinstance(c, int) and c < 0) or c == "":
            raise RecipeError(f"config_from: {c!r} must be an ingredient index (0, 1, ...) or name")

    def _vocab(self) -> None:  # an ingredient's name is checked against the labels by soup.io.vocab
        v = self.vocab
        if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, int) and v < 0) or v == "":
            raise RecipeError(f"vocab: {v!r} must be union, first, an ingredient index (0, 1, ...) or name")


def parse_size(size: Any, *, where: str = "shard_size") -> int:
    """``"5GB"`` (10**9), ``"2GiB"`` (2**30), ``"500MB"`` or a byte count -> a positive number of bytes."""
    hint = f"{where}: {size!r} must be a positive size such as 5GB or 500MB"
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise RecipeError(hint)
    if isinstance(size, int):
        n = size
    else:
        m = _SIZE.match(size)
        if m is None:
            raise RecipeError(hint)
        value = float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()]
        n = int(value) if math.isfinite(value) else 0
    if n < 1:
        raise RecipeError(hint)
    return n


def check_device(device: Any, *, where: str) -> None:
    """A torch device name (``cpu``, ``cuda``, ``cuda:1``); whether it is available is not checked here."""
    if isinstance(device, torch.device):
        return
    if not isinstance(device, str):
        raise RecipeError(f"{where}: {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)")
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise RecipeError(f"{where}: {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None


def check_weights(values: Any, *, where: str) -> tuple[float, ...]:
    """Weights as floats: numbers (or numeric strings), finite, at most ``MAX_WEIGHT`` in magnitude."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise RecipeError(f"{where}: a list of numbers is required, got {values!r}")
    out = []
    for i, v in enumerate(values):
        try:
            if isinstance(v, bool):
                raise TypeError
            x = float(v)
        except (TypeError, ValueError):
            raise RecipeError(f"{where}: {v!r} is not a number (index {i})") from None
        if not math.isfinite(x):
            raise RecipeError(f"{where}: {x} is not a finite number (index {i})")
        if abs(x) > MAX_WEIGHT:
            raise RecipeError(f"{where}: {x:g} is too large (index {i}); weights must be at most {MAX_WEIGHT:g}")
        out.append(x)
    if not math.isfinite(math.fsum(out)):
        raise RecipeError(f"{where}: the weights' sum overflows")
    return tuple(out)


def check_option_names(options: Mapping[Any, Any], allowed: Iterable[str], *, where: str) -> None:
    """Unknown keyword options are errors that suggest the closest valid name."""
    allowed = sorted(allowed)
    for name in options:
        if name in allowed:
            continue
        close = difflib.get_close_matches(str(name), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"{where}: unknown option {name!r}{hint}; valid: {', '.join(allowed)}")
