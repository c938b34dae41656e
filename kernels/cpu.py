"""The fused CPU dequant-GEMM kernel (name ``"cpu"``): INT2/3/4/8 weights, fp32 or bf16 activations.

A layer's weights stay 4-bit (or 8-bit) in memory; the native code (``kernels/csrc``) dequantizes
them in registers and never materializes a float weight matrix:

* GEMV (decode; M <= 32 with fp32 math, M <= 4 with bf16 activations): streams the weights once,
  4 output rows at a time, looking codes up in a per-(row, group) table of dequantized values
  (scale and zero point folded in), fp32 FMA, 4 rows of x per pass over an L1-resident tile.
  Exact: the same fp32 weights as the reference, fp32 sums. bf16 activations are widened to fp32.
  With fp32 activations at M = 1 (decode) on CPUs with AVX512-VNNI, 4-bit layers whose groups are
  multiples of 128 columns (or one group per row) run on integer dot products instead: x is held
  as 24-bit block floating point (one exponent per 8 columns; every value within 2**-22 of its 8's
  largest), the products with the codes and their sums are exact integers, two roundings per
  128 columns. As accurate as the FMA path against a float64 product (tests), at the bf16 GEMV's
  speed; ``LLMQUANT_CPU_FP32_GEMV=fma`` keeps the FMA GEMV. NaN or infinite x take the FMA GEMV.
* GEMM (prefill, batches): blocks of 32 output rows x 1024-2048 columns are dequantized into an
  L2-resident buffer and multiplied by every row of x; fp32 FMA for fp32 activations (exact
  weights); for bf16 activations on AVX512-BF16 CPUs the buffer holds bf16 weights (rounded once,
  like a bf16 model's) and vdpbf16ps does the products, with fp32 sums. fp32 activations take the
  bf16 route too when the user allows it with ``torch.set_float32_matmul_precision("medium")``.

Threads split N; at most ``torch.get_num_threads()`` of them, fewer for small layers (a thread's
share must be worth waking it). They are torch's own OpenMP threads (the library is handed the entry
points of the runtime torch loaded), so a model's quantized layers and its torch operators share
one team instead of two pools competing for the cores; ``LLMQUANT_CPU_THREADS=pool`` selects the
library's own pthread pool. Act-order layers gather x by ``perm`` first (one ``index_select``),
then run like any other layer.

The op is ``torch.ops.llmquant.cpu_qlinear`` with a fake implementation, so ``torch.compile``
traces through it; eager calls skip the dispatcher and call the library directly (the same
function, without the custom-op overhead of about 15 us, which a decode step would pay for every
linear layer). Run a model once eagerly before ``torch.compile``: the first call of each
``QuantLinear`` selects the kernel and derives this layout, which must happen outside the graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from llmquant.kernels import cpu_native
from llmquant.formats.packing import pack_rows
from llmquant.formats.rotation import rotate
from llmquant.kernels.cpu_layout import CpuLayout, repack, unpack_codes
from llmquant.kernels.registry import KernelSpec, PackedWeight

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


def _native() -> cpu_native.Native:
    native, why = cpu_native.load()
    if native is None:
        raise RuntimeError(why)
    return native


def rotate_input(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``x diag(d) B`` (:func:`llmquant.formats.rotation.rotate`) for a rotated layer's input, in x's
    dtype: the native library's butterflies for CPU tensors (no small-GEMM call overhead), else torch."""
    native = cpu_native.load()[0] if x.device.type == "cpu" and d.device.type == "cpu" else None
    if native is None or torch.compiler.is_compiling() or x.requires_grad:
        return rotate(x, d)
    y = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    native.hadamard128(y, d if d.dtype == torch.float32 and d.is_contiguous() else d.to(torch.float32).contiguous())
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _flags(act_int8: bool) -> int:
    medium = torch.get_float32_matmul_precision() == "medium"
    return ((cpu_native.FLAG_F32_VIA_BF16 if medium else 0) | cpu_native.fp32_gemv_flags()
            | (cpu_native.FLAG_A8 if act_int8 else 0))


def _linear_2d(x: torch.Tensor, w: CpuLayout, bias: torch.Tensor | None, isa: int, act_int8: bool = False
               ) -> torch.Tensor:
    """x [M, K] (gathered, any strides) -> [M, N]; w already checked by CpuLayout."""
    # x: fp32/bf16 [M, K]; qdata: uint8 [ntiles, tile_bytes(Kp, bits)]; scales: fp16 [ntiles, NG, 4]
    if x.dim() != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"x must be [M, K={w.in_features}], got {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x must be float32 or bfloat16, got {x.dtype}")
    if x.device.type != "cpu":
        raise ValueError(f"x is on {x.device}; the CPU kernel needs CPU tensors")
    n = w.out_features
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must be [N={n}], got {tuple(bias.shape)}")
        bias = bias.to(torch.float32).contiguous()
    x = x.contiguous()
    y = torch.empty(x.shape[0], n, dtype=x.dtype)
    if x.shape[0]:
        isa = isa if isa >= 0 else cpu_native.requested_isa()
        _native().linear(w.native, x, bias, y, torch.get_num_threads(), isa, _flags(act_int8))
    return y


