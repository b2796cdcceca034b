"""An optional fused CPU kernel for the weighted mean: one pass per ingredient instead of three.

The torch path does, per ingredient and block, ``tmp.copy_(x)`` (convert), ``tmp.mul_(w)`` and
``acc.add_(tmp)``: three passes over memory. The kernel (``soup/engine/_kernel.c``) does the same IEEE
operations in one loop — ``acc[i] = acc[i] + (float)x[i] * w`` with each product and sum rounded
separately (built with ``-ffp-contract=off``: no fused multiply-add) — and the last ingredient's pass
also casts to the output dtype (bfloat16 round-to-nearest-even, as torch does) and counts non-finite
values. The same loops exist with a float64 accumulator (``acc[i] = acc[i] + (double)x[i] * w``, the
weight a double; the cast to bfloat16 goes through float32 as torch's does). Results are
bit-identical to the torch path; tests compare them.

Design:

- Built with the package (``setup.py``: an optional setuptools extension, ``soup/engine/_kernel*.so``;
  ``pip install -e .`` builds it in place, so rerun it after editing the C), never at run time;
  loaded with ctypes from the package folder only. Where it was not built (no compiler at install
  time) or with ``SOUP_NO_KERNEL=1``, the engine uses torch ops: only speed differs.
- No ``-march``: each loop is compiled for the architecture's baseline (x86-64: SSE2) and, on x86-64,
  for AVX2 and AVX-512; the library reports what this CPU runs and the best level is used, so a
  build moved to another machine still runs. ``SOUP_KERNEL_VARIANT=baseline|avx2|avx512`` caps the
  level (read by each ``load()``); the library itself never runs a level the CPU lacks.
- Inputs bfloat16 or float32; accumulation float32 or float64; output bfloat16, float32 or the
  accumulator's dtype. Blocks are split over threads here (ctypes releases the GIL during each call).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["FusedMean", "Kernel", "load", "variant"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_opened: tuple[ctypes.CDLL, Path] | None | bool = False  # False: not tried yet; None: unavailable


@dataclass(frozen=True)
class Kernel:
    """The loaded library and the level its calls run at."""

    cdll: ctypes.CDLL
    path: Path  # the shared library, inside the installed package
    level: int  # 0 = baseline; higher = wider vectors, only if the CPU supports them
    variant: str  # the level's name: "baseline", "avx2", "avx512"

    def accumulate(self, acc: int, x: int, kind: int, w: float, n: int, first: bool) -> None:
        self.cdll.soup_accumulate(self.level, acc, x, kind, w, n, int(first))

    def finish_bf16(self, acc: int, out: int, n: int) -> int:
        return self.cdll.soup_finish_bf16(self.level, acc, out, n)

    def count_nonfinite(self, acc: int, n: int) -> int:
        return self.cdll.soup_count_nonfinite(self.level, acc, n)

    def accumulate64(self, acc: int, x: int, kind: int, w: float, n: int, first: bool) -> None:
        self.cdll.soup_accumulate64(self.level, acc, x, kind, w, n, int(first))

    def finish64(self, acc: int, out: int, kind: int, n: int) -> int:
        return self.cdll.soup_finish64(self.level, acc, out, kind, n)

    def count_nonfinite64(self, acc: int, n: int) -> int:
        return self.cdll.soup_count_nonfinite64(self.level, acc, n)


def _open() -> tuple[ctypes.CDLL, Path] | None:
    spec = importlib.util.find_spec("soup.engine._kernel")  # the built extension's file, for this Python
    if spec is None or not spec.origin:
        log.debug("soup's C kernel was not built with this install: using torch ops")
        return None
    dll = ctypes.CDLL(spec.origin)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    dll.soup_level_supported.argtypes, dll.soup_level_supported.restype = [ctypes.c_int], ctypes.c_int
    dll.soup_level_name.argtypes, dll.soup_level_name.restype = [ctypes.c_int], ctypes.c_char_p
    dll.soup_accumulate.argtypes = [ctypes.c_int, ptr, ptr, ctypes.c_int, ctypes.c_float, i64, ctypes.c_int]
    dll.soup_accumulate.restype = None
    dll.soup_finish_bf16.argtypes, dll.soup_finish_bf16.restype = [ctypes.c_int, ptr, ptr, i64], i64
    dll.soup_count_nonfinite.argtypes, dll.soup_count_nonfinite.restype = [ctypes.c_int, ptr, i64], i64
    dll.soup_accumulate64.argtypes = [ctypes.c_int, ptr, ptr, ctypes.c_int, ctypes.c_double, i64, ctypes.c_int]
    dll.soup_accumulate64.restype = None
    dll.soup_finish64.argtypes, dll.soup_finish64.restype = [ctypes.c_int, ptr, ptr, ctypes.c_int, i64], i64
    dll.soup_count_nonfinite64.argtypes, dll.soup_count_nonfinite64.restype = [ctypes.c_int, ptr, i64], i64
    return dll, Path(spec.origin)


def _levels(dll: ctypes.CDLL) -> list[str]:
    names = []
    while (name := dll.soup_level_name(len(names))) is not None:
        names.append(name.decode())
    return names


def load() -> Kernel | None:
    """The compiled kernel at the best level this CPU runs; None when not built or disabled."""
    global _opened
    if os.environ.get("SOUP_NO_KERNEL", "") not in ("", "0"):
        return None
    with _lock:
        if _opened is False:
            try:
                _opened = _open()
            except (OSError, AttributeError) as e:  # built for another platform; a stale build (rerun pip install)
                log.debug("soup's C kernel could not be loaded (%s): using torch ops", e)
                _opened = None
    if _opened is None:
        return None
    dll, path = _opened
    names = _levels(dll)
    cap = os.environ.get("SOUP_KERNEL_VARIANT", "")
    if cap and cap not in names:
        warnings.warn(f"SOUP_KERNEL_VARIANT={cap!r} is not one of {', '.join(names)}: ignored", stacklevel=2)
        cap = ""
    top = names.index(cap) if cap else len(names) - 1
    level = max(lv for lv in range(top + 1) if dll.soup_level_supported(lv))
    return Kernel(dll, path, level, names[level])


def variant() -> str | None:
    """The kernel variant the engine uses ("baseline", "avx2", "avx512"), None when it uses torch ops."""
    k = load()
    return None if k is None else k.variant


_KINDS = {torch.bfloat16: 0, torch.float32: 1}
_ACCUMULATORS = (torch.float32, torch.float64)


class FusedMean:
    """The weighted mean of one block through the kernel; ``supports`` says when it applies.

    With ``threads`` > 1 each block is split in contiguous parts computed in parallel (ctypes
    releases the GIL during the call), following torch's intra-op thread count.
    """

    def __init__(self, lib: Kernel, threads: int = 1) -> None:
        self.lib = lib
        self.threads = max(1, threads)
        self._pool = None
        if self.threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="soup-kernel")

    @staticmethod
    def supports(in_dtypes, out_dtype: torch.dtype, acc_dtype: torch.dtype, device: torch.device) -> bool:
        return (device.type == "cpu" and acc_dtype in _ACCUMULATORS
                and (out_dtype in _KINDS or out_dtype == acc_dtype) and all(d in _KINDS for d in in_dtypes))

    def block(self, pairs, start: int, stop: int, acc: torch.Tensor, out: torch.Tensor | None) -> int:
        """acc[:n] = sum_i x_i[start:stop] * w_i; out[:n] = cast(acc) when given; returns #non-finite."""
        n = stop - start
        # raw addresses: slicing tensors per part costs more than the math on small blocks
        ins = [(x.data_ptr() + start * x.element_size(), x.element_size(), _KINDS[x.dtype], w) for x, w in pairs]
        dst = None if out is None else (out.data_ptr(), out.element_size(), _KINDS.get(out.dtype, -1))
        args = (ins, acc.dtype == torch.float64, acc.data_ptr(), acc.element_size(), dst)
        if self._pool is None or n < 65536:
            return self._part(0, n, *args)
        step = -(-n // self.threads)
        cuts = [(a, min(a + step, n)) for a in range(0, n, step)]
        futures = [self._pool.submit(self._part, a, b, *args) for a, b in cuts[1:]]
        bad = self._part(*cuts[0], *args)
        return bad + sum(f.result() for f in futures)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _part(self, a: int, b: int, ins, wide: bool, acc: int, acc_size: int, dst) -> int:
        """Elements [a, b) of the block: ``ins`` (address of element 0, item size, kind, weight) per
        input, ``acc`` the accumulator's address, ``dst`` (address, item size, kind) of the output."""
        n, lib, level = b - a, self.lib.cdll, self.lib.level
        acc += a * acc_size
        accumulate = lib.soup_accumulate64 if wide else lib.soup_accumulate
        for k, (x, size, kind, w) in enumerate(ins):
            accumulate(level, acc, x + a * size, kind, w, n, k == 0)
        if dst is None:
            return (lib.soup_count_nonfinite64 if wide else lib.soup_count_nonfinite)(level, acc, n)
        out = dst[0] + a * dst[1]
        return lib.soup_finish64(level, acc, out, dst[2], n) if wide else lib.soup_finish_bf16(level, acc, out, n)
