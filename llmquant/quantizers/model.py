"""Model-level quantization: find the linear layers of any transformers model and replace them
with :class:`~llmquant.modules.quant_linear.QuantLinear`."""
from __future__ import annotations

import logging
import time
from typing import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from llmquant.config import LayerQuant, QuantConfig
from llmquant.kernels.registry import PackedWeight
from llmquant.modules.quant_linear import QuantLinear

logger = logging.getLogger(__name__)


def _is_conv1d(mod: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D: weight [K, N], y = x @ W + b
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and hasattr(mod, "weight")


def is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or _is_conv1d(mod)


def linear_weight(mod: nn.Module) -> torch.Tensor:
    """The weight as [N, K] (out_features, in_features), whatever the module type."""
    return mod.weight.t() if _is_conv1d(mod) else mod.weight


def find_linear_layers(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    for name, mod in model.named_modules(prefix=prefix):
        if is_linear(mod):
            yield name, mod


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def to_quant_linear(mod: nn.Module, packed: PackedWeight) -> QuantLinear:
    bias = mod.bias.detach() if getattr(mod, "bias", None) is not None else None
    return QuantLinear.from_packed(packed, bias)


def untie_if_quantizing_head(model: nn.Module, config: QuantConfig) -> None:
    """A tied output layer that gets quantized must stop sharing the embedding's float weight."""
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


def plan(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Module, LayerQuant]]:
    """The linear layers to quantize and their resolved schemes, in model order."""
    out = []
    for name, mod in find_linear_layers(model):
        scheme = config.resolve(name)
        if scheme is not None:
            out.append((name, mod, scheme))
    return out


def quantize_rtn(model: nn.Module, config: QuantConfig, progress: bool = True) -> dict:
    from llmquant.quantizers.rtn import quantize_weight_rtn

    untie_if_quantizing_head(model, config)
    todo = plan(model, config)
    t0 = time.perf_counter()
    for name, mod, scheme in tqdm(todo, desc="RTN quantize", disable=not progress, unit="layer"):
        w = linear_weight(mod).detach()
        try:
            packed = quantize_weight_rtn(w, scheme, clip=config.clip_search)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        set_submodule(model, name, to_quant_linear(mod, packed))
    return {"method": "rtn", "layers": len(todo), "seconds": time.perf_counter() - t0}


def quantize(
    model: nn.Module,
    config: QuantConfig,
    calibration: Iterable[torch.Tensor] | None = None,
    progress: bool = True,
) -> dict:
    """Quantize ``model`` in place according to ``config``; returns a summary dict.

    ``calibration`` (token id tensors [1, T] or [B, T]) is needed by data-aware methods (GPTQ).
    The model's config gets a ``quantization_config`` so that ``save_pretrained`` and
    :func:`llmquant.save_quantized` write a loadable checkpoint.
    """
    if config.method == "rtn":
        summary = quantize_rtn(model, config, progress=progress)
    elif config.method == "gptq":
        from llmquant.quantizers.gptq_model import quantize_gptq

        if calibration is None:
            raise ValueError("GPTQ needs calibration data: pass calibration=... (see llmquant.calibration)")
        summary = quantize_gptq(model, config, calibration, progress=progress)
    else:  # QuantConfig validates method, so this is a programming error
        raise AssertionError(config.method)
    from llmquant.hf.integration import attach_quantization_config

    attach_quantization_config(model, config)
    return summary
