"""The ``llmquant`` quantization config as vLLM sees it: which layers are quantized, and how."""
from __future__ import annotations

import os
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

from llmquant.config import LayerQuant, QuantConfig
from llmquant.serving.vllm import QUANT_METHOD


class LlmQuantVllmConfig(QuantizationConfig):
    """Wraps the checkpoint's :class:`~llmquant.config.QuantConfig` (its ``quantization_config``)."""

    def __init__(self, quant: QuantConfig) -> None:
        super().__init__()
        self.quant = quant
        self.has_perm = quant.stores_perm
        #: dynamic INT8 activations: the checkpoint's default, or LLMQUANT_ACTIVATIONS
        env = os.environ.get("LLMQUANT_ACTIVATIONS", "").strip()
        self.act_int8 = (env or quant.activations) == "dynamic_int8"
        #: kernel names already announced in the log (per engine, not per layer)
        self.kernels_logged: set[str] = set()

    def __repr__(self) -> str:
        return f"LlmQuantVllmConfig({self.quant!r})"

    # --- what vLLM asks of every quantization config ---------------------------------------------
    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        # the kernel registry picks per dtype; the reference kernel runs all three
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # the reference kernel runs on any device; faster kernels refuse what they cannot run
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the config lives in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LlmQuantVllmConfig:
        return cls(QuantConfig.from_dict(config))  # QuantConfigError (a ValueError) names what is wrong

    # --- per-layer resolution ---------------------------------------------------------------------
    def resolve(self, prefix: str) -> LayerQuant | None:
        """The scheme of the vLLM layer ``prefix``; a fused layer resolves through its parts.

        ``packed_modules_mapping`` (set by vLLM from the model class, e.g. ``qkv_proj -> [q_proj,
        k_proj, v_proj]``) names the parts, which the checkpoint stores separately. They share one
        set of tensors in vLLM, so they must share one scheme (or all stay float).
        """
        head, _, last = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(last)
        if not parts:
            return self.quant.resolve(prefix)
        names = [f"{head}.{p}" if head else p for p in parts]
        schemes = [self.quant.resolve(n) for n in names]
        if any(s != schemes[0] for s in schemes[1:]):
            detail = ", ".join(f"{n}: {s}" for n, s in zip(names, schemes))
            raise ValueError(
                f"vLLM fuses {names} into {prefix}, but the llmquant config gives them different schemes "
                f"({detail}); the vLLM plugin needs one scheme per fused layer"
            )
        return schemes[0]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from llmquant.serving.vllm.linear import LlmQuantEmbeddingMethod, LlmQuantLinearMethod

        if isinstance(layer, ParallelLMHead):
            # vLLM computes logits with lm_head.quant_method.apply, so a quantized head is one more
            # linear layer (N = padded vocabulary); None keeps vLLM's float head.
            scheme = self.resolve(prefix)
            return None if scheme is None else LlmQuantLinearMethod(self, scheme)
        if isinstance(layer, LinearBase):
            scheme = self.resolve(prefix)
            if scheme is None:
                return UnquantizedLinearMethod()
            return LlmQuantLinearMethod(self, scheme)
        if isinstance(layer, VocabParallelEmbedding) and self.quant.quantize_embedding:
            # vLLM's Llama family builds embed_tokens without a prefix: its checkpoint name is model.embed_tokens
            scheme = self.quant.resolve(prefix or "model.embed_tokens")
            return None if scheme is None else LlmQuantEmbeddingMethod(self, scheme)
        # a float embedding (vLLM's own method), MoE experts, attention
        return None
