"""The reference kernel: dequantize the whole weight to float, then ``F.linear``.

Slow and memory-hungry by design (it materializes W), but obviously correct: every fused kernel is
tested against :func:`dequant_matmul_ref`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmquant.formats.packing import dequantize_packed
from llmquant.kernels import act_int8 as act_int8_mod
from llmquant.kernels.registry import KernelSpec, PackedWeight


def dequant_matmul_ref(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None,
                       act_int8: bool = False) -> torch.Tensor:
    """y = x[..., perm] @ dequant(W).T + bias, computed in float32 and returned in x.dtype.

    x: float [..., K]; returns [..., N]. ``act_int8``: x quantized as the CPU kernel's dynamic INT8
    activations do it (:mod:`llmquant.kernels.act_int8`), where they apply to the layer.
    """
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the layer expects K={w.in_features}")
    wf = dequantize_packed(
        w.qweight, w.scales, w.zeros, bits=w.bits, group_size=w.group_size, in_features=w.in_features
    )
    xf = x.to(torch.float32)
    if w.perm is not None:
        xf = xf.index_select(-1, w.perm.to(torch.long))
    if act_int8 and act_int8_mod.applies(w.bits, w.group_size, w.in_features):
        xf = act_int8_mod.quantize_x(xf, code_bits=w.bits)
    y = F.linear(xf, wf, None if bias is None else bias.to(torch.float32))
    return y.to(x.dtype)


class ReferenceKernel:
    name = "reference"

    def can_implement(self, spec: KernelSpec) -> tuple[bool, str]:
        return True, ""

    def prepare(self, w: PackedWeight, act_int8: bool = False) -> tuple[PackedWeight, bool]:
        return w, act_int8

    def apply(self, state: tuple[PackedWeight, bool], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w, act_int8 = state
        return dequant_matmul_ref(x, w, bias, act_int8=act_int8)
