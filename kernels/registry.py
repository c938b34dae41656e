"""One registry that picks the kernel for each quantized linear layer.

Every kernel states what it can run (``can_implement(spec) -> (ok, reason)``); the registry asks the
kernels in priority order and takes the first that accepts. When none does, the error lists every
kernel's reason. Two environment variables steer the choice (read at selection time):

* ``LLMQUANT_KERNEL=<name>``: use this kernel or fail with its reason (no silent fallback);
* ``LLMQUANT_DISABLE_KERNELS=<name>[,<name>...]``: never use these.

The pure-torch reference kernel (``"reference"``) is always registered, accepts everything, and is
what every other kernel is tested against.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelSpec:
    """What a kernel must run: one quantized layer, and the activations it will see."""

    bits: int
    group_size: int  # -1: one group per row
    sym: bool
    in_features: int  # K
    out_features: int  # N
    has_perm: bool
    dtype: torch.dtype  # activation dtype
    device_type: str  # "cpu", "cuda", ...
    #: dynamic INT8 activations (:mod:`llmquant.kernels.act_int8`): a kernel runs them exactly as
    #: defined there, or refuses
    act_int8: bool = False


@dataclass
class PackedWeight:
    """The stored tensors of one quantized layer, exactly as in the checkpoint (see formats.packing)."""

    qweight: torch.Tensor  # int32 [N, ceil(K/32)*bits]
    scales: torch.Tensor  # fp16 [N, NG]
    zeros: torch.Tensor | None  # uint8 [N, NG] (asymmetric) or None
    perm: torch.Tensor | None  # int32 [K] (act-order) or None
    bits: int
    group_size: int
    in_features: int
    out_features: int

    def spec(self, dtype: torch.dtype, act_int8: bool = False) -> KernelSpec:
        return KernelSpec(
            bits=self.bits,
            group_size=self.group_size,
            sym=self.zeros is None,
            in_features=self.in_features,
            out_features=self.out_features,
            has_perm=self.perm is not None,
            dtype=dtype,
            device_type=self.qweight.device.type,
            act_int8=act_int8,
        )


class Kernel(Protocol):
    name: str

    def can_implement(self, spec: KernelSpec) -> tuple[bool, str]: ...

    def prepare(self, w: PackedWeight, act_int8: bool = False) -> Any:
        """Derive the kernel's own layout once, at load (never written to disk)."""

    def apply(self, state: Any, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x`` [..., K] in the spec's dtype -> [..., N] in the same dtype."""


class NoKernelError(RuntimeError):
    pass


_KERNELS: list[tuple[int, Kernel]] = []


def register_kernel(kernel: Kernel, priority: int) -> Kernel:
    """Register ``kernel``; higher priority is asked first. Re-registering a name replaces it."""
    global _KERNELS
    _KERNELS = [(p, k) for p, k in _KERNELS if k.name != kernel.name]
    _KERNELS.append((priority, kernel))
    _KERNELS.sort(key=lambda pk: -pk[0])
    return kernel


def kernels() -> list[Kernel]:
    _ensure_builtin()
    return [k for _, k in _KERNELS]


def get_kernel(name: str) -> Kernel:
    for k in kernels():
        if k.name == name:
            return k
    raise NoKernelError(f"no kernel named {name!r}; registered: {[k.name for k in kernels()]}")


# os.environ.get() of a variable that is not set raises and catches a KeyError inside it, about 1 us;
# a decode step reads the kernels' switches hundreds of times, so on POSIX env_switch() looks in the
# dict of bytes that os.environ keeps current (os.environ[...] = and monkeypatch.setenv update it)
_ENVIRON_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None
if not isinstance(_ENVIRON_BYTES, dict):
    _ENVIRON_BYTES = None
_env_key = functools.cache(os.fsencode)


def env_switch(name: str) -> str:
    """``os.environ.get(name, "").strip()``, about ten times faster where the variable is not set."""
    if _ENVIRON_BYTES is not None:
        v = _ENVIRON_BYTES.get(_env_key(name))
        return os.fsdecode(v).strip() if v is not None else ""
    return os.environ.get(name, "").strip()


def select_kernel(spec: KernelSpec) -> Kernel:
    forced = env_switch("LLMQUANT_KERNEL")
    disabled = {s.strip() for s in env_switch("LLMQUANT_DISABLE_KERNELS").split(",") if s.strip()}
    if forced:
        k = get_kernel(forced)
        ok, why = k.can_implement(spec)
        if not ok:
            raise NoKernelError(f"LLMQUANT_KERNEL={forced} cannot run {spec}: {why}")
        return k
    reasons = []
    for k in kernels():
        if k.name in disabled:
            reasons.append(f"{k.name}: disabled by LLMQUANT_DISABLE_KERNELS")
            continue
        ok, why = k.can_implement(spec)
        if ok:
            return k
        reasons.append(f"{k.name}: {why}")
    raise NoKernelError(f"no kernel can run {spec}:\n  " + "\n  ".join(reasons))


_BUILTIN_LOADED = False


def _ensure_builtin() -> None:
    # Deferred so that importing the registry never compiles or loads native code.
    global _BUILTIN_LOADED
    if _BUILTIN_LOADED:
        return
    _BUILTIN_LOADED = True
    from llmquant.kernels import builtin  # noqa: F401  (registers the built-in kernels)
