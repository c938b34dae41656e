"""Registers the kernels that ship with llmquant, in priority order."""
from llmquant.kernels.cpu import CpuKernel
from llmquant.kernels.reference import ReferenceKernel
from llmquant.kernels.registry import register_kernel
from llmquant.kernels.triton_w4a16 import TritonKernel

register_kernel(ReferenceKernel(), priority=0)
register_kernel(CpuKernel(), priority=50)  # CPU, fp32/bf16 activations (native library)
register_kernel(TritonKernel(), priority=100)  # CUDA only (or the CPU interpreter for tests)
