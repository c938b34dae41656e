"""Checkpoint I/O: atomic saving, and a strict check of a quantized checkpoint's tensors before load.

A checkpoint is a Hugging Face model folder: ``config.json`` (with ``quantization_config``),
``model.safetensors`` (or shards with ``model.safetensors.index.json``), tokenizer files. The quantized
tensors follow :mod:`llmquant.formats.packing`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from llmquant.fsutil import atomic_directory
from llmquant.modules.quant_linear import CheckpointError, QuantLinear

logger = logging.getLogger(__name__)

_ST_DTYPES = {
    "I32": torch.int32,
    "U8": torch.uint8,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "I64": torch.int64,
    "I8": torch.int8,
}


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """Tensor name -> {"dtype", "shape", "data_offsets"} of one safetensors file.

    Raises :class:`CheckpointError` for a file that is not safetensors or is truncated.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name}: truncated ({size} bytes; no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path.name}: truncated or corrupt (header of {n} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path.name}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        # name the first tensor whose bytes are missing
        for name, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][1]):
            if 8 + n + v["data_offsets"][1] > size:
                raise CheckpointError(
                    f"{path.name}: truncated: tensor {name} ends at byte {8 + n + v['data_offsets'][1]} "
                    f"but the file has {size} bytes"
                )
    return header


def checkpoint_headers(files: Iterable[str | os.PathLike]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for f in files:
        for name, info in read_safetensors_header(f).items():
            out[name] = info
    return out


def verify_quantized_tensors(model: nn.Module, files: Iterable[str | os.PathLike]) -> None:
    """Every QuantLinear of ``model`` (freshly swapped in, not yet loaded) finds its tensors in ``files``
    with the right shape and dtype. Raises :class:`CheckpointError` naming the tensor and the problem."""
    header = checkpoint_headers(files)
    for prefix, mod in model.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        for name, (shape, dtype) in mod.expected_tensors().items():
            key = f"{prefix}.{name}"
            info = header.get(key)
            if info is None:
                raise CheckpointError(f"{key}: missing from the checkpoint")
            got_dtype = _ST_DTYPES.get(info["dtype"], info["dtype"])
            if tuple(info["shape"]) != shape:
                raise CheckpointError(f"{key}: shape {tuple(info['shape'])} in the checkpoint, expected {shape}")
            if got_dtype != dtype:
                raise CheckpointError(f"{key}: dtype {info['dtype']} in the checkpoint, expected {dtype}")
        stray = f"{prefix}.weight"
        if stray in header:
            raise CheckpointError(f"{stray}: a float weight is stored for a layer the config quantizes")


def validate_loaded(model: nn.Module) -> int:
    """Check every loaded QuantLinear's values (NaN scales, zero points, perm); returns their count."""
    n = 0
    for prefix, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            mod.validate(prefix)
            n += 1
    return n


def _float_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict with every float tensor outside the packed layers cast to ``dtype``."""
    packed = set()
    for prefix, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            packed.update(f"{prefix}.{n}" for n in mod.expected_tensors())
    sd = model.state_dict()
    return {k: (v.to(dtype) if v.is_floating_point() and k not in packed else v) for k, v in sd.items()}


def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer=None,
    overwrite: bool = False,
    dtype: torch.dtype | None = torch.float16,
) -> Path:
    """Write ``model`` (quantized with :func:`llmquant.quantize` or loaded quantized) as a checkpoint folder.

    Float tensors outside the packed layers (embeddings, norms, skipped layers, biases) are stored in
    ``dtype`` (fp16 by default, whatever dtype the model runs in; ``None`` keeps them as they are).
    Written into a temporary folder beside ``out_dir`` and renamed into place, so a crash never leaves
    a half-written checkpoint under the final name.
    """
    if getattr(model.config, "quantization_config", None) is None:
        raise ValueError("model has no quantization_config: quantize it with llmquant.quantize first")
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        if dtype is None:
            model.save_pretrained(tmp)
        else:
            run_dtype = model.config.dtype
            model.config.dtype = dtype
            try:
                model.save_pretrained(tmp, state_dict=_float_state_dict(model, dtype))
            finally:
                model.config.dtype = run_dtype
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for extra in getattr(model, "_llmquant_extra_files", ()):  # e.g. a model licence
            shutil.copy2(extra, tmp / Path(extra).name)
    out = Path(out_dir)
    logger.info("saved quantized checkpoint to %s", out)
    return out