@torch.library.custom_op("llmquant::cpu_qlinear", mutates_args=(), device_types="cpu")
def cpu_qlinear(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    bits: int,
    out_features: int,
    group_size: int,
    isa: int,
    act_int8: bool = False,
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W.T + bias, W in the CPU layout (:mod:`llmquant.kernels.cpu_layout`).

    x: fp32 or bf16 [M, K] (already gathered by an act-order perm); qdata, scales, zeros: a
    :class:`CpuLayout`'s tensors; bias: any float dtype [N] or None; bits: the stored width
    (2, 3, 4, 8); group_size: G or -1; isa: index into ``cpu_native.ISA_NAMES`` to cap the
    instruction set, -1 for the best available (or ``LLMQUANT_CPU_ISA``); act_int8: dynamic INT8
    activations (:mod:`llmquant.kernels.act_int8`). Returns x.dtype [M, N].
    """
    w = CpuLayout(qdata, scales, zeros, None, bits, x.shape[-1], out_features, group_size)
    return _linear_2d(x, w, bias, isa, act_int8)


@cpu_qlinear.register_fake
def _(x, qdata, scales, zeros, bias, bits, out_features, group_size, isa, act_int8=False):
    if x.dim() != 2 or x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x must be float32 or bfloat16 [M, K], got {x.dtype} {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must be [N={out_features}], got {tuple(bias.shape)}")
    return x.new_empty((x.shape[0], out_features))


def cpu_linear(x: torch.Tensor, w: CpuLayout, bias: torch.Tensor | None = None, isa: str | None = None,
               act_int8: bool = False) -> torch.Tensor:
    """y [..., N] = x[..., perm] @ W.T + bias for x [..., K] (fp32 or bf16), in x's dtype.

    ``isa`` caps the instruction set (``cpu_native.ISA_NAMES``); default: the best available, or
    ``LLMQUANT_CPU_ISA``. ``act_int8``: dynamic INT8 activations where the layer allows them
    (:mod:`llmquant.kernels.act_int8` defines them exactly)."""
    k, n = w.in_features, w.out_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}), the layer expects K={k}")
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    if w.perm is not None:
        x2 = x2.index_select(1, w.perm)
    isa_i = -1 if isa is None else cpu_native.isa_index(isa)
    if torch.compiler.is_compiling():
        y = cpu_qlinear(x2, w.qdata, w.scales, w.zeros, bias, w.bits, n, w.group_size, isa_i, act_int8)
    else:
        y = _linear_2d(x2, w, bias, isa_i, act_int8)
    return y if x.dim() == 2 else y.view(*lead, n)


def cpu_dequantize(w: CpuLayout, dtype: torch.dtype = torch.float32, isa: str | None = None) -> torch.Tensor:
    """The weight [N, K] as the kernels see it (natural column order): fp32 exactly dequantized, or
    bf16 as the bf16 GEMM rounds it. For tests and debugging."""
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    out = torch.empty(w.out_features, w.in_features, dtype=dtype)
    _native().dequantize(w.native, out, cpu_native.requested_isa() if isa is None else cpu_native.isa_index(isa))
    return out


@dataclass
class CpuState:
    layout: CpuLayout
    act_int8: bool = False


class CpuKernel:
    name = "cpu"

    def can_implement(self, spec: KernelSpec) -> tuple[bool, str]:
        why = []
        if spec.device_type != "cpu":
            why.append(f"device {spec.device_type!r} is not the CPU")
        if spec.dtype not in SUPPORTED_DTYPES:
            why.append(f"activation dtype {spec.dtype} not supported (float32, bfloat16)")
        if spec.bits not in SUPPORTED_BITS:
            why.append(f"bits={spec.bits} not supported {SUPPORTED_BITS}")
        if spec.in_features < 1 or spec.out_features < 1:
            why.append(f"empty layer: N={spec.out_features}, K={spec.in_features}")
        native, reason = cpu_native.load()
        if native is None:
            why.append(reason)
        return not why, "; ".join(why)

    def prepare(self, w: PackedWeight, act_int8: bool = False) -> CpuState:
        return CpuState(repack(w), act_int8)

    def apply(self, state: CpuState, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return cpu_linear(x, state.layout, bias, act_int8=state.act_int8)

    def unpack_qweight(self, state: CpuState) -> torch.Tensor:
        """The stored ``qweight`` back from the layout, exactly: the module need not keep both."""
        return pack_rows(unpack_codes(state.layout).to(torch.int64), state.layout.bits)

    def describe(self, state: CpuState) -> str:
        native, _ = cpu_native.load()
        return f"cpu ({native.isa if native else '?'}{', int8 activations' if state.act_int8 else ''})"
