"""``QuantLinear``: a linear layer whose weight is stored packed (see :mod:`llmquant.formats.packing`).

The module holds the checkpoint's tensors as buffers (``qweight``, ``scales``, optional ``zeros``,
``perm`` and ``rot_signs``) plus an optional float ``bias``. A rotated layer (``rot_signs``,
:mod:`llmquant.formats.rotation`) rotates its input before the kernel sees it. Its forward goes
through the kernel registry: a kernel is picked per activation dtype/device and derives its own
layout from the packed tensors, once, at load (:func:`prepare_model`, which the loaders and
``llmquant.quantize`` call) or else at the first call; that derived state is cached on the module,
never saved. One copy in memory: when the kernel can give the codes back exactly (the CPU kernel's
layout holds every code), the module releases its packed ``qweight`` and rebuilds it only when asked
(``state_dict``, :meth:`packed`, ``.to()``).
"""
from __future__ import annotations

import logging
import math
import threading
import weakref
from typing import Any

import torch
from torch import nn

from llmquant.config import LayerQuant
from llmquant.formats.packing import (decode_qparams, encode_scales, num_groups, pack_zeros, packed_words,
                                      packed_zero_bytes, perm_dtype)
from llmquant.formats.rotation import rotatable, unpack_signs
from llmquant.kernels.cpu import rotate_input
from llmquant.kernels.registry import PackedWeight, env_switch, select_kernel


logger = logging.getLogger(__name__)
_warned: set[str] = set()  # reasons already logged, so a model's hundred layers warn once
#: per thread, the last input rotation: [weakref to x, its version, signs bytes, x R, its version]
_last_rotation = threading.local()


