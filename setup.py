"""Builds the native CPU kernel library (kernels/csrc) during ``pip install``.

Everything else about the package lives in pyproject.toml. The library is a plain C shared object
with a C ABI, loaded with ctypes by ``llmquant.kernels.cpu_native``: it includes no Python or torch
headers, so pip's isolated build never needs torch. It is compiled for the baseline x86-64 (or
whatever the target is) with no ``-march=native``; the AVX2 and AVX-512 kernels (and on AArch64 the
NEON dot-product ones) carry their own target attributes and are chosen at run time from the CPU's
features.

The extension is optional: without a C compiler the install still succeeds, and the kernel
registry falls back to the pure-torch reference kernel (with one logged warning). A compiler that
rejects the x86 vector code (one too old for AVX512-BF16, say) gets a second try with the portable
kernels only (``-DLQ_PORTABLE_ONLY``).
"""
import logging

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools.errors import CompileError
except ImportError:  # setuptools < 59
    from distutils.errors import CompileError

SOURCES = [
    "kernels/csrc/lq_api.c",
    "kernels/csrc/lq_driver.c",
    "kernels/csrc/lq_pool.c",
    "kernels/csrc/lq_scalar.c",
    "kernels/csrc/lq_avx2.c",
    "kernels/csrc/lq_avx2_vnni.c",
    "kernels/csrc/lq_avx512.c",
    "kernels/csrc/lq_avx512_bf16.c",
    "kernels/csrc/lq_avx512_vnni.c",
    "kernels/csrc/lq_neon.c",
]


class BuildNative(build_ext):
    """gcc/clang flags; the library exports only the functions marked LQ_API."""

    def build_extensions(self):
        if self.compiler.compiler_type == "unix":
            for ext in self.extensions:
                ext.extra_compile_args = ["-O3", "-std=gnu11", "-fvisibility=hidden", "-pthread", "-Wall"]
                ext.extra_link_args = ["-pthread"]
        super().build_extensions()

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except CompileError as e:
            logging.getLogger(__name__).warning("%s: %s; retrying with the portable kernels only", ext.name, e)
            ext.define_macros = list(ext.define_macros or []) + [("LQ_PORTABLE_ONLY", "1")]
            super().build_extension(ext)


setup(
    ext_modules=[
        Extension(
            "llmquant.kernels._lqcpu",
            sources=SOURCES,
            depends=["kernels/csrc/lq_cpu.h", "kernels/csrc/lq_x86_inl.h", "kernels/csrc/lq_avx512_inl.h"],
            optional=True,
            libraries=["m"],
        )
    ],
    cmdclass={"build_ext": BuildNative},
)
