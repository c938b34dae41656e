"""Candidate schemes of mixed precision and their exact cost in stored bytes."""
from __future__ import annotations

from itertools import product

from llmquant.config import LayerQuant
from llmquant.formats.packing import num_groups, packed_words, packed_zero_bytes, perm_dtype

#: the schemes a layer may get by default: every bit width of the format, every group size, both
#: symmetric and asymmetric
DEFAULT_BITS = (2, 3, 4, 8)
DEFAULT_GROUP_SIZES = (32, 64, 128, -1)


def candidates(bits=DEFAULT_BITS, group_sizes=DEFAULT_GROUP_SIZES, sym=(True, False)) -> list[LayerQuant]:
    """Every (bits, group size, sym) combination, as validated :class:`LayerQuant` schemes."""
    return [LayerQuant(b, g, s) for b, g, s in product(bits, group_sizes, sym)]


def scheme_key(s: LayerQuant) -> str:
    """A short stable name: ``4g128s`` (symmetric), ``3g64a`` (asymmetric), ``8gchs`` (per channel)."""
    g = "ch" if s.group_size == -1 else str(s.group_size)
    return f"{s.bits}g{g}{'s' if s.sym else 'a'}"


def parse_scheme_key(key: str) -> LayerQuant:
    try:
        bits, rest = key.split("g", 1)
        g, kind = rest[:-1], rest[-1]
        if kind not in "sa":
            raise ValueError
        return LayerQuant(int(bits), -1 if g == "ch" else int(g), kind == "s")
    except ValueError:
        raise ValueError(f"not a scheme key: {key!r} (expected e.g. '4g128s', '3g64a', '8gchs')") from None


def layer_bytes(n: int, k: int, scheme: LayerQuant, perm: bool, rotated: bool = False, compact: bool = False) -> int:
    """Bytes of the tensors a quantized [N, K] layer stores (format v1): qweight, scales, zeros
    (asymmetric), perm (act-order without static groups), rot_signs (rotated); ``compact``: the compact
    scales, zero points and perm (``QuantConfig.compact_qparams``). A bias is the float layer's, not counted."""
    ng = num_groups(k, scheme.group_size)
    if compact:
        group_params = n * ng + (0 if scheme.sym else n * packed_zero_bytes(ng, scheme.bits))
    else:
        group_params = n * ng * 2 + (0 if scheme.sym else n * ng)
    perm_bytes = perm_dtype(k, compact).itemsize * k if perm else 0
    return n * packed_words(k, scheme.bits) * 4 + group_params + perm_bytes + (-(-k // 8) if rotated else 0)
