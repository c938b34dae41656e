"""Pruning jobs on model folders: load, calibrate, prune, write atomically (the CLI's ``llmquant prune``).

The output of structured pruning is a plain Hugging Face checkpoint (reduced config, float weights in
the input's stored dtype) that loads without llmquant; the output of unstructured/N:M pruning is the
same model with zeros, or with ``quantize`` an llmquant checkpoint. Both carry ``llmquant_pruning.json``
(what was pruned, per-layer sparsity or kept units, importance, timings).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from llmquant.calibration import calibration_batches
from llmquant.checkpoint import save_quantized, storage_dtype
from llmquant.config import QuantConfig
from llmquant.fsutil import atomic_directory
from llmquant.hf.integration import attach_quantization_config
from llmquant.modules.quant_linear import prepare_model
from llmquant.models import bos_for_raw_text, load_model
from llmquant.prune.config import PruneConfig, SparsityConfig, StructuredConfig

logger = logging.getLogger(__name__)

RECORD = "llmquant_pruning.json"


def prune(model_name: str, out: str, config: PruneConfig, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Prune ``model_name`` (built-in name or folder) with ``config``, write the result to ``out``."""
    t0 = time.perf_counter()
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    model, tok = load_model(model_name, dtype=torch.float32)
    stored = storage_dtype(model)
    method = config.get_method()
    method.check_model(model, config)  # before the calibration pass
    calibration = None
    if method.needs_calibration:
        calibration = calibration_batches(tok, config.calibration, config.nsamples, config.seqlen,
                                          bos=bos_for_raw_text(model_name, tok))
    new, summary = method.apply(model, config, calibration, progress)
    finish_quantized(new, summary)
    summary.update(source=str(model_name), config=config.to_dict(), wall_seconds=round(time.perf_counter() - t0, 1))
    write_pruned(new, tok, out, summary, stored, overwrite)
    return summary


def finish_quantized(model, summary: dict) -> None:
    """After SparseGPT quantized in the same pass: give the model its stored config and its kernels."""
    if "quantization_config" in summary:
        attach_quantization_config(model, QuantConfig.from_dict(summary["quantization_config"]))
        summary["kernels"] = prepare_model(model)


def write_pruned(model, tok, out: str, summary: dict, dtype: torch.dtype, overwrite: bool) -> None:
    """Write a pruned model (float or llmquant-quantized) with its pruning record, atomically."""
    record_text = json.dumps(summary, indent=1, default=str)
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        extra = Path(str(out).rstrip("/") + ".record")
        extra.mkdir(parents=True, exist_ok=True)
        (extra / RECORD).write_text(record_text)
        model._llmquant_extra_files = [*getattr(model, "_llmquant_extra_files", ()), extra / RECORD]
        try:
            save_quantized(model, out, tokenizer=tok, overwrite=overwrite)
        finally:
            shutil.rmtree(extra, ignore_errors=True)
        return
    model.to(dtype)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for f in getattr(model, "_llmquant_extra_files", ()):
            shutil.copy2(f, tmp / Path(f).name)
        (tmp / RECORD).write_text(record_text)
    logger.info("wrote %s", out)


__all__ = ["RECORD", "prune", "write_pruned", "StructuredConfig", "SparsityConfig"]