def _version(t: torch.Tensor) -> int | None:
    """The in-place version counter (None for inference-mode tensors, which have none)."""
    return None if t.is_inference() else t._version


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
        rotated: bool = False,
        compact: bool = False,
    ) -> None:
        super().__init__()
        #: the scales and zero points are stored compact (QuantConfig.compact_qparams): the buffers hold
        #: the checkpoint's uint8 scale codes and bit-packed zero points, decoded in :meth:`packed`
        self.compact = compact
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
        self.register_buffer("scales", torch.zeros(n, ng, dtype=torch.uint8 if compact else torch.float16, device=device))
        if not scheme.sym:
            zcols = packed_zero_bytes(ng, self.bits) if compact else ng
            self.register_buffer("zeros", torch.zeros(n, zcols, dtype=torch.uint8, device=device))
        else:
            self.zeros = None
        if has_perm:
            self.register_buffer("perm", torch.arange(k, dtype=perm_dtype(k, compact), device=device))
        else:
            self.perm = None
        if rotated:
            if not rotatable(k):
                raise ValueError(f"QuantLinear: a rotated layer needs K a multiple of 128, got K={k}")
            self.register_buffer("rot_signs", torch.zeros(-(-k // 8), dtype=torch.uint8, device=device))
        else:
            self.rot_signs = None
        #: the signs as +-1 floats and as bytes (which layers share them), derived at first use
        self._rot_state: tuple[torch.Tensor, bytes] | None = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(n, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._kernel_cache: dict[Any, tuple[Any, Any]] = {}
        #: (kernel, state) that can rebuild ``qweight``, once the packed codes were released
        self._qweight_from: tuple[Any, Any] | None = None

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_packed(cls, w: PackedWeight, bias: torch.Tensor | None, sym: bool | None = None,
                    act_int8: bool = False, rot_signs: torch.Tensor | None = None,
                    compact: bool = False) -> "QuantLinear":
        """``rot_signs``: the layer's codes are those of the rotated weight (see the module docstring).
        ``compact``: store the scales and zero points compact; the scales must lie on the compact grid
        (quantized with ``compact_qparams``), else ValueError."""
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
            rotated=rot_signs is not None,
            compact=compact,
        )
        mod.qweight.copy_(w.qweight)
        mod.scales.copy_(encode_scales(w.scales) if compact else w.scales)
        if w.zeros is not None:
            mod.zeros.copy_(pack_zeros(w.zeros, w.bits) if compact else w.zeros)
        if w.perm is not None:
            mod.perm.copy_(w.perm)
        if rot_signs is not None:
            mod.rot_signs.copy_(rot_signs)
        if bias is not None:
            mod.bias.data.copy_(bias.detach())
        return mod

    @property
    def scheme(self) -> LayerQuant:
        return LayerQuant(self.bits, self.group_size, self.sym)

    def packed(self) -> PackedWeight:
        """The layer's tensors in the plain form every kernel takes (compact ones decoded)."""
        scales, zeros = decode_qparams(self.scales, self.zeros, self.bits) if self.compact else (self.scales, self.zeros)
        return PackedWeight(
            qweight=self.packed_qweight(),
            scales=scales,
            zeros=zeros,
            perm=None if self.perm is None else self.perm.to(torch.int32),
            bits=self.bits,
            group_size=self.group_size,
            in_features=self.in_features,
            out_features=self.out_features,
        )

    # --- one copy of the codes in memory --------------------------------------------------------
    @property
    def qweight_released(self) -> bool:
        return self._qweight_from is not None

    def packed_qweight(self) -> torch.Tensor:
        """The stored qweight: the buffer, or rebuilt from the kernel's layout if it was released."""
        if self._qweight_from is None:
            return self.qweight
        kernel, state = self._qweight_from
        return kernel.unpack_qweight(state)

    def _restore_qweight(self) -> None:
        if self._qweight_from is not None:
            self._buffers["qweight"] = self.packed_qweight()
            self._qweight_from = None

    def _release_qweight(self, kernel: Any, state: Any) -> None:
        if self._qweight_from is None and hasattr(kernel, "unpack_qweight"):
            self._qweight_from = (kernel, state)
            self._buffers["qweight"] = torch.empty(0, dtype=torch.int32)
            # the loader may hand out tensors that are views of the memory-mapped checkpoint file: own
            # copies of the small ones let the mapping (and its resident pages) go
            for name in ("scales", "zeros", "perm", "rot_signs"):
                t = self._buffers.get(name)
                if t is not None:
                    self._buffers[name] = t.clone()

    def __getstate__(self):
        """Copies and pickles carry the stored tensors, not the kernel's derived state (which holds raw
        pointers): they prepare their own kernel when first used."""
        state = self.__dict__.copy()
        if self._qweight_from is not None:
            state["_buffers"] = dict(state["_buffers"], qweight=self.packed_qweight())
        state["_kernel_cache"] = {}
        state["_qweight_from"] = None
        return state

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._qweight_from is not None:
            destination[prefix + "qweight"] = self.packed_qweight()

    # --- validation -----------------------------------------------------------------------------
    def expected_tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        n, k = self.out_features, self.in_features
        ng = num_groups(k, self.group_size)
        exp = {
            "qweight": ((n, packed_words(k, self.bits)), torch.int32),
            "scales": ((n, ng), torch.uint8 if self.compact else torch.float16),
        }
        if not self.sym:
            exp["zeros"] = ((n, packed_zero_bytes(ng, self.bits) if self.compact else ng), torch.uint8)
        if self.perm is not None:
            exp["perm"] = ((k,), perm_dtype(k, self.compact))
        if self.rot_signs is not None:
            exp["rot_signs"] = ((-(-k // 8),), torch.uint8)
        return exp

    @staticmethod
    def stored_dtype_ok(name: str, dtype: torch.dtype, expected: torch.dtype) -> bool:
        """Whether the stored tensor ``name`` (expected: :meth:`expected_tensors`' ``expected``) may have
        ``dtype``: the expected one, or for a compact layer's perm also int32 (compact checkpoints written
        before the int16 perm)."""
        return dtype == expected or (name == "perm" and dtype == torch.int32)

    def validate(self, prefix: str = "") -> None:
        """Check the loaded tensors; raise :class:`CheckpointError` naming the tensor and problem."""
        where = f"{prefix}." if prefix else ""
        for name, (shape, dtype) in self.expected_tensors().items():
            t = self.packed_qweight() if name == "qweight" else getattr(self, name)
            if t is None:
                raise CheckpointError(f"{where}{name}: missing")
            if t.device.type == "meta":
                raise CheckpointError(f"{where}{name}: missing from the checkpoint (never loaded)")
            if tuple(t.shape) != shape:
                raise CheckpointError(f"{where}{name}: shape {tuple(t.shape)}, expected {shape}")
            if not self.stored_dtype_ok(name, t.dtype, dtype):
                raise CheckpointError(f"{where}{name}: dtype {t.dtype}, expected {dtype}")
        # compact scale codes and zero points have no invalid values: every code decodes to a finite
        # scale, every bit field holds a zero point below 2**bits
        if not self.compact:
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
        self._restore_qweight()
        self._kernel_cache = {}
        self._rot_state = None
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
        if self._qweight_from is not None:  # a buffer of the stored shape to load into
            shape, dtype = self.expected_tensors()["qweight"]
            self._buffers["qweight"] = torch.zeros(shape, dtype=dtype)
            self._qweight_from = None
        self._kernel_cache = {}
        self._rot_state = None
        return super()._load_from_state_dict(*args, **kwargs)

    def invalidate_kernel(self) -> None:
        """Forget derived kernel state (call after changing the packed buffers in place)."""
        self._restore_qweight()
        self._kernel_cache = {}
        self._rot_state = None

    def uses_act_int8(self) -> bool:
        """Dynamic INT8 activations: ``LLMQUANT_ACTIVATIONS`` ("float" / "dynamic_int8") if set, else the
        layer's own setting."""
        v = env_switch("LLMQUANT_ACTIVATIONS")
        if not v:
            return self.act_int8
        if v not in ("float", "dynamic_int8"):
            raise ValueError(f"LLMQUANT_ACTIVATIONS={v!r}: expected 'float' or 'dynamic_int8'")
        return v == "dynamic_int8"

    def kernel_for(self, dtype: torch.dtype) -> tuple[Any, Any]:
        """(kernel, its state) for activations of ``dtype``: picked and prepared once, then cached."""
        act_int8 = self.uses_act_int8()
        scales = self._buffers.get("scales")  # nn.Module.__getattr__ costs about 1 us a call
        device = (scales if scales is not None else self.scales).device
        key = (dtype, device, act_int8)
        hit = self._kernel_cache.get(key)
        if hit is None:
            w = self.packed()
            kernel = select_kernel(w.spec(dtype, act_int8))
            hit = (kernel, kernel.prepare(w, act_int8))
            self._kernel_cache[key] = hit
            if kernel.name == "reference" and device.type == "cpu":
                _warn_once("reference-on-cpu", "quantized layers run on the slow reference kernel (dequantize, then "
                           f"F.linear), first {w.spec(dtype, act_int8)}; LLMQUANT_KERNEL=cpu says why the CPU kernel "
                           "refuses (llmquant.kernels.registry)")
            self._release_qweight(*hit)
        return hit

    def kernel_description(self, dtype: torch.dtype) -> str:
        """What runs this layer for ``dtype`` activations, e.g. "cpu (avx2, int8 activations)"."""
        kernel, state = self.kernel_for(dtype)
        describe = getattr(kernel, "describe", None)
        return describe(state) if describe else kernel.name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear: input has {x.shape[-1]} features, expected K={self.in_features}")
        kernel, state = self.kernel_for(x.dtype)
        if self.rot_signs is not None:
            x = self.rotate_input(x)
        return kernel.apply(state, x, self.bias)

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x R`` for a rotated layer (what its codes multiply), else x."""
        if self.rot_signs is None:
            return x
        state = self._rot_state
        if state is None or state[0].device != x.device:
            key = bytes(self.rot_signs.cpu().numpy())
            state = self._rot_state = (unpack_signs(self.rot_signs, self.in_features).to(x.device), key)
        d, key = state
        if x.requires_grad or torch.compiler.is_compiling():
            return rotate_input(x, d)
        # layers that read one tensor and share their signs (q/k/v, gate/up: llmquant draws one vector
        # for them) rotate it once. The last rotation is kept for as long as x lives (a weak reference;
        # when x is freed the entry empties and x R goes with it, so nothing outlives the forward pass),
        # with both tensors' version counters: an in-place change makes it stale (inference-mode tensors
        # have none; there the reuse relies on nobody changing a layer's input in place between two
        # sibling layers' calls)
        last = getattr(_last_rotation, "entry", None)
        if last:
            xref, lversion, lkey, y, yversion = last
            if xref() is x and lkey == key and lversion == _version(x) and yversion == _version(y):
                return y
            last.clear()
        y = rotate_input(x, d)
        entry = [weakref.ref(x), _version(x), key, y, _version(y)]
        weakref.finalize(x, entry.clear)
        _last_rotation.entry = entry
        return y

    def weight_bytes(self) -> int:
        """Bytes of the stored tensors (codes, scales, zero points, perm, rotation signs)."""
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.expected_tensors().values())

    def extra_repr(self) -> str:
        g = self.group_size
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={g}, sym={self.sym}, act_order={self.perm is not None}, bias={self.bias is not None}"
            + (", rotation=hadamard" if self.rot_signs is not None else "")
            + (", activations=dynamic_int8" if self.act_int8 else "")
            + (", compact_qparams" if self.compact else "")
        )


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning("%s", message)


def prepare_model(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, int]:
    """Pick and prepare the kernel of every QuantLinear for activations of ``dtype`` (default: the dtype
    of the model's float parameters), now rather than in the first forward. Returns how many layers run
    on each kernel (``"cpu (avx2)"``: count); it is also logged."""
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    counts: dict[str, int] = {}
    for mod in model.modules():
        if isinstance(mod, QuantLinear) and getattr(mod, "serves_head", True):  # a lookup-only embedding: no kernel
            d = mod.kernel_description(dtype)
            counts[d] = counts.get(d, 0) + 1
    if counts:
        logger.info("quantized layers (%s activations): %s", str(dtype).replace("torch.", ""),
                    ", ".join(f"{n} on {d}" for d, n in counts.items()))
        _return_freed_memory()
    return counts


def _return_freed_memory() -> None:
    """Preparing a model frees as much as it allocates (the packed codes, repacking scratch); glibc keeps
    freed memory in its arenas unless asked to give it back. Best effort, Linux/glibc only."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def fp16_bytes(mod: nn.Module) -> int:
    """Bytes the layer's weight would take in fp16 (for compression ratios)."""
    return 2 * int(math.prod((mod.out_features, mod.in_features)))
