"""Quantized layers opened for training, in a form that goes back into the stored format exactly.

:class:`TrainableQuantLinear` holds a :class:`~llmquant.QuantLinear`'s integer codes unpacked and
frozen, and trains its scales. The scale of each (row, group) is ``s = s0 * exp(u)`` with ``u``
trained from 0, so one learning rate means the same *relative* step for every layer, whatever the
size of its weights; the forward rounds ``s`` to float16 (straight-through), so what trains is
exactly what is stored. Zero points stay as they are (they are integers in the format).

With ``train_codes`` each code may move one step up or down from the stored one, and no further:
``q = clamp(q0 + round(d), 0, 2**b - 1)`` with a float offset ``d`` kept in ``[-1, 1]`` (rounding with a
straight-through gradient), starting at 0, so training starts from the stored codes exactly. The offset
is trained by signed gradient descent (:class:`SignDescent`: every offset moves by the learning rate
against its gradient's sign, then is clamped), with a learning rate that bounds how far an offset can
go: a code moves only where its gradient keeps one sign for most steps (AutoRound's form, on a
quantizer's codes instead of a float weight). ``recover`` trains offsets in the block-wise phase
(``train_codes``) and keeps a block's moved codes only where they lower that block's error
(:func:`~llmquant.distill.blockwise.blockwise_phase`); with ``end_to_end_codes`` they also move in the
end-to-end phase, again one step at most from the codes that phase starts from, by signed descent on
the training loss. Free Adam on an unbounded latent was tried
first and had no good setting: at a latent learning rate of 1e-3 not one code moved in a 10-minute run
(smollm2-135m INT3); at 5e-2 in the block-wise phase codes moved by several steps and block errors
doubled (gemma3-270m INT4). The form is also not LSQ's ``round(w / s)``: starting on the grid, that
gives the scale only the rounding residual as gradient (zero at the start), Adam turns that noise into
full-size steps, and the scales drift while the codes stay put. Here the scale keeps the gradient it
has without ``train_codes``.

:meth:`TrainableQuantLinear.to_quant_linear` packs the result back: same scheme, same tensors, new
values; every kernel, the server and the vLLM plugin run it unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmquant.config import LayerQuant
from llmquant.formats.packing import unpack_rows
from llmquant.formats.rotation import rotate, unpack_signs
from llmquant.modules.quant_linear import QuantLinear
from llmquant.modules.walk import set_submodule
from llmquant.quantizers.rtn import expand_groups, make_packed

# float16's largest finite value and smallest normal: a stored scale must lie between them
_FP16_MAX = 65504.0
_FP16_MIN_NORMAL = 2.0 ** -14
#: how far (in quantization steps) a trained code may move from the stored one
CODE_BOUND = 1.0


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


class SignDescent(torch.optim.Optimizer):
    """``p <- clamp(p - lr * sign(grad), -bound, bound)``: every value moves by exactly the learning rate
    (or not at all, where its gradient is 0), so ``lr`` times the number of steps bounds the whole move.
    With ``momentum`` b > 0 the sign is that of the running mean ``m <- b m + (1 - b) grad`` (signSGD with
    momentum, "Signum"): a value then moves steadily only where its gradient has kept one sign on
    average over about 1 / (1 - b) steps, not where single noisy steps happen to agree. Without momentum
    there is no state; weight decay is not supported."""

    def __init__(self, params, lr: float, bound: float = CODE_BOUND, momentum: float = 0.0) -> None:
        if not lr > 0:
            raise ValueError(f"SignDescent: the learning rate must be positive, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SignDescent: momentum must lie in [0, 1), got {momentum}")
        super().__init__(params, {"lr": lr, "bound": bound, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b = group.get("momentum", 0.0)
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if b > 0:
                    st = self.state[p]
                    if "m" not in st:
                        st["m"] = torch.zeros_like(p)
                    d = st["m"].mul_(b).add_(p.grad, alpha=1 - b)
                p.sub_(torch.sign(d), alpha=group["lr"]).clamp_(-group["bound"], group["bound"])
        return None


class TrainableQuantLinear(nn.Module):
    """A QuantLinear whose scales (and optionally codes) train; see the module docstring."""

    def __init__(self, layer: QuantLinear, train_codes: bool = False) -> None:
        super().__init__()
        if layer.compact:
            raise ValueError("the layers' scales are stored compact (compact_qparams), on a fixed 8-bit grid that "
                             "trained scales leave; quantize with compact_qparams off to train the model's scales")
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
        # a rotated layer (llmquant.formats.rotation) keeps its signs and rotates its input
        self.register_buffer("rot_signs", None if layer.rot_signs is None else layer.rot_signs.clone())
        self.log_scale = nn.Parameter(torch.zeros_like(self.scale0))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone(), requires_grad=False)
        self._bias_dtype = None if layer.bias is None else layer.bias.dtype
        #: the code offsets (float32 [N, K], in [-CODE_BOUND, CODE_BOUND]) when codes train, else None
        self.offset = None
        if train_codes:
            self.offset = nn.Parameter(torch.zeros(codes.shape, dtype=torch.float32))

    def _expanded(self, t: torch.Tensor) -> torch.Tensor:
        return expand_groups(t, self.in_features, self.group_size)  # differentiable

    def scales(self) -> torch.Tensor:
        """The current scales as stored (float16 values, float32 tensor) [N, NG], differentiable."""
        return fp16_ste(self.scale0 * torch.exp(self.log_scale))

    def current_codes(self) -> torch.Tensor:
        """Integer codes (float32 [N, K]); with trained codes, differentiable through the rounding."""
        if self.offset is None:
            return self.codes.to(torch.float32)
        return torch.clamp(self.codes.to(torch.float32) + round_ste(self.offset), 0, (1 << self.bits) - 1)

    @torch.no_grad()
    def freeze_codes(self) -> None:
        """Keep the current codes as the stored ones and stop training them (the offset is dropped)."""
        if self.offset is not None:
            self.codes.copy_(self.current_codes().to(torch.uint8))
            self.offset = None

    def reopen_codes(self) -> nn.Parameter:
        """Freeze the current codes (:meth:`freeze_codes`), then let them move again, one step at most from
        these ones: a new offset at 0 (the end-to-end phase after a block-wise one that moved codes)."""
        self.freeze_codes()
        self.offset = nn.Parameter(torch.zeros(self.codes.shape, dtype=torch.float32))
        return self.offset

    def weight(self) -> torch.Tensor:
        """The dequantized weight [N, K] in stored column order (the format's formula)."""
        s = self._expanded(self.scales())
        return (self.current_codes() - self._expanded(self.zero)) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"TrainableQuantLinear: input has {x.shape[-1]} features, expected K={self.in_features}")
        if self.rot_signs is not None:
            x = rotate(x, unpack_signs(self.rot_signs, self.in_features).to(x.device))
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
        return QuantLinear.from_packed(packed, bias, sym=self.sym, act_int8=self.act_int8, rot_signs=self.rot_signs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, train_codes={self.offset is not None}")


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
