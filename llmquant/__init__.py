"""llmquant: make large language models small and fast without making them stupid.

``import llmquant`` registers the ``llmquant`` quantization method with transformers, so that
``AutoModelForCausalLM.from_pretrained`` loads llmquant checkpoints and quantizes on the fly.
"""
from llmquant.api import quantize
from llmquant.checkpoint import save_quantized
from llmquant.config import LayerQuant, QuantConfig, QuantConfigError
from llmquant.hf.integration import LlmQuantConfig, register as _register_with_transformers
from llmquant.modules.quant_linear import CheckpointError, QuantLinear
from llmquant.registry import method_names
from llmquant import prune as _prune  # noqa: F401,E402  (registers the pruning methods)

# The one intended import-time effect: transformers learns the "llmquant" quantization method.
_register_with_transformers()

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "LayerQuant",
    "LlmQuantConfig",
    "QuantConfig",
    "QuantConfigError",
    "QuantLinear",
    "method_names",
    "quantize",
    "save_quantized",
]
