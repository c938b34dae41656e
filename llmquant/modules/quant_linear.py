"""``QuantLinear``: a linear layer whose weight is stored packed (see :mod:`llmquant.formats.packing`).

The module holds exactly the checkpoint's tensors as buffers (``qweight``, ``scales``, optional
``zeros`` and ``perm``) plus an optional float ``bias``. Its forward goes through the kernel registry:
the first call with a given activation dtype/device picks a kernel and lets it derive its own layout
from the packed tensors; that derived state is cached on the module, never saved.
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from llmquant.config import LayerQuant
from llmquant.formats.packing import num_groups, packed_words
from llmquant.kernels.registry import PackedWeight, select_kernel


class CheckpointError(ValueError):
    """A quantized checkpoint is missing a tensor, or a tensor has the wrong shape, dtype or values."""


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: LayerQuant,
        *,
        bias: bool,
        has_perm: bool = False,
        bias_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        act_int8: bool = False,
    ) -> None:
        super().__init__()
        #: dynamic INT8 activations (QuantConfig.activations == "dynamic_int8"); LLMQUANT_ACTIVATIONS
        #: overrides it when the kernel is chosen
        self.act_int8 = act_int8
        self.in_features = in_features
        self.out_features = out_features
        self.bits = scheme.bits
        self.group_size = scheme.group_size
        self.sym = scheme.sym
        n, k = out_features, in_features
        ng = num_groups(k, scheme.group_size)
        self.register_buffer("qweight", torch.zeros(n, packed_words(k, self.bits), dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(n, ng, dtype=torch.float16, device=device))
        if not scheme.sym:
            self.register_buffer("zeros", torch.zeros(n, ng, dtype=torch.uint8, device=device))
        else:
            self.zeros = None
        if has_perm:
            self.register_buffer("perm", torch.arange(k, dtype=torch.int32, device=device))
        else:
            self.perm = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(n, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._kernel_cache: dict[Any, tuple[Any, Any]] = {}

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_packed(cls, w: PackedWeight, bias: torch.Tensor | None, sym: bool | None = None,
                    act_int8: bool = False) -> "QuantLinear":
        scheme = LayerQuant(w.bits, w.group_size, w.zeros is None if sym is None else sym)
        mod = cls(
            w.in_features,
            w.out_features,
            scheme,
            bias=bias is not None,
            has_perm=w.perm is not None,
            bias_dtype=bias.dtype if bias is not None else torch.float16,
            device=w.qweight.device,
            act_int8=act_int8,
        )
        mod.qweight.copy_(w.qweight)
        mod.scales.copy_(w.scales)
        if w.zeros is not None:
            mod.zeros.copy_(w.zeros)
        if w.perm is not None:
            mod.perm.copy_(w.perm)
        if bias is not None:
            mod.bias.data.copy_(bias.detach())
        return mod

    @property
    def scheme(self) -> LayerQuant:
        return LayerQuant(self.bits, self.group_size, self.sym)

    def packed(self) -> PackedWeight:
        return PackedWeight(
            qweight=self.qweight,
            scales=self.scales,
            zeros=self.zeros,
            perm=self.perm,
            bits=self.bits,
            group_size=self.group_size,
            in_features=self.in_features,
            out_features=self.out_features,
        )

    # --- validation -----------------------------------------------------------------------------
    def expected_tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        n, k = self.out_features, self.in_features
        ng = num_groups(k, self.group_size)
        exp = {
            "qweight": ((n, packed_words(k, self.bits)), torch.int32),
            "scales": ((n, ng), torch.float16),
        }
        if not self.sym:
            exp["zeros"] = ((n, ng), torch.uint8)
        if self.perm is not None:
            exp["perm"] = ((k,), torch.int32)
        return exp

    def validate(self, prefix: str = "") -> None:
        """Check the loaded tensors; raise :class:`CheckpointError` naming the tensor and problem."""
        where = f"{prefix}." if prefix else ""
        for name, (shape, dtype) in self.expected_tensors().items():
            t = getattr(self, name)
            if t is None:
                raise CheckpointError(f"{where}{name}: missing")
            if t.device.type == "meta":
                raise CheckpointError(f"{where}{name}: missing from the checkpoint (never loaded)")
            if tuple(t.shape) != shape:
                raise CheckpointError(f"{where}{name}: shape {tuple(t.shape)}, expected {shape}")
            if t.dtype != dtype:
                raise CheckpointError(f"{where}{name}: dtype {t.dtype}, expected {dtype}")
        s = self.scales
        if not torch.isfinite(s).all():
            bad = int((~torch.isfinite(s)).sum())
            raise CheckpointError(f"{where}scales: {bad} non-finite values (NaN or inf)")
        if self.zeros is not None and int(self.zeros.max()) > (1 << self.bits) - 1:
            raise CheckpointError(
                f"{where}zeros: value {int(self.zeros.max())} out of range for {self.bits}-bit codes"
            )
        if self.perm is not None:
            p = self.perm.to(torch.long)
            if not torch.equal(torch.sort(p).values, torch.arange(self.in_features, device=p.device)):
                raise CheckpointError(f"{where}perm: not a permutation of 0..{self.in_features - 1}")
        if self.bias is not None and not torch.isfinite(self.bias).all():
            raise CheckpointError(f"{where}bias: non-finite values")

    # --- compute --------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() / .bfloat16() change the activation dtype, not the stored format:
        # the fp16 scales keep their dtype (a trip through bf16 would round them) and only move device.
        self._kernel_cache = {}
        scales = self._buffers.pop("scales")
        try:
            super()._apply(fn, recurse)
        finally:
            moved = fn(scales)
            if moved.dtype != scales.dtype:
                moved = scales.to(device=moved.device)
            self._buffers["scales"] = moved
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel_cache = {}
        return super()._load_from_state_dict(*args, **kwargs)

    def invalidate_kernel(self) -> None:
        """Forget derived kernel state (call after changing the packed buffers in place)."""
        self._kernel_cache = {}

    def uses_act_int8(self) -> bool:
        """Dynamic INT8 activations: ``LLMQUANT_ACTIVATIONS`` ("float" / "dynamic_int8") if set, else the
        layer's own setting."""
        v = os.environ.get("LLMQUANT_ACTIVATIONS", "").strip()
        if not v:
            return self.act_int8
        if v not in ("float", "dynamic_int8"):
            raise ValueError(f"LLMQUANT_ACTIVATIONS={v!r}: expected 'float' or 'dynamic_int8'")
        return v == "dynamic_int8"

    def kernel_for(self, dtype: torch.dtype) -> tuple[Any, Any]:
        act_int8 = self.uses_act_int8()
        key = (dtype, self.qweight.device, act_int8)
        hit = self._kernel_cache.get(key)
        if hit is None:
            w = self.packed()
            kernel = select_kernel(w.spec(dtype, act_int8))
            hit = (kernel, kernel.prepare(w, act_int8))
            self._kernel_cache[key] = hit
        return hit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear: input has {x.shape[-1]} features, expected K={self.in_features}")
        kernel, state = self.kernel_for(x.dtype)
        return kernel.apply(state, x, self.bias)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros, self.perm) if t is not None)

    def extra_repr(self) -> str:
        g = self.group_size
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={g}, sym={self.sym}, act_order={self.perm is not None}, bias={self.bias is not None}"
            + (", activations=dynamic_int8" if self.act_int8 else "")
        )


def fp16_bytes(mod: nn.Module) -> int:
    """Bytes the layer's weight would take in fp16 (for compression ratios)."""
    return 2 * int(math.prod((mod.out_features, mod.in_features)))
