"""Quantization-aware training for any training loop: fake quantization on llmquant's exact grid.

    from llmquant import QuantConfig, quantize
    from llmquant.distill.qat import prepare_qat

    config = QuantConfig(method="rtn", bits=4, group_size=128)
    prepare_qat(model, config)         # nn.Linear layers the config selects -> FakeQuantLinear
    ...train model with any loop...    # forward sees quantized weights; gradients reach the floats
    quantize(model, config)            # the stored codes give the fake-quantized model's outputs

A :class:`FakeQuantLinear` *is* an ``nn.Linear`` (same ``weight`` parameter, same state-dict keys)
whose forward uses the weight rounded to its scheme's grid: per (row, group) the scale and zero point
of :func:`llmquant.quantizers.rtn.group_qparams`, scales rounded to float16, codes
``clamp(round(w / s) + z, 0, 2**b - 1)``. The gradient passes the rounding unchanged (straight-through
estimator). Because the grid is the one the ``rtn`` method uses, quantizing the trained model with the
same config reproduces the fake-quantized weights exactly, so its outputs match up to the order of
floating-point sums in the kernel. That is why only ``rtn`` without the clipping search is accepted:
GPTQ and the clip search would pick other weights than the ones training saw.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmquant.config import LayerQuant, QuantConfig
from llmquant.modules.walk import find_linear_layers, set_submodule
from llmquant.quantizers.rtn import expand_groups, group_qparams
from llmquant.quantizers.grid import fake_quantize


def fake_quantize_weight(w: torch.Tensor, scheme: LayerQuant) -> torch.Tensor:
    """``w`` [N, K] rounded to ``scheme``'s grid (what ``rtn`` stores), with an identity gradient."""
    n, k = w.shape
    with torch.no_grad():
        scale, zero = group_qparams(w.detach(), scheme)
        wq = fake_quantize(w.detach(), expand_groups(scale, k, scheme.group_size),
                           expand_groups(zero, k, scheme.group_size), scheme.bits)
    return w + (wq.to(w.dtype) - w).detach()


class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` that computes with its weight fake-quantized to ``scheme``."""

    def __init__(self, linear: nn.Linear, scheme: LayerQuant) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter: optimizers built before or after both work
        self.bias = linear.bias
        self.scheme = scheme

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize_weight(self.weight, self.scheme), self.bias)

    def extra_repr(self) -> str:
        s = self.scheme
        return f"{super().extra_repr()}, bits={s.bits}, group_size={s.group_size}, sym={s.sym}"


def check_qat_config(config: QuantConfig) -> None:
    if config.method != "rtn" or config.clip_search:
        raise ValueError(
            f"QAT trains against the round-to-nearest grid, so it converts with method='rtn' and clip_search=False "
            f"(got method={config.method!r}, clip_search={config.clip_search}); GPTQ or the clip search would store "
            "other weights than the ones training saw")
    if config.rotation is not None:
        raise ValueError(f"QAT does not train rotated layers (rotation={config.rotation!r}) yet: its fake quantization "
                         "rounds the unrotated weight")
    if config.target_bpw is not None or config.max_size is not None or config.max_latency is not None:
        raise ValueError("QAT needs fixed per-layer schemes; a budget (target_bpw/max_size/max_latency) chooses them "
                         "from data: quantize once with the budget and pin its schemes as overrides")


def prepare_qat(model: nn.Module, config: QuantConfig) -> int:
    """Swap the ``nn.Linear`` layers ``config`` selects for :class:`FakeQuantLinear`; returns how many."""
    check_qat_config(config)
    todo = []
    for name, mod in find_linear_layers(model):
        scheme = config.resolve(name)
        if scheme is None or isinstance(mod, FakeQuantLinear):
            continue
        if type(mod) is not nn.Linear:
            raise ValueError(f"{name}: QAT supports nn.Linear layers, not {type(mod).__name__}")
        todo.append((name, mod, scheme))
    if not todo:
        raise ValueError("the quantization config selects none of the model's nn.Linear layers")
    for name, mod, scheme in todo:
        set_submodule(model, name, FakeQuantLinear(mod, scheme))
    return len(todo)
