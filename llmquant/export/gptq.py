"""Export to the standard GPTQ layout ("GPTQ v1", ``quant_method: "gptq"``), which vLLM's built-in
``gptq`` method, AutoGPTQ/GPTQModel and transformers load.

The GPTQ layout of one linear layer (N out_features, K in_features, b bits, pack = 32 / b):

==============  ======  ==============  =========================================================
name            dtype   shape           meaning
==============  ======  ==============  =========================================================
qweight         int32   [K*b/32, N]     codes packed along K (dim 0), in *input* column order
qzeros          int32   [NG, N*b/32]    (zero point − 1) packed along N (dim 1): the v1 offset
scales          fp16    [NG, N]         transposed relative to ours
g_idx           int32   [K]             group of each input column
==============  ======  ==============  =========================================================

Within a packed column the bit order is the same little-endian stream as ours (code i at bits
[i*b, (i+1)*b) of a 32-code block spanning b words), so for b = 3 a block of 32 codes fills 3 rows.
Dequantization: ``W[n, k] = (q[k, n] − (qz[g_idx[k], n] + 1)) · scales[g_idx[k], n]``.

What the export refuses (with an error naming the layer): a ragged last group (K % G != 0), which
GPTQ loaders reject; K or N not multiples of 32/b (of 32 for 3-bit); mixed schemes across layers or
float layers other than lm_head, which the plain ``gptq`` config cannot describe; and asymmetric
groups whose zero point is 0, which the v1 "zero − 1" encoding cannot store.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from llmquant.export.common import ExportError, read_checkpoint, write_checkpoint
from llmquant.formats.packing import BLOCK, pack_rows, packed_words, unpack_rows

__all__ = ["ExportError", "dequantize_gptq", "export_gptq_checkpoint", "to_gptq_tensors"]


def to_gptq_tensors(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    perm: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    in_features: int,
    name: str = "layer",
) -> dict[str, torch.Tensor]:
    """Our packed tensors of one layer -> GPTQ v1 tensors (see module docstring)."""
    k = in_features
    n = qweight.shape[0]
    g = k if group_size == -1 else group_size
    if k % g:
        raise ExportError(f"{name}: K={k} is not a multiple of group_size={g}; GPTQ loaders need whole groups")
    unit = BLOCK if bits == 3 else 32 // bits  # codes per whole number of words
    if k % unit or n % unit:
        raise ExportError(f"{name}: K={k} and N={n} must be multiples of {unit} for {bits}-bit GPTQ packing")
    codes = unpack_rows(qweight, bits, k)  # [N, K] stored order
    ng = k // g
    stored_group = torch.arange(k) // g
    if perm is not None:
        p = perm.to(torch.long)
        orig = torch.empty_like(codes)
        orig[:, p] = codes  # stored column j holds input column p[j]
        codes = orig
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[p] = stored_group.to(torch.int32)
    else:
        g_idx = stored_group.to(torch.int32)
    if zeros is None:
        z = torch.full((n, ng), 1 << (bits - 1), dtype=torch.int64)
    else:
        z = zeros.to(torch.int64)
        if bool((z == 0).any()):
            raise ExportError(
                f"{name}: an asymmetric group has zero point 0, which GPTQ v1's (zero - 1) encoding cannot store; "
                "export a symmetric model instead"
            )
    # pack_rows pads rows to blocks of 32 codes; GPTQ stores exactly len * bits / 32 words
    return {
        "qweight": pack_rows(codes.to(torch.int64), bits)[:, : k * bits // 32].t().contiguous(),
        "qzeros": pack_rows((z - 1).t().contiguous(), bits)[:, : n * bits // 32].contiguous(),
        "scales": scales.t().contiguous().to(torch.float16),
        "g_idx": g_idx,
    }


def _pad_words(rows: torch.Tensor, length: int, bits: int) -> torch.Tensor:
    """Rows of exactly length*bits/32 words -> rows padded to whole 32-code blocks (unpack_rows' input)."""
    full = packed_words(length, bits)
    out = torch.zeros(rows.shape[0], full, dtype=torch.int32)
    out[:, : rows.shape[1]] = rows
    return out


def dequantize_gptq(qweight, qzeros, scales, g_idx, bits: int) -> torch.Tensor:
    """GPTQ v1 tensors -> float32 W [N, K] (input column order); an independent reading of the layout."""
    k = g_idx.numel()
    n = scales.shape[1]
    q = unpack_rows(_pad_words(qweight.t(), k, bits), bits, k).to(torch.float32)  # [N, K]
    z = unpack_rows(_pad_words(qzeros, n, bits), bits, n).to(torch.float32).t() + 1  # [N, NG]
    gi = g_idx.to(torch.long)
    return (q - z[:, gi]) * scales.t().to(torch.float32)[:, gi]


def export_gptq_checkpoint(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Convert an llmquant checkpoint folder into a GPTQ-layout checkpoint folder."""
    ckpt = read_checkpoint(src)
    schemes = set(ckpt.layers.values())
    if len(schemes) != 1:
        raise ExportError(f"the plain GPTQ config describes one scheme; this checkpoint mixes {sorted(map(str, schemes))} "
                          "(llmquant export-compressed-tensors writes per-layer schemes)")
    (scheme,) = schemes
    out_tensors = ckpt.float_tensors()
    for key, t in out_tensors.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf == "weight" and prefix in ckpt.shapes and not prefix.endswith("lm_head"):
            raise ExportError(f"{prefix} is kept in float; the plain GPTQ config cannot describe that")
    for p in ckpt.layers:
        g = to_gptq_tensors(
            ckpt.tensors[f"{p}.qweight"], ckpt.tensors[f"{p}.scales"], ckpt.tensors.get(f"{p}.zeros"),
            ckpt.tensors.get(f"{p}.perm"), bits=scheme.bits, group_size=scheme.group_size,
            in_features=ckpt.in_features(p), name=p,
        )
        for leaf, t in g.items():
            out_tensors[f"{p}.{leaf}"] = t
    qc = ckpt.quant
    return write_checkpoint(ckpt, out, out_tensors, {
        "quant_method": "gptq",
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "sym": scheme.sym,
        "desc_act": any(f"{p}.perm" in ckpt.tensors for p in ckpt.layers),
        "static_groups": qc.static_groups,
        "true_sequential": qc.true_sequential,
        "damp_percent": qc.damp_percent,
        "lm_head": any(p.endswith("lm_head") for p in ckpt.layers),
        "checkpoint_format": "gptq",
    }, overwrite=overwrite)
