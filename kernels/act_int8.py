"""Dynamic INT8 activations (W4A8, W8A8): exactly what the CPU kernel computes, in torch.

With ``act_int8`` the CPU kernel quantizes each row of x to int8 on the fly and multiplies it with
the layer's codes on integer dot products (``vpmaddubsw``/``vpmaddwd`` on AVX2, ``vpdpbusd`` with VNNI),
fp32 scales after. It applies to layers stored with 2-, 3-, 4- or 8-bit codes whose groups change only
at 128-column boundaries (G a multiple of 128, or one group per row), and to the columns in whole
blocks of 128; other layers, and the last K % 128 columns, stay in fp32. Each row of x is cut into
superblocks of 128 columns, and each superblock into 8 groups of 16 columns that share one
power-of-two scale 2^(e - 6), e = floor(log2 max|x|) over the group (at least -100; 0 if they are all
zero); each x becomes ``m = clamp(round(x * 2^(6 - e)), -127, 127)`` (round to nearest even). So every
value keeps 7 bits relative to the largest of its 16 columns. Which 16 columns form a group follows
the codes' byte order in the kernel (the columns whose products share int32 lanes of the dot
products), so it depends on the code width:

* 2-, 3- and 4-bit codes: group l (0..7) is the columns 32 c + 2 l + j and 32 c + 16 + 2 l + j
  (c = 0..3, j = 0, 1): int32 lanes l and l + 8 of the 4-bit superblock (``kernels/csrc/lq_cpu.h``).
* 8-bit codes: group 4 p + g (p = 0, 1; g = 0..3) is the columns 32 c + 8 g + 2 i + p (c = 0..3,
  i = 0..3): the even (p = 0) or odd columns of 8-column runs, as the 8-bit layout stores a block's
  even columns before its odd ones.

Measured on gemma3-270m INT4 g128 (WikiText-2, 4096 tokens, emulated): perplexity +0.45% against
weight-only INT4; one scale per 8 columns gave +0.23% (but AVX2 then converts twice as often), one
per row of x +5.3%, one per 128 columns +0.86%.

The kernel's fp32 path at M = 1 of 2- to 4-bit codes uses the same groups with 22 bits instead of 7
(three int8 limbs): :func:`quantize_x` with ``bits=22`` is that representation, within fp32 rounding
of x itself. Where the CPU kernels have it (AVX2 and the scalar code), bf16 x at M = 1 (and fp32 x
under torch's "medium" matmul precision) takes two limbs, 15 bits (``bits=15``): exact for a bf16
value at least 2^-6 of the largest of its 16 columns, and within 2^-14 of that largest otherwise.
"""
from __future__ import annotations

import torch

SB = 128  # columns per superblock
#: fractional bits per lane: 6 for INT8 (|m| <= 127), 13 for the two-limb (bf16-class) decode's 15-bit
#: integers, 21 for the fp32 path's 22-bit integers
SHIFT = {8: 6, 15: 13, 22: 21}


def applies(bits: int, group_size: int, in_features: int) -> bool:
    """Whether the integer path covers a layer (its whole superblocks)."""
    return bits in (2, 3, 4, 8) and in_features >= SB and (group_size == -1 or group_size % SB == 0
                                                        or group_size >= in_features)


def quantize_x(x: torch.Tensor, bits: int = 8, code_bits: int = 4) -> torch.Tensor:
    """x [..., K] (in the order the kernel reads it: after an act-order gather) with the columns of
    whole superblocks replaced by their quantized values m * 2^(e - S), in float32, grouped as the
    kernel groups them for a layer of ``code_bits``-bit codes."""
    if bits not in SHIFT:
        raise ValueError(f"bits must be one of {sorted(SHIFT)}, got {bits}")
    if code_bits not in (2, 3, 4, 8):
        raise ValueError(f"code_bits must be 2, 3, 4 or 8, got {code_bits}")
    shift = SHIFT[bits]
    k = x.shape[-1]
    nsb = k // SB
    out = x.to(torch.float32).clone()
    if nsb == 0:
        return out
    if code_bits == 8:  # [.., sb, c, g, i, p]: group (p, g)
        body = out[..., : nsb * SB].reshape(*x.shape[:-1], nsb, 4, 4, 4, 2)
        amax = body.abs().amax(dim=(-4, -2), keepdim=True)
    else:  # [.., sb, c, lane // 8, lane % 8, j]: lanes l and l + 8 together
        body = out[..., : nsb * SB].reshape(*x.shape[:-1], nsb, 4, 2, 8, 2)
        amax = body.abs().amax(dim=(-4, -3, -1), keepdim=True)
    _, ex = torch.frexp(amax)  # amax = f 2^ex, f in [0.5, 1)
    e = torch.where(amax > 0, (ex - 1).clamp_min(-100), torch.zeros_like(ex))
    m = torch.round(torch.ldexp(body, shift - e))
    if bits == 8:
        m = m.clamp(-127, 127)
    out[..., : nsb * SB] = torch.ldexp(m, e - shift).reshape(*x.shape[:-1], nsb * SB)
    return out
