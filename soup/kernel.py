"""An optional fused CPU kernel for the weighted mean: one pass per ingredient instead of three.

The torch path does, per ingredient and block, ``tmp.copy_(x)`` (convert), ``tmp.mul_(w)`` and
``acc.add_(tmp)``: three passes over memory. This kernel does the same IEEE operations in one loop —
``acc[i] = acc[i] + (float)x[i] * w`` with each product and sum rounded separately (compiled with
``-ffp-contract=off``, so no fused multiply-add) — and the last ingredient's pass also casts to the
output dtype (bfloat16 round-to-nearest-even, as torch does) and flags non-finite values. Results
are bit-identical to the torch path; tests compare them.

It is plain C compiled on first use with the system C compiler into the user cache dir and loaded
with ctypes. Without a compiler (or with ``SOUP_NO_KERNEL=1``) the engine uses torch ops: only
speed differs. Inputs: bfloat16 or float32; accumulation float32; output bfloat16 or float32.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["load", "FusedMean"]

SOURCE = r"""
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

/* acc = x * w (first) or acc = acc + x * w; x is bf16 (kind 0) or f32 (kind 1) */
void soup_accumulate(float *acc, const void *x, int kind, float w, int64_t n, int first) {
    if (kind == 0) {
        const uint16_t *b = (const uint16_t *)x;
        if (first) for (int64_t i = 0; i < n; i++) acc[i] = bf16_to_f32(b[i]) * w;
        else       for (int64_t i = 0; i < n; i++) acc[i] = acc[i] + bf16_to_f32(b[i]) * w;
    } else {
        const float *f = (const float *)x;
        if (first) for (int64_t i = 0; i < n; i++) acc[i] = f[i] * w;
        else       for (int64_t i = 0; i < n; i++) acc[i] = acc[i] + f[i] * w;
    }
}

/* out (bf16) = round_to_nearest_even(acc); returns the number of non-finite values in acc */
int64_t soup_finish_bf16(const float *acc, uint16_t *out, int64_t n) {
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u; memcpy(&u, &acc[i], 4);
        bad += (u & 0x7f800000u) == 0x7f800000u;
        uint32_t r = u + 0x7fffu + ((u >> 16) & 1u);
        out[i] = ((u & 0x7fffffffu) > 0x7f800000u) ? (uint16_t)0x7fc0u : (uint16_t)(r >> 16);
    }
    return bad;
}

/* returns the number of non-finite values in acc (float32 output needs no cast) */
int64_t soup_count_nonfinite(const float *acc, int64_t n) {
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) { uint32_t u; memcpy(&u, &acc[i], 4); bad += (u & 0x7f800000u) == 0x7f800000u; }
    return bad;
}
"""

_lock = threading.Lock()
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable


def _cache_dir() -> Path:
    import platformdirs

    return Path(os.environ.get("SOUP_KERNEL_DIR") or Path(platformdirs.user_cache_dir("soup")) / "kernels")


def _build() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    flags = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared"]
    tag = hashlib.sha256((SOURCE + cc + " ".join(flags) + os.uname().machine).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"soup_kernel_{tag}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            src, obj = Path(tmp) / "k.c", Path(tmp) / "k.so"
            src.write_text(SOURCE)
            res = subprocess.run([cc, *flags, str(src), "-o", str(obj)], capture_output=True, timeout=120)
            if res.returncode != 0:  # -march=native unknown to this compiler: try without it
                flags.remove("-march=native")
                res = subprocess.run([cc, *flags, str(src), "-o", str(obj)], capture_output=True, timeout=120)
            if res.returncode != 0:
                return None
            os.replace(obj, lib)  # atomic: concurrent builders agree on the result
    dll = ctypes.CDLL(str(lib))
    dll.soup_accumulate.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_float,
                                    ctypes.c_int64, ctypes.c_int]
    dll.soup_accumulate.restype = None
    dll.soup_finish_bf16.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    dll.soup_finish_bf16.restype = ctypes.c_int64
    dll.soup_count_nonfinite.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    dll.soup_count_nonfinite.restype = ctypes.c_int64
    return dll


def load() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None when unavailable or disabled."""
    global _lib
    if os.environ.get("SOUP_NO_KERNEL", "") not in ("", "0"):
        return None
    with _lock:
        if _lib is False:
            try:
                _lib = _build()
            except (OSError, subprocess.SubprocessError):
                _lib = None
        return _lib


_KINDS = {torch.bfloat16: 0, torch.float32: 1}


class FusedMean:
    """The weighted mean of one block through the kernel; ``supports`` says when it applies.

    With ``threads`` > 1 each block is split in contiguous parts computed in parallel (ctypes
    releases the GIL during the call), following torch's intra-op thread count.
    """

    def __init__(self, lib: ctypes.CDLL, threads: int = 1) -> None:
        self.lib = lib
        self.threads = max(1, threads)
        self._pool = None
        if self.threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="soup-kernel")

    @staticmethod
    def supports(in_dtypes, out_dtype: torch.dtype, acc_dtype: torch.dtype, device: torch.device) -> bool:
        return (device.type == "cpu" and acc_dtype == torch.float32 and out_dtype in _KINDS
                and all(d in _KINDS for d in in_dtypes))

    def block(self, pairs, start: int, stop: int, acc: torch.Tensor, out: torch.Tensor | None) -> int:
        """acc[:n] = sum_i x_i[start:stop] * w_i; out[:n] = cast(acc) when given; returns #non-finite."""
        n = stop - start
        if self._pool is None or n < 65536:
            return self._part(pairs, start, stop, acc, out)
        step = -(-n // self.threads)
        cuts = [(a, min(a + step, n)) for a in range(0, n, step)]
        futures = [self._pool.submit(self._part, pairs, start + a, start + b, acc[a:b],
                                     None if out is None else out[a:b]) for a, b in cuts[1:]]
        bad = self._part(pairs, start + cuts[0][0], start + cuts[0][1], acc[: cuts[0][1]],
                         None if out is None else out[: cuts[0][1]])
        return bad + sum(f.result() for f in futures)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _part(self, pairs, start: int, stop: int, acc: torch.Tensor, out: torch.Tensor | None) -> int:
        n = stop - start
        for k, (x, w) in enumerate(pairs):
            xs = x[start:stop]
            self.lib.soup_accumulate(acc.data_ptr(), xs.data_ptr(), _KINDS[x.dtype], w, n, int(k == 0))
        if out is None:
            return self.lib.soup_count_nonfinite(acc.data_ptr(), n)
        return self.lib.soup_finish_bf16(acc.data_ptr(), out.data_ptr(), n)
