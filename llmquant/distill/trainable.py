"""Quantized layers opened for training, in a form that goes back into the stored format exactly.

:class:`TrainableQuantLinear` holds a :class:`~llmquant.QuantLinear`'s integer codes unpacked and
frozen, and trains its scales. The scale of each (row, group) is ``s = s0 * exp(u)`` with ``u``
trained from 0, so one learning rate means the same *relative* step for every layer, whatever the
size of its weights; the forward rounds ``s`` to float16 (straight-through), so what trains is
exactly what is stored. Zero points stay as they are (they are integers in the format).

With ``train_codes`` the codes are re-derived each forward from a float latent in units of the
quantization step, ``q = clamp(round(v), 0, 2**b - 1)``, rounding with a straight-through gradient;
``v`` starts at the stored codes, so training starts from them exactly, and its learning rate reads as
a fraction of a step, the same for every layer. The latent is deliberately not a weight divided by
the current scale (LSQ's ``round(w / s)``): starting on the grid, that form gives the scale only the
rounding residual as gradient (zero at the start), Adam turns that noise into full-size steps, and
the scales drift while the codes stay put (measured in the block-wise phase on smollm2-135m INT3:
block errors rose instead of falling, at latent learning rates 5e-6 and 5e-5). Here the scale keeps
the gradient it has without ``train_codes``.

:meth:`TrainableQuantLinear.to_quant_linear` packs the result back: same scheme, same tensors, new
values; every kernel, the server and the vLLM plugin run it unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmquant.config import LayerQuant
from llmquant.formats.packing import unpack_rows
from llmquant.modules.quant_linear import QuantLinear
from llmquant.modules.walk import set_submodule
from llmquant.quantizers.rtn import expand_groups, make_packed

# float16's largest finite value and smallest normal: a stored scale must lie between them
_FP16_MAX = 65504.0
_FP16_MIN_NORMAL = 2.0 ** -14


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (ties to even, like the quantizers) with the identity as gradient."""
    return _RoundSTE.apply(x)


def fp16_ste(s: torch.Tensor) -> torch.Tensor:
    """``s`` rounded to float16 (clamped to its normal range) in the forward, identity gradient."""
    stored = s.detach().clamp(_FP16_MIN_NORMAL, _FP16_MAX).to(torch.float16).to(s.dtype)
    return s + (stored - s.detach())


class TrainableQuantLinear(nn.Module):
    """A QuantLinear whose scales (and optionally codes) train; see the module docstring."""

    def __init__(self, layer: QuantLinear, train_codes: bool = False) -> None:
        super().__init__()
        w = layer.packed()
        # codes: uint8 [N, K] (stored column order); scale0, zero: float32 [N, NG]
        self.bits, self.group_size = w.bits, w.group_size
        self.in_features, self.out_features = w.in_features, w.out_features
        self.sym = w.zeros is None
        self.act_int8 = layer.act_int8
        k = w.in_features
        codes = unpack_rows(w.qweight, w.bits, k)
        self.register_buffer("codes", codes.to(torch.uint8))
        self.register_buffer("scale0", w.scales.to(torch.float32).clone())
        zero = (torch.full_like(self.scale0, float(1 << (w.bits - 1))) if self.sym else w.zeros.to(torch.float32))
        self.register_buffer("zero", zero.clone())
        self.register_buffer("perm", None if w.perm is None else w.perm.to(torch.long).clone())
        self.log_scale = nn.Parameter(torch.zeros_like(self.scale0))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone(), requires_grad=False)
        self._bias_dtype = None if layer.bias is None else layer.bias.dtype
        self.latent = None
        if train_codes:
            self.latent = nn.Parameter(codes.to(torch.float32))

    def _expanded(self, t: torch.Tensor) -> torch.Tensor:
        return expand_groups(t, self.in_features, self.group_size)  # differentiable

    def scales(self) -> torch.Tensor:
        """The current scales as stored (float16 values, float32 tensor) [N, NG], differentiable."""
        return fp16_ste(self.scale0 * torch.exp(self.log_scale))

    def current_codes(self) -> torch.Tensor:
        """Integer codes (float32 [N, K]); with trained codes, differentiable through the rounding."""
        if self.latent is None:
            return self.codes.to(torch.float32)
        return torch.clamp(round_ste(self.latent), 0, (1 << self.bits) - 1)

    def weight(self) -> torch.Tensor:
        """The dequantized weight [N, K] in stored column order (the format's formula)."""
        s = self._expanded(self.scales())
        return (self.current_codes() - self._expanded(self.zero)) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"TrainableQuantLinear: input has {x.shape[-1]} features, expected K={self.in_features}")
        if self.perm is not None:
            x = x[..., self.perm]
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight().to(x.dtype), bias)

    @torch.no_grad()
    def to_quant_linear(self) -> QuantLinear:
        """The trained layer in the stored format."""
        scales = self.scales()
        codes = self.current_codes()
        packed = make_packed(codes, scales, self.zero, LayerQuant(self.bits, self.group_size, self.sym), self.perm)
        bias = None if self.bias is None else self.bias.to(self._bias_dtype)
        return QuantLinear.from_packed(packed, bias, sym=self.sym, act_int8=self.act_int8)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, train_codes={self.latent is not None}")


def open_for_training(model: nn.Module, train_codes: bool = False) -> int:
    """Replace every QuantLinear of ``model`` by a :class:`TrainableQuantLinear`; returns how many. A
    quantized embedding table (QuantEmbedding, and a head sharing it) stays as it is, frozen."""
    from llmquant.modules.quant_embedding import QuantEmbedding

    todo = [(name, mod) for name, mod in model.named_modules()
            if isinstance(mod, QuantLinear) and not isinstance(mod, QuantEmbedding)]
    if not todo:
        raise ValueError("the model has no quantized layers (QuantLinear) to train")
    for name, mod in todo:
        set_submodule(model, name, TrainableQuantLinear(mod, train_codes=train_codes))
    return len(todo)


def close_after_training(model: nn.Module) -> int:
    """Put every TrainableQuantLinear back as a QuantLinear holding the trained values; returns how many."""
    todo = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, TrainableQuantLinear)]
    for name, mod in todo:
        set_submodule(model, name, mod.to_quant_linear())
    return len(todo)
