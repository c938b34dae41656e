"""Registers the kernels that ship with llmquant, in priority order."""
from llmquant.kernels.reference import ReferenceKernel
from llmquant.kernels.registry import register_kernel

register_kernel(ReferenceKernel(), priority=0)
