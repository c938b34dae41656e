"""Dynamic INT8 activations (W4A8): exactly what the CPU kernel computes, in torch.

With ``act_int8`` the CPU kernel quantizes each row of x to int8 on the fly and multiplies it with
the 4-bit codes on integer dot products (``vpmaddubsw``/``vpmaddwd`` on AVX2, ``vpdpbusd`` with VNNI),
fp32 scales after. It applies to layers stored with 2-, 3- or 4-bit codes whose groups change only
at 128-column boundaries (G a multiple of 128, or one group per row), and to the columns in whole
blocks of 128; other layers, and the last K % 128 columns, stay in fp32. Each row of x is cut into
superblocks of 128 columns and each superblock into 16 lanes of 8 columns (lane l: the columns
32 c + 2 l + j, c = 0..3, j = 0..1, the ones that share an int32 lane of the dot products); lanes l
and l + 8 (16 columns) share one power-of-two scale 2^(e - 6), e = floor(log2 max|x|) over them (at
least -100; 0 if they are all zero), and each x becomes ``m = clamp(round(x * 2^(6 - e)), -127, 127)``
(round to nearest even). So every value keeps 7 bits relative to the largest of its 16 columns.
Measured on gemma3-270m INT4 g128 (WikiText-2, 4096 tokens, emulated): perplexity +0.45% against
weight-only INT4; one scale per 8 columns gave +0.23% (but AVX2 then converts twice as often), one
per row of x +5.3%, one per 128 columns +0.86%.

The kernel's fp32 path at M = 1 uses the same lanes with 22 bits instead of 7 (three int8 limbs):
:func:`quantize_x` with ``bits=22`` is that representation, within fp32 rounding of x itself. 8-bit
layers are not covered: their decode carries x in limbs of their own byte order, and with the option
on they run their fp32 paths.
"""
from __future__ import annotations

import torch

SB = 128  # columns per superblock
#: fractional bits per lane: 6 for INT8 (|m| <= 127), 21 for the fp32 path's 22-bit integers
SHIFT = {8: 6, 22: 21}


def applies(bits: int, group_size: int, in_features: int) -> bool:
    """Whether the integer path covers a layer (its whole superblocks)."""
    return bits in (2, 3, 4) and in_features >= SB and (group_size == -1 or group_size % SB == 0
                                                        or group_size >= in_features)


def quantize_x(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """x [..., K] (in the order the kernel reads it: after an act-order gather) with the columns of
    whole superblocks replaced by their quantized values m * 2^(e - S), in float32."""
    if bits not in SHIFT:
        raise ValueError(f"bits must be 8 or 22, got {bits}")
    shift = SHIFT[bits]
    k = x.shape[-1]
    nsb = k // SB
    out = x.to(torch.float32).clone()
    if nsb == 0:
        return out
    body = out[..., : nsb * SB].reshape(*x.shape[:-1], nsb, 4, 2, 8, 2)  # [.., sb, c, lane // 8, lane % 8, j]
    # one scale per lane of 8 columns, shared between lanes l and l + 8
    amax = body.abs().amax(dim=(-4, -3, -1), keepdim=True)
    _, ex = torch.frexp(amax)  # amax = f 2^ex, f in [0.5, 1)
    e = torch.where(amax > 0, (ex - 1).clamp_min(-100), torch.zeros_like(ex))
    m = torch.round(torch.ldexp(body, shift - e))
    if bits == 8:
        m = m.clamp(-127, 127)
    out[..., : nsb * SB] = torch.ldexp(m, e - shift).reshape(*x.shape[:-1], nsb * SB)
    return out
