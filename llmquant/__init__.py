"""llmquant: make large language models small and fast without making them stupid.

``import llmquant`` registers the ``llmquant`` quantization method with transformers, so that
``AutoModelForCausalLM.from_pretrained`` loads llmquant checkpoints and quantizes on the fly.
"""
from llmquant.config import LayerQuant, QuantConfig, QuantConfigError
from llmquant.modules.quant_linear import CheckpointError, QuantLinear
from llmquant.quantizers.model import quantize

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "LayerQuant",
    "QuantConfig",
    "QuantConfigError",
    "QuantLinear",
    "quantize",
]
