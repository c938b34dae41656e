"""What every export shares: reading an llmquant checkpoint folder whole, and writing the converted one
(tensors, config.json, tokenizer and licence files) atomically."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from llmquant.config import LayerQuant, QuantConfig
from llmquant.formats.packing import BLOCK, decode_qparams
from llmquant.fsutil import atomic_directory


class ExportError(ValueError):
    """The checkpoint cannot be expressed in the target format (the message names the layer)."""


@dataclass
class SourceCheckpoint:
    path: Path
    config: dict  # config.json
    quant: QuantConfig
    tensors: dict[str, torch.Tensor]
    #: quantized layers, by prefix
    layers: dict[str, LayerQuant]

    #: (N, K) of every linear layer, from the model built on the meta device from config.json
    shapes: dict[str, tuple[int, int]]

    def in_features(self, prefix: str) -> int:
        """K of a quantized layer (the packed rows round it up to whole 32-code blocks)."""
        n, k = self.shapes[prefix]
        scheme = self.layers[prefix]
        words = self.tensors[f"{prefix}.qweight"].shape
        if tuple(words) != (n, -(-k // BLOCK) * scheme.bits):
            raise ExportError(f"{prefix}.qweight has shape {tuple(words)}; the model's [{n}, {k}] layer needs "
                              f"[{n}, {-(-k // BLOCK) * scheme.bits}]")
        return k

    def float_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor that does not belong to a quantized layer's packed weight (bias included)."""
        packed = {f"{p}.{leaf}" for p in self.layers for leaf in ("qweight", "scales", "zeros", "perm")}
        return {k: v for k, v in self.tensors.items() if k not in packed}


def read_checkpoint(src: str | os.PathLike) -> SourceCheckpoint:
    from safetensors import safe_open

    src = Path(src)
    cfg = json.loads((src / "config.json").read_text())
    if "quantization_config" not in cfg:
        raise ExportError(f"{src} has no quantization_config: not a quantized checkpoint")
    quant = QuantConfig.from_dict(cfg["quantization_config"])
    if quant.rotation is not None:
        raise ExportError(f"{src} stores rotated layers (rotation={quant.rotation!r}); the GPTQ and "
                          "compressed-tensors formats have no input rotation, so exporting them would change the model")
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ExportError(f"no .safetensors files in {src}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(f, framework="pt") as fh:
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    layers = {}
    for key in sorted(tensors):
        if key.endswith(".qweight"):
            prefix = key[: -len(".qweight")]
            scheme = quant.resolve(prefix)
            if scheme is None:
                raise ExportError(f"{prefix} is stored quantized but the config keeps it in float")
            layers[prefix] = scheme
            if tensors[f"{prefix}.scales"].dtype == torch.uint8:  # compact_qparams: the plain tensors
                scales, zeros = decode_qparams(tensors[f"{prefix}.scales"], tensors.get(f"{prefix}.zeros"), scheme.bits)
                tensors[f"{prefix}.scales"] = scales
                if zeros is not None:
                    tensors[f"{prefix}.zeros"] = zeros
                if f"{prefix}.perm" in tensors:  # int16 in compact checkpoints
                    tensors[f"{prefix}.perm"] = tensors[f"{prefix}.perm"].to(torch.int32)
    return SourceCheckpoint(src, cfg, quant, tensors, layers, _linear_shapes(src, layers))


def _linear_shapes(src: Path, layers: dict[str, LayerQuant]) -> dict[str, tuple[int, int]]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmquant.modules.walk import find_linear_layers, linear_weight

    hf_config = AutoConfig.from_pretrained(src)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config  # the skeleton only: float layers on the meta device
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    shapes = {name: tuple(linear_weight(mod).shape) for name, mod in find_linear_layers(model)}
    missing = sorted(set(layers) - set(shapes))
    if missing:
        raise ExportError(f"quantized layers {missing} are not linear layers of {type(model).__name__}")
    return shapes


def write_checkpoint(src: SourceCheckpoint, out: str | os.PathLike, tensors: dict[str, torch.Tensor],
                     quantization_config: dict, overwrite: bool = False) -> Path:
    """The converted folder: ``tensors``, the source's config.json with ``quantization_config``
    replaced, and every other file of the source (tokenizer, generation config, licences)."""
    from safetensors.torch import save_file

    cfg = dict(src.config, quantization_config=quantization_config)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for f in src.path.iterdir():
            if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json") and f.is_file():
                shutil.copy2(f, tmp / f.name)
    return Path(out)
