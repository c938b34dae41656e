"""Round-to-nearest (RTN) quantization: of one weight matrix, and of a whole model as the ``rtn``
method; also the packing of any quantizer's codes into the stored format."""
from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from llmquant.config import LayerQuant, QuantConfig
from llmquant.formats.packing import num_groups, pack_rows
from llmquant.formats.rotation import rotate, unpack_signs
from llmquant.kernels.registry import PackedWeight
from llmquant.modules.walk import linear_weight, set_submodule
from llmquant.quantizers.grid import qparams, quantize_codes
from llmquant.quantizers.plan import (
    check_plan, dense_weight_check, rotation_signs, to_quant_linear, untie_if_quantizing_head,
)
from llmquant.registry import Method, register_method


def group_qparams(
    w: torch.Tensor, scheme: LayerQuant, clip: bool = False, importance: torch.Tensor | None = None,
    compact: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points of ``w`` [N, K] per (row, group): float32 [N, NG] each.

    A ragged last group is padded with zeros, which leaves its range unchanged because every grid
    includes 0. ``clip``/``importance`` [K]: search the clipping range (see :func:`qparams`);
    ``compact``: scales on the compact grid.
    """
    n, k = w.shape
    g = k if scheme.group_size == -1 else scheme.group_size
    ng = num_groups(k, scheme.group_size)
    padded = torch.zeros(n, ng * g, dtype=torch.float32, device=w.device)
    padded[:, :k] = w.to(torch.float32)
    if not clip:
        scale, zero = qparams(padded.view(n * ng, g), scheme.bits, scheme.sym, compact=compact)
        return scale.view(n, ng), zero.view(n, ng)
    imp = torch.ones(ng * g, dtype=torch.float32, device=w.device)
    if importance is not None:
        imp[:k] = importance.float()
    imp[k:] = 0  # the padding is not a weight
    scale = torch.empty(n, ng, dtype=torch.float32, device=w.device)
    zero = torch.empty_like(scale)
    for j in range(ng):  # one importance vector per group
        cols = slice(j * g, (j + 1) * g)
        scale[:, j], zero[:, j] = qparams(padded[:, cols], scheme.bits, scheme.sym, True, imp[cols], compact)
    return scale, zero


def expand_groups(t: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """[N, NG] per-group values -> [N, K] per-column values."""
    g = k if group_size == -1 else group_size
    return t.repeat_interleave(g, dim=1)[:, :k]


def make_packed(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    scheme: LayerQuant,
    perm: torch.Tensor | None = None,
) -> PackedWeight:
    """Store integer codes [N, K] (stored column order) with float32 scale/zero [N, NG]."""
    n, k = codes.shape
    return PackedWeight(
        qweight=pack_rows(codes.to(torch.int64), scheme.bits),
        scales=scale.to(torch.float16).contiguous(),
        zeros=None if scheme.sym else zero.to(torch.uint8).contiguous(),
        perm=None if perm is None else perm.to(torch.int32).contiguous(),
        bits=scheme.bits,
        group_size=scheme.group_size,
        in_features=k,
        out_features=n,
    )


def quantize_weight_rtn(w: torch.Tensor, scheme: LayerQuant, clip: bool = False, compact: bool = False) -> PackedWeight:
    """Round every weight of ``w`` [N, K] to the nearest point of its group's grid (with ``clip``:
    each group's range from the clipping search, unweighted, instead of [min, max]; ``compact``: scales
    on the compact grid)."""
    if w.dim() != 2:
        raise ValueError(f"expected a weight of shape [N, K], got {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weight has non-finite values (NaN or inf); refusing to quantize")
    n, k = w.shape
    scale, zero = group_qparams(w, scheme, clip=clip, compact=compact)
    codes = quantize_codes(w, expand_groups(scale, k, scheme.group_size), expand_groups(zero, k, scheme.group_size), scheme.bits)
    return make_packed(codes, scale, zero, scheme)


@register_method
class RTN(Method):
    """Every selected linear layer of any ``nn.Module``, rounded to nearest on its own; no data."""

    name = "rtn"
    description = "round-to-nearest, no calibration data"
    supports_mixed = True
    supports_rotation = True
    options = frozenset({"clip_search", "compact_qparams"})

    def check_model(self, model: nn.Module, config: QuantConfig) -> None:
        for name, mod, _ in check_plan(model, config):
            dense_weight_check(name, mod)

    def apply(self, model: nn.Module, config: QuantConfig, calibration, progress: bool) -> dict:
        todo = check_plan(model, config)
        t0 = time.perf_counter()
        # Quantize everything first and swap afterwards: a layer that cannot be quantized (NaN
        # weights) then leaves the model exactly as it was.
        packed = []
        for name, mod, scheme in tqdm(todo, desc="RTN quantize", disable=not progress, unit="layer"):
            w = linear_weight(mod).detach()
            signs = rotation_signs(config, name, w.shape[1])
            if signs is not None:  # the codes of W R (llmquant.formats.rotation)
                w = rotate(w.float(), unpack_signs(signs, w.shape[1]).to(w.device))
            try:
                packed.append(quantize_weight_rtn(w, scheme, clip=config.clip_search, compact=config.compact_qparams))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        untie_if_quantizing_head(model, config)
        for (name, mod, _), p in zip(todo, packed):
            set_submodule(model, name, to_quant_linear(mod, p, config, name))
        return {"method": self.name, "layers": len(todo), "seconds": time.perf_counter() - t0, "kept_float": []}
