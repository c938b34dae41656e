"""Input rotation of quantized layers: a randomized block Hadamard transform (``rotation="hadamard"``).

A rotated layer stores the codes of ``W' = W R`` instead of ``W``, and multiplies ``x' = x R`` with them:
``x' W'^T = x R R^T W^T = x W^T`` because ``R`` is orthogonal. ``R = diag(d) B``: ``d`` is a vector of
random signs (one per input column) and ``B`` is block diagonal, one normalized Sylvester Hadamard
matrix ``H / sqrt(128)`` per 128 consecutive columns (``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]``).
Spreading every weight over its 128-column block makes the groups' value distributions near-Gaussian
and removes most outliers, so the same grid loses less (the incoherence processing of QuIP/QuaRot).

Stored format (one extra tensor per rotated layer): ``rot_signs`` uint8 ``[K / 8]``; bit ``j``
(least significant first) of byte ``i`` set means ``d[8 i + j] = -1``. Only layers whose ``K`` is a
multiple of 128 are rotated, and never the output layer or the embedding table. The order of
operations at run time is: rotate x, then (act-order) gather ``x'[perm]``, then the packed GEMM.

The signs are drawn once, when a layer is quantized, from a generator seeded by the name of the
layer's input (:func:`layer_signs`): the layers that vLLM fuses because they read one tensor (q/k/v,
gate/up) get one sign vector, so a fused layer rotates its input once. A checkpoint carries the signs,
so loading never draws them again, and readers make no assumption about which layers share them.
"""
from __future__ import annotations

import math
import zlib

import torch

#: columns per Hadamard block
BLOCK = 128
#: the rotations QuantConfig.rotation accepts
ROTATIONS = ("hadamard",)

_H: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def rotatable(in_features: int) -> bool:
    """Whether a layer with ``in_features`` input columns can be rotated (whole 128-column blocks)."""
    return in_features >= BLOCK and in_features % BLOCK == 0


def hadamard(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix of order :data:`BLOCK` (symmetric and orthogonal)."""
    device = torch.device(device)
    key = (dtype, device)
    h = _H.get(key)
    if h is None:
        m = torch.ones(1, 1, dtype=torch.float64)
        while m.shape[0] < BLOCK:
            m = torch.cat([torch.cat([m, m], 1), torch.cat([m, -m], 1)], 0)
        h = (m / math.sqrt(BLOCK)).to(dtype=dtype, device=device)
        _H[key] = h
    return h


def pack_signs(negative: torch.Tensor) -> torch.Tensor:
    """bool [K] (True: the column's sign is -1) -> the stored uint8 [ceil(K / 8)]."""
    k = negative.numel()
    bits = torch.zeros(-(-k // 8) * 8, dtype=torch.uint8)
    bits[:k] = negative.reshape(-1).to(torch.uint8).cpu()
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (bits.view(-1, 8) * weights).sum(1, dtype=torch.int32).to(torch.uint8)


def unpack_signs(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The stored uint8 signs -> ``d`` as ``dtype`` [K] of +1 and -1, on the tensor's device."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != -(-in_features // 8):
        raise ValueError(f"rot_signs: expected uint8 [{-(-in_features // 8)}] for K={in_features}, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    neg = ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[:in_features]
    return (1 - 2 * neg.to(torch.int8)).to(dtype)


#: layers that read one input tensor and that vLLM fuses (its ``packed_modules_mapping`` names): they
#: draw their signs under the fused layer's name
FUSED_INPUTS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def input_name(name: str) -> str:
    """The name :func:`layer_signs` draws under: ``name`` with a fused part (``q_proj``) replaced by
    its fused layer (``qkv_proj``)."""
    head, dot, last = name.rpartition(".")
    return head + dot + FUSED_INPUTS.get(last, last)


def layer_signs(name: str, in_features: int, seed: int = 0) -> torch.Tensor:
    """The stored signs a newly quantized layer ``name`` gets (deterministic in :func:`input_name` and
    seed: q/k/v of one block share theirs, as do gate/up)."""
    g = torch.Generator().manual_seed((zlib.crc32(input_name(name).encode()) + 1_000_003 * seed) % (1 << 63))
    return pack_signs(torch.randint(0, 2, (in_features,), generator=g).bool())


def rotate(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``x R`` for x [..., K] and the sign vector ``d`` [K] (K a multiple of 128), in x's dtype.
    Low-precision inputs are rotated in float32."""
    k = x.shape[-1]
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    h = hadamard(work.dtype, work.device)
    y = ((work * d.to(work.dtype)).reshape(*x.shape[:-1], k // BLOCK, BLOCK) @ h).reshape(x.shape)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def unrotate(y: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``y R^T`` (the inverse of :func:`rotate`): for a rotated weight, the weight it stands for."""
    k = y.shape[-1]
    work = y if y.dtype in (torch.float32, torch.float64) else y.float()
    h = hadamard(work.dtype, work.device)
    x = (work.reshape(*y.shape[:-1], k // BLOCK, BLOCK) @ h).reshape(y.shape) * d.to(work.dtype)
    return x if x.dtype == y.dtype else x.to(y.dtype)


def rotate_hessian(h: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``R^T H R``: the Hessian ``X^T X`` of the rotated inputs ``X R``, from that of ``X``."""
    hr = rotate(h, d)  # H R
    return rotate(hr.t().contiguous(), d).t().contiguous()  # (H R)^T R = R^T H R, symmetric
