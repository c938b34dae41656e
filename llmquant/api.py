"""The public entry point :func:`quantize`: any ``nn.Module``, any registered method."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from llmquant.config import QuantConfig
from llmquant.hf.integration import attach_quantization_config
from llmquant.modules.quant_linear import prepare_model
from llmquant.mixed import quantize_model


def quantize(
    model: nn.Module,
    config: QuantConfig,
    calibration: Iterable[torch.Tensor] | None = None,
    progress: bool = True,
    measurement=None,
    timing_table=None,
) -> dict:
    """Quantize ``model`` in place according to ``config``; returns a summary dict.

    ``model`` is any ``nn.Module``: its ``nn.Linear`` (and GPT-2 ``Conv1D``) layers selected by the
    config become :class:`~llmquant.QuantLinear`. ``calibration`` (token id tensors [1, T] or [B, T])
    is needed by data-aware methods (GPTQ, which also needs a transformers causal LM). A transformers
    model additionally gets a ``quantization_config`` so that ``save_pretrained`` and
    :func:`llmquant.save_quantized` write a loadable checkpoint. The summary's
    ``quantization_config`` is the config as stored: layers the method kept in float are in ``skip``;
    its ``kernels`` says what runs the quantized layers (they are prepared here, for the model's dtype).

    With a budget in ``config`` (``target_bpw`` or ``max_size``, see :mod:`llmquant.mixed`) each layer's
    scheme is chosen first; ``measurement`` names a JSON file that keeps the measurement for the next
    budget (read if it exists, written otherwise); a latency budget (``max_latency``) reads the
    ``timing_table`` JSON of this machine (``llmquant timing``). The stored config then names every
    layer's scheme.
    """
    summary, effective = quantize_model(model, config, calibration, progress, measurement=measurement,
                                        timing_table=timing_table)
    attach_quantization_config(model, effective)
    summary["quantization_config"] = effective.to_dict()
    summary["kernels"] = prepare_model(model)  # kernels chosen and weights repacked now
    return summary
