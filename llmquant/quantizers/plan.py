"""Which linear layers of a model a config quantizes, and the model-level steps every method shares."""
from __future__ import annotations

from torch import nn

from llmquant.config import LayerQuant, QuantConfig
from llmquant.kernels.registry import PackedWeight
from llmquant.modules.quant_linear import QuantLinear
from llmquant.modules.walk import find_linear_layers, linear_weight


def plan(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Module, LayerQuant]]:
    """The linear layers to quantize and their resolved schemes, in model order."""
    out = []
    for name, mod in find_linear_layers(model):
        scheme = config.resolve(name)
        if scheme is not None:
            out.append((name, mod, scheme))
    return out


def check_plan(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Module, LayerQuant]]:
    """:func:`plan`, refusing a model where the config quantizes nothing (before anything changes)."""
    todo = plan(model, config)
    if not todo:
        n = sum(1 for _ in find_linear_layers(model))
        raise ValueError(
            f"the quantization config selects none of the model's {n} linear layers "
            f"(skip={list(config.skip)}, overrides={list(config.overrides)})"
        )
    return todo


def to_quant_linear(mod: nn.Module, packed: PackedWeight, config: QuantConfig) -> QuantLinear:
    bias = mod.bias.detach() if getattr(mod, "bias", None) is not None else None
    return QuantLinear.from_packed(packed, bias, act_int8=config.activations == "dynamic_int8")


def untie_if_quantizing_head(model: nn.Module, config: QuantConfig) -> None:
    """A tied output layer that gets quantized must stop sharing the embedding's float weight.

    Only models with a transformers-style ``config.tie_word_embeddings`` and ``lm_head`` are affected;
    any other module is left as it is.
    """
    cfg = getattr(model, "config", None)
    if cfg is None or not getattr(cfg, "tie_word_embeddings", False):
        return
    head = getattr(model, "lm_head", None)
    if head is None or config.resolve("lm_head") is None:
        return
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    cfg.tie_word_embeddings = False
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else None
    if text_cfg is not None and text_cfg is not cfg:
        text_cfg.tie_word_embeddings = False


def dense_weight_check(name: str, mod: nn.Module) -> None:
    """A layer to quantize must hold a real float weight (not meta, not already quantized)."""
    w = linear_weight(mod)
    if w.is_meta:
        raise ValueError(f"{name}: the weight is on the meta device (load the model's weights first)")
    if not w.is_floating_point():
        raise ValueError(f"{name}: weight dtype {w.dtype} is not a float type")
