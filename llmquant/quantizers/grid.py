"""The integer grid shared by every quantizer: how scales and zero points are chosen, and
the fake-quantization primitive ``q = clamp(round(w / s) + z, 0, maxq)``.

Conventions (they match the GPTQ reference implementation, so results are comparable):

* asymmetric: the range [min(w, 0), max(w, 0)] is mapped onto [0, maxq]; ``s = (max - min) / maxq``,
  ``z = round(-min / s)``, stored as uint8.
* symmetric: ``s = 2 * max|w| / maxq`` and the zero point is the fixed ``2**(bits-1)`` (not stored).
* scales are rounded to float16 *before* codes are computed, so that what is stored dequantizes to
  exactly what the quantizer assumed; with ``compact`` (``QuantConfig.compact_qparams``) up to the next
  point of the compact 8-bit scale grid instead (:func:`llmquant.formats.packing.snap_scales`), so that
  the range the scale was made for is not clipped.
"""
from __future__ import annotations

import torch

from llmquant.formats.packing import snap_scales

# smallest normal float16; a scale below it would lose precision when stored as fp16
_MIN_SCALE = 2.0 ** -14


#: clipping search: the range is shrunk to ``p * [min, max]`` for p = 1, 1 - CLIP_STEP, ... down to
#: CLIP_MIN, and the p with the least (weighted) squared rounding error is kept
CLIP_STEP = 0.01
CLIP_MIN = 0.75


def qparams(
    w: torch.Tensor, bits: int, sym: bool, clip: bool = False, importance: torch.Tensor | None = None,
    compact: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of ``w`` [R, C] (each row is one group): float32 [R], float32 [R].

    With ``clip`` the range is not simply [min, max]: each row's range is shrunk by the factor (of
    a grid from 1 down to ``CLIP_MIN``) that minimizes ``sum_c importance[c] * (w - q(w))**2``;
    ``importance`` [C] (default all ones) weights the columns, e.g. by the Hessian diagonal, the
    energy of each column's input. Clipping a few large weights buys a finer grid for the rest.
    ``compact``: scales on the compact 8-bit grid (see the module docstring).
    """
    w = w.to(torch.float32)
    xmin = w.amin(dim=1).clamp(max=0)
    xmax = w.amax(dim=1).clamp(min=0)
    scale, zero = _range_qparams(xmin, xmax, bits, sym, compact)
    if not clip:
        return scale, zero
    imp = torch.ones(w.shape[1], dtype=torch.float32, device=w.device) if importance is None else importance.float()
    return clip_search(xmin, xmax, bits, sym, lambda s, z: _weighted_error(w, s, z, bits, imp), compact=compact)


def clip_search(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool, error, step: float = CLIP_STEP,
    compact: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping search: for every range ``[xmin, xmax]`` (any shape) the scale and zero point of the
    shrunk range ``p * [xmin, xmax]``, p = 1, 1 - step, ... down to CLIP_MIN, with the least
    ``error(scale, zero)`` (a tensor of the ranges' shape; the first p wins ties)."""
    scale, zero = _range_qparams(xmin, xmax, bits, sym, compact)
    best = error(scale, zero)
    for i in range(1, int(round((1 - CLIP_MIN) / step)) + 1):
        p = 1 - i * step
        s_p, z_p = _range_qparams(p * xmin, p * xmax, bits, sym, compact)
        err = error(s_p, z_p)
        better = err < best
        if better.any():
            best = torch.where(better, err, best)
            scale = torch.where(better, s_p, scale)
            zero = torch.where(better, z_p, zero)
    return scale, zero


def _weighted_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, imp: torch.Tensor) -> torch.Tensor:
    d = fake_quantize(w, scale.unsqueeze(1), zero.unsqueeze(1), bits).sub_(w)
    return (d * d) @ imp


def _range_qparams(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool,
                   compact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = (1 << bits) - 1
    if sym:
        amax = torch.maximum(xmin.abs(), xmax)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        scale = (xmax - xmin) / maxq
        zero = None
    dead = scale == 0
    scale = torch.where(dead, torch.ones_like(scale), scale)
    scale = scale.clamp(min=_MIN_SCALE)
    scale = snap_scales(scale) if compact else scale.to(torch.float16).to(torch.float32)
    if zero is None:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float32) of ``w`` under per-row ``scale``/``zero`` broadcast along the last dim."""
    maxq = (1 << bits) - 1
    return torch.clamp(torch.round(w.to(torch.float32) / scale) + zero, 0, maxq)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return (quantize_codes(w, scale, zero, bits) - zero) * scale
