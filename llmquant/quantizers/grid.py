"""The integer grid shared by every quantizer: how scales and zero points are chosen, and
the fake-quantization primitive ``q = clamp(round(w / s) + z, 0, maxq)``.

Conventions (they match the GPTQ reference implementation, so results are comparable):

* asymmetric: the range [min(w, 0), max(w, 0)] is mapped onto [0, maxq]; ``s = (max - min) / maxq``,
  ``z = round(-min / s)``, stored as uint8.
* symmetric: ``s = 2 * max|w| / maxq`` and the zero point is the fixed ``2**(bits-1)`` (not stored).
* scales are rounded to float16 *before* codes are computed, so that what is stored dequantizes to
  exactly what the quantizer assumed.
"""
from __future__ import annotations

import torch

# smallest normal float16; a scale below it would lose precision when stored as fp16
_MIN_SCALE = 2.0 ** -14


def qparams(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of ``w`` [R, C] (each row is one group): float32 [R], float32 [R]."""
    maxq = (1 << bits) - 1
    w = w.to(torch.float32)
    xmin = w.amin(dim=1).clamp(max=0)
    xmax = w.amax(dim=1).clamp(min=0)
    if sym:
        amax = torch.maximum(xmin.abs(), xmax)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        scale = (xmax - xmin) / maxq
        zero = None
    dead = scale == 0
    scale = torch.where(dead, torch.ones_like(scale), scale)
    scale = scale.clamp(min=_MIN_SCALE).to(torch.float16).to(torch.float32)
    if zero is None:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float32) of ``w`` under per-row ``scale``/``zero`` broadcast along the last dim."""
    maxq = (1 << bits) - 1
    return torch.clamp(torch.round(w.to(torch.float32) / scale) + zero, 0, maxq)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return (quantize_codes(w, scale, zero, bits) - zero) * scale
