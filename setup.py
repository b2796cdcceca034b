"""Builds soup's optional C kernel (soup/engine/_kernel.c -> soup/engine/_kernel*.so); the rest is in pyproject.toml.

The kernel is optional: when it cannot be built (no C compiler, no working toolchain) the install
goes on with a warning and soup uses torch ops instead (see soup/engine/kernel.py). No -march flag: the
library picks AVX2 / AVX-512 code at run time from what the CPU reports, so a build is portable.
"""

from __future__ import annotations

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# -ffp-contract=off: a fused multiply-add would round differently from torch's separate mul and add
GCC_FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fvisibility=hidden"]
MSVC_FLAGS = ["/O2", "/fp:precise"]


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing when the kernel cannot be compiled."""

    def run(self) -> None:
        # a missing or broken toolchain fails in many ways (no compiler, no MSVC, no headers): none stops
        # the install; build_extension and copy_extensions_to_source both run inside run()
        try:
            super().run()
        except Exception as e:  # noqa: BLE001
            self._skip(e)

    def build_extension(self, ext: Extension) -> None:
        ext.extra_compile_args = MSVC_FLAGS if self.compiler.compiler_type == "msvc" else GCC_FLAGS
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            self._skip(e)

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return []  # the C functions export themselves; PyInit__kernel exists only with Python's headers

    @staticmethod
    def _skip(e: Exception) -> None:
        print(f"WARNING: soup's optional C kernel was not built ({type(e).__name__}: {e}); "
              "soup will use torch ops for the weighted mean (same results, slower)", file=sys.stderr)


setup(
    ext_modules=[Extension("soup.engine._kernel", sources=["soup/engine/_kernel.c"], optional=True)],
    cmdclass={"build_ext": OptionalBuildExt},
)
