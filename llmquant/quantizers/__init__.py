"""Quantizers: the built-in methods (they register themselves in :mod:`llmquant.registry` on import)
and :func:`quantize_model`, which runs whichever method a config names on any ``nn.Module``."""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from llmquant.config import QuantConfig
from llmquant.quantizers import gptq_model, rtn  # noqa: F401  (registers "gptq" and "rtn")
from llmquant.quantizers.plan import check_embedding, check_plan, quantize_embedding
from llmquant.registry import get_method

logger = logging.getLogger(__name__)


def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    calibration: Iterable[torch.Tensor] | None = None,
    progress: bool = True,
) -> tuple[dict, QuantConfig]:
    """Quantize ``model`` in place with the method ``config.method`` names.

    Returns (summary, effective config): the config with the layers the method left in float added to
    ``skip``, so that it describes what the model now holds. Everything that can be checked up front
    (calibration present, the method understands the model, the config selects some layer) is checked
    before any layer changes.

    A config with a budget (``target_bpw``/``max_size``) is refused here: its layers' schemes are
    chosen first by :func:`llmquant.mixed.quantize_model` (what :func:`llmquant.quantize` and the
    transformers loader call), which then calls this with the allocated config.
    """
    method = get_method(config.method)
    if config.budgeted:
        raise ValueError(
            "this config has a budget (target_bpw/max_size) whose schemes are not chosen yet: quantize with "
            "llmquant.quantize or llmquant.mixed.quantize_model, which allocate them first"
        )
    if method.needs_calibration and calibration is None:
        raise ValueError(
            f"method {method.name!r} needs calibration data: pass calibration=... (token id batches, "
            "see llmquant.calibration.calibration_batches)"
        )
    method.check_model(model, config)
    # the embedding first: a calibrated method then sees the inputs the quantized model will have
    if config.quantize_embedding:
        check_plan(model, config)  # refused before the embedding changes
        check_embedding(model, config)
    # GPTQ quantizes a table the head shares as the head (gptq_model), the others are rounded here
    embedding = quantize_embedding(model, config, shared_by_method=method.name == "gptq")
    summary = method.apply(model, config, calibration, progress)
    summary.update(embedding)
    return summary, config.with_kept_float(summary.get("kept_float", ()))


__all__ = ["quantize_model"]
