"""Dequant-GEMM kernels behind one registry (see :mod:`llmquant.kernels.registry`)."""
from llmquant.kernels.reference import dequant_matmul_ref
from llmquant.kernels.registry import (
    KernelSpec,
    NoKernelError,
    PackedWeight,
    get_kernel,
    kernels,
    register_kernel,
    select_kernel,
)

__all__ = [
    "KernelSpec",
    "NoKernelError",
    "PackedWeight",
    "dequant_matmul_ref",
    "get_kernel",
    "kernels",
    "register_kernel",
    "select_kernel",
]
