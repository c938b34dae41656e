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
    "I16": torch.int16,
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
            if not mod.stored_dtype_ok(name, got_dtype, dtype):
                hint = ""
                if name == "scales":  # uint8 scales are compact_qparams' codes
                    hint = (" (the checkpoint stores compact scales, but its quantization_config does not say "
                            "compact_qparams: true)" if got_dtype == torch.uint8 else
                            " (the quantization_config says compact_qparams: true, but the checkpoint stores "
                            "float scales)" if mod.compact else "")
                raise CheckpointError(f"{key}: dtype {info['dtype']} in the checkpoint, expected {dtype}{hint}")
        stray = f"{prefix}.weight"
        if stray in header:
            raise CheckpointError(f"{stray}: a float weight is stored for a layer the config quantizes")
        if mod.rot_signs is None and f"{prefix}.rot_signs" in header:
            raise CheckpointError(f"{prefix}.rot_signs: the layer is stored rotated, but the quantization_config does "
                                  "not rotate it; run unrotated, it would give wrong outputs")


def validate_loaded(model: nn.Module) -> int:
    """Check every loaded QuantLinear's values (NaN scales, zero points, perm); returns their count."""
    n = 0
    for prefix, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            mod.validate(prefix)
            n += 1
    return n


#: safetensors metadata keys: the dtype the float tensors of the source model were stored in, and the
#: bytes of the source checkpoint's tensors (what ``llmquant info`` compares the checkpoint with)
SOURCE_DTYPE_KEY = "llmquant_source_dtype"
SOURCE_BYTES_KEY = "llmquant_source_bytes"
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def stored_float_dtype(files: Iterable[str | os.PathLike]) -> torch.dtype | None:
    """The dtype holding most float bytes in safetensors ``files`` (None if they hold no float tensor).
    An llmquant checkpoint's own record of its source's dtype wins."""
    by_dtype: dict[torch.dtype, int] = {}
    for f in files:
        meta = read_safetensors_metadata(f)
        if meta.get(SOURCE_DTYPE_KEY) in _DTYPE_NAMES.values():
            return getattr(torch, meta[SOURCE_DTYPE_KEY])
        for info in read_safetensors_header(f).values():
            dt = _ST_DTYPES.get(info["dtype"])
            if dt is not None and dt.is_floating_point:
                by_dtype[dt] = by_dtype.get(dt, 0) + info["data_offsets"][1] - info["data_offsets"][0]
    return max(by_dtype, key=by_dtype.get) if by_dtype else None


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    with Path(path).open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        try:
            return dict(json.loads(f.read(n)).get("__metadata__") or {})
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{Path(path).name}: corrupt safetensors header ({e})") from None


def remember_source_dtype(model: nn.Module, files: Iterable[str | os.PathLike]) -> None:
    """Record the dtype the model's weights were stored in, so that saving it quantized stores its float
    tensors (embeddings, norms, float layers) the same way rather than in the dtype it runs in; and the
    source checkpoint's tensor bytes (an llmquant checkpoint passes on its own source's)."""
    files = [f for f in files if str(f).endswith(".safetensors")]
    dtype = stored_float_dtype(files)
    if dtype is not None:
        model._llmquant_source_dtype = dtype
    if not files:
        return
    recorded = read_safetensors_metadata(files[0]).get(SOURCE_BYTES_KEY, "")
    header = checkpoint_headers(files)
    if recorded.isdigit():
        model._llmquant_source_bytes = int(recorded)
    elif not any(k.endswith(".qweight") for k in header):  # a float source: its own size
        model._llmquant_source_bytes = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values())


def _source_recorded(model: nn.Module) -> None:
    """Record the source of a model loaded by plain ``from_pretrained`` from a local folder, on first need."""
    if "_llmquant_source_dtype" in model.__dict__ or "_llmquant_source_bytes" in model.__dict__:
        return
    path = getattr(model, "name_or_path", None)
    if path and Path(path).is_dir():
        remember_source_dtype(model, sorted(Path(path).glob("*.safetensors")))


def storage_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a quantized model's float tensors are saved in: its source checkpoint's (recorded at
    load, or read from the folder it was loaded from), else the dtype of its float parameters."""
    _source_recorded(model)
    dtype = getattr(model, "_llmquant_source_dtype", None)
    if dtype is not None:
        return dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def float_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict with every float tensor outside the packed layers cast to ``dtype``. Tensors that
    share storage (a tied embedding and output layer) still share it afterwards, so the writer stores
    them once."""
    packed = set()
    for prefix, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            packed.update(f"{prefix}.{n}" for n in mod.expected_tensors())
    cast: dict[tuple, torch.Tensor] = {}
    out = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point() and k not in packed and v.dtype != dtype:
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
            if key not in cast:
                cast[key] = v.to(dtype)
            v = cast[key]
        out[k] = v
    return out


def save_metadata(model: nn.Module) -> dict[str, str]:
    meta = {SOURCE_DTYPE_KEY: _DTYPE_NAMES.get(storage_dtype(model), "float32")}
    if getattr(model, "_llmquant_source_bytes", None) is not None:
        meta[SOURCE_BYTES_KEY] = str(model._llmquant_source_bytes)
    return meta


def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer=None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` (quantized with :func:`llmquant.quantize` or loaded quantized) as a checkpoint folder.

    Float tensors outside the packed layers (embeddings, norms, skipped layers, biases) are stored in
    ``dtype``; by default in the dtype of the checkpoint the model was loaded from (fp16 for the
    built-in models), whatever dtype it runs in, so a quantized checkpoint is never bigger than its
    source. ``model.save_pretrained`` does the same. Written into a temporary folder beside
    ``out_dir`` and renamed into place, so a crash never leaves a half-written checkpoint under the
    final name; files get the usual permissions (0644 under the common umask 022).
    """
    if getattr(getattr(model, "config", None), "quantization_config", None) is None:
        raise ValueError("model has no quantization_config: quantize it with llmquant.quantize first")
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        saved = model.__dict__.get("_llmquant_source_dtype")
        if dtype is not None:
            model._llmquant_source_dtype = dtype
        try:
            model.save_pretrained(tmp)  # the llmquant HfQuantizer casts (get_state_dict_and_metadata)
        finally:
            if dtype is not None:
                if saved is None:
                    del model._llmquant_source_dtype
                else:
                    model._llmquant_source_dtype = saved
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for extra in getattr(model, "_llmquant_extra_files", ()):  # e.g. a model licence
            shutil.copy2(extra, tmp / Path(extra).name)
    out = Path(out_dir)
    logger.info("saved quantized checkpoint to %s", out)
    return out
