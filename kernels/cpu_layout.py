"""The CPU kernel's run-time weight layout, derived from the stored format at load (never saved).

Rows are cut into tiles of 4 output channels (N padded with zero rows), columns padded to
Kp = ceil(K / 32) * 32 with code 0. Per tile, one contiguous byte run: every superblock of 128
columns (4 rows x 64 bytes at 4 bits, x 128 bytes at 8 bits), then the tail (Kp % 128 columns).
The exact byte order, and why, is documented at the top of ``kernels/csrc/lq_cpu.h``; in short:

* 4-bit superblock: 32 little-endian uint16 words per row; nibble s of word w is column
  ``base + 32*s + w`` (one shift + one table lookup yields 32 consecutive columns);
* 4-bit tail: 16 bytes per block of 32 columns; byte b holds columns 2b (low) and 2b+1 (high);
* 8-bit: per block of 32 columns, the 16 even columns' bytes, then the 16 odd ones'.

* 2- and 3-bit superblock, arranged so that the decode kernels get the 4-bit row's byte positions
  (low and high nibbles apart, "lo" and "hi") with a shift and a mask per vector. 2-bit: 32 bytes a
  row, bit pair f of byte b is the low (f < 2) or high nibble of 4-bit byte 32 (f % 2) + b. 3-bit:
  48 bytes a row, A = bytes 0..31 and C = 32..47: byte b of A holds lo[b] (bits 0-2), lo[32 + b]
  (bits 3-5) and the low two bits of hi[b] (bits 6-7); byte k of C holds hi[32 + k] (bits 0-2),
  hi[48 + k] (bits 3-5) and the third bits of hi[k] (bit 6) and hi[16 + k] (bit 7). The tail is
  stored as 4-bit. The integer
  GEMV (decode) reads them as they are; the other paths expand a few tiles at a time into the 4-bit
  layout, in cache. Such a layer's memory and bytes read per token are its packed size.

Scales stay fp16, as [ntiles, NG, 4]; zero points (asymmetric) uint8 [ntiles, NG, 4]; a symmetric
layer's zero point is ``2**(bits-1)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmquant.formats.packing import num_groups, packed_words, unpack_rows
from llmquant.kernels.cpu_native import Weights
from llmquant.kernels.registry import PackedWeight

TILE = 4  # output rows per tile
SB = 128  # columns per superblock
BLK = 32  # columns per block; K is padded to a multiple of it
_CHUNK_CODES = 1 << 22  # rows are repacked in chunks of about this many codes (bounds the memory peak)


@dataclass(frozen=True)
class CpuLayout:
    """One layer in the CPU layout. Checked on construction; immutable (the native library holds
    raw pointers to its tensors through ``native``)."""

    qdata: torch.Tensor  # uint8 [ntiles, tile_bytes(Kp, bits)]
    scales: torch.Tensor  # fp16 [ntiles, NG, 4]
    zeros: torch.Tensor | None  # uint8 [ntiles, NG, 4], asymmetric only
    perm: torch.Tensor | None  # int64 [K], act-order only: y = x[..., perm] @ W.T
    bits: int  # the stored bit width (2, 3, 4 or 8)
    in_features: int  # K
    out_features: int  # N
    group_size: int  # G, -1 for one group per row
    native: Weights = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n, k, g = self.out_features, self.in_features, self.group_size
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8, got {self.bits}")
        if n < 1 or k < 1 or (g != -1 and g < 1):
            raise ValueError(f"invalid layer: N={n}, K={k}, group_size={g}")
        nt, ng = -(-n // TILE), num_groups(k, g)
        expect = {
            "qdata": ((nt, tile_bytes(padded_k(k), self.bits)), torch.uint8),
            "scales": ((nt, ng, TILE), torch.float16),
            "zeros": ((nt, ng, TILE), torch.uint8),
            "perm": ((k,), torch.int64),
        }
        for name, (shape, dtype) in expect.items():
            t = getattr(self, name)
            if t is None:
                if name in ("qdata", "scales"):
                    raise ValueError(f"{name} is required")
                continue
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(
                    f"{name}: expected {dtype} {shape} for N={n}, K={k}, bits={self.bits}, group_size={g}; "
                    f"got {t.dtype} {tuple(t.shape)}"
                )
            if t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError(f"{name} must be a contiguous CPU tensor (got {t.device}, contiguous={t.is_contiguous()})")
        w = Weights(
            self.qdata.data_ptr(), self.scales.data_ptr(), None if self.zeros is None else self.zeros.data_ptr(),
            n, k, g, self.bits, self.zero_point,
        )  # fmt: skip
        object.__setattr__(self, "native", w)

    @property
    def zero_point(self) -> int:
        """The implicit zero point of a symmetric layer."""
        return 1 << (self.bits - 1)

    def nbytes(self) -> int:
        """Bytes the kernel reads per call: codes, scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.qdata, self.scales, self.zeros) if t is not None)


def padded_k(k: int) -> int:
    return -(-k // BLK) * BLK


def tile_bytes(kp: int, bits: int) -> int:
    """Bytes of one tile (4 rows of Kp columns): superblocks at ``bits`` a code, the tail at 4 or 8."""
    nsb, tail = divmod(kp, SB)
    return TILE * (nsb * SB * bits + tail * (8 if bits == 8 else 4)) // 8


def _positions_from_nibbles(m: torch.Tensor) -> torch.Tensor:
    """Codes [..., s=4, w=32] -> [..., h=2, j=64]: the low (h = 0) and high nibble of byte j of the
    4-bit row, i.e. code s = 2 (j % 2) + h of word j // 2 (the kernels' lo and hi vectors)."""
    v = m.unflatten(-2, (2, 2))  # [..., e, h, w] with s = 2e + h
    return v.permute(*range(v.dim() - 3), -2, -1, -3).flatten(-2)  # [..., h, w, e] -> [..., h, j = 2w + e]


def _nibbles_from_positions(v: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_positions_from_nibbles`."""
    m = v.unflatten(-1, (32, 2))  # [..., h, w, e]
    return m.permute(*range(m.dim() - 3), -1, -3, -2).flatten(-3, -2)  # [..., e, h, w] -> [..., s, w]


def _planes_from_nibbles(m: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [..., s=4, w=32] of row-superblocks -> their packed 2- or 3-bit bytes [..., 32 or 48]
    (the module docstring; lq_cpu.h)."""
    v = _positions_from_nibbles(m)
    if bits == 2:
        pairs = v.unflatten(-1, (2, 32)).flatten(-3, -2)  # [..., f = 2h + half, b]
        return pairs[..., 0, :] | (pairs[..., 1, :] << 2) | (pairs[..., 2, :] << 4) | (pairs[..., 3, :] << 6)
    lo, hi = v[..., 0, :], v[..., 1, :]
    a = lo[..., :32] | (lo[..., 32:] << 3) | ((hi[..., :32] & 3) << 6)
    third = hi[..., :32] >> 2
    c = hi[..., 32:48] | (hi[..., 48:] << 3) | (third[..., :16] << 6) | (third[..., 16:] << 7)
    return torch.cat((a, c), dim=-1)


def _nibbles_from_planes(b: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_planes_from_nibbles`: bytes [..., 32 or 48] -> codes [..., s=4, w=32]."""
    if bits == 2:
        pairs = torch.stack([(b >> (2 * f)) & 3 for f in range(4)], dim=-2)  # [..., f, b]
        return _nibbles_from_positions(pairs.unflatten(-2, (2, 2)).flatten(-2))  # [..., h, j = 32 half + b]
    a, c = b[..., :32], b[..., 32:48]
    lo = torch.cat((a & 7, (a >> 3) & 7), dim=-1)
    third = torch.cat(((c >> 6) & 1, (c >> 7) & 1), dim=-1)
    hi = torch.cat(((a >> 6) | (third << 2), c & 7, (c >> 3) & 7), dim=-1)
    return _nibbles_from_positions(torch.stack((lo, hi), dim=-2))


def _tiles_from_codes(c: torch.Tensor, code_bits: int) -> torch.Tensor:
    """uint8 codes [nt * 4, Kp] -> the tiles' bytes [nt, tile_bytes(Kp, code_bits)]."""
    nt, kp = c.shape[0] // TILE, c.shape[1]
    nsb, tail = divmod(kp, SB)
    c = c.view(nt, TILE, kp)
    main, rest = c[:, :, : nsb * SB], c[:, :, nsb * SB :]
    if code_bits in (2, 3):
        m = main.reshape(nt, TILE, nsb, 4, 32).permute(0, 2, 1, 3, 4)  # [t, sb, r, s, w]
        main_b = _planes_from_nibbles(m, code_bits).reshape(nt, nsb * TILE * SB * code_bits // 8)
        r = rest.reshape(nt, TILE, tail // BLK, 16, 2)
        tail_b = (r[..., 0] | (r[..., 1] << 4)).reshape(nt, TILE * tail // 2)
    elif code_bits == 4:
        m = main.reshape(nt, TILE, nsb, 4, 32)  # [t, r, sb, s, w]: column sb*128 + 32s + w
        word = torch.stack((m[:, :, :, 0] | (m[:, :, :, 1] << 4), m[:, :, :, 2] | (m[:, :, :, 3] << 4)), dim=-1)
        main_b = word.permute(0, 2, 1, 3, 4).reshape(nt, nsb * TILE * 64)  # [t, sb, r, w, byte]
        r = rest.reshape(nt, TILE, tail // BLK, 16, 2)  # [t, r, p, b, parity]
        tail_b = (r[..., 0] | (r[..., 1] << 4)).reshape(nt, TILE * tail // 2)
    else:
        m = main.reshape(nt, TILE, nsb, 4, 16, 2)  # [t, r, sb, block, i, parity]: column 2i + parity
        main_b = m.permute(0, 2, 1, 3, 5, 4).reshape(nt, nsb * TILE * SB)
        r = rest.reshape(nt, TILE, tail // BLK, 16, 2)
        tail_b = r.permute(0, 1, 2, 4, 3).reshape(nt, TILE * tail)
    return torch.cat((main_b, tail_b), dim=1)


def _codes_from_tiles(b: torch.Tensor, kp: int, code_bits: int) -> torch.Tensor:
    """Inverse of :func:`_tiles_from_codes`: the tiles' bytes [nt, ...] -> uint8 codes [nt * 4, Kp]."""
    nt = b.shape[0]
    nsb, tail = divmod(kp, SB)
    if code_bits in (2, 3):
        split = nsb * TILE * SB * code_bits // 8
        main_b, tail_b = b[:, :split], b[:, split:]
        m = _nibbles_from_planes(main_b.reshape(nt, nsb, TILE, SB * code_bits // 8), code_bits)  # [t, sb, r, s, w]
        main = m.permute(0, 2, 1, 3, 4).reshape(nt, TILE, nsb * SB)
        r = tail_b.reshape(nt, TILE, tail // BLK, 16)
        rest = torch.stack((r & 15, r >> 4), dim=-1).reshape(nt, TILE, tail)
    elif code_bits == 4:
        main_b, tail_b = b[:, : nsb * TILE * 64], b[:, nsb * TILE * 64 :]
        word = main_b.reshape(nt, nsb, TILE, 32, 2).permute(0, 2, 1, 3, 4)  # [t, r, sb, w, byte]
        m = torch.stack((word[..., 0] & 15, word[..., 0] >> 4, word[..., 1] & 15, word[..., 1] >> 4), dim=3)
        main = m.reshape(nt, TILE, nsb * SB)  # [t, r, sb, s, w] -> column sb*128 + 32s + w
        r = tail_b.reshape(nt, TILE, tail // BLK, 16)
        rest = torch.stack((r & 15, r >> 4), dim=-1).reshape(nt, TILE, tail)
    else:
        main_b, tail_b = b[:, : nsb * TILE * SB], b[:, nsb * TILE * SB :]
        m = main_b.reshape(nt, nsb, TILE, 4, 2, 16).permute(0, 2, 1, 3, 5, 4)  # [t, r, sb, block, i, parity]
        main = m.reshape(nt, TILE, nsb * SB)
        rest = tail_b.reshape(nt, TILE, tail // BLK, 2, 16).permute(0, 1, 2, 4, 3).reshape(nt, TILE, tail)
    return torch.cat((main, rest), dim=2).reshape(nt * TILE, kp)


def unpack_codes(layout: CpuLayout) -> torch.Tensor:
    """The layer's codes [N, K] (stored column order) back from the CPU layout, exactly."""
    kp = padded_k(layout.in_features)
    return _codes_from_tiles(layout.qdata, kp, layout.bits)[: layout.out_features, : layout.in_features]


def _per_tile(t: torch.Tensor, n_pad: int) -> torch.Tensor:
    """[N, NG] -> [ntiles, NG, 4] (rows padded with zeros)."""
    n, ng = t.shape
    out = torch.zeros(n_pad, ng, dtype=t.dtype)
    out[:n] = t
    return out.view(n_pad // TILE, TILE, ng).transpose(1, 2).contiguous()


def repack(w: PackedWeight) -> CpuLayout:
    """Derive the CPU layout from a layer's stored tensors (CPU tensors, format v1)."""
    n, k, bits = w.out_features, w.in_features, w.bits
    ng = num_groups(k, w.group_size)
    # qweight: int32 [N, ceil(K/32)*bits]; scales: fp16 [N, NG]; zeros: uint8 [N, NG]; perm: int32 [K]
    expect = {"qweight": ((n, packed_words(k, bits)), torch.int32), "scales": ((n, ng), torch.float16)}
    if w.zeros is not None:
        expect["zeros"] = ((n, ng), torch.uint8)
    if w.perm is not None:
        expect["perm"] = ((k,), torch.int32)
    for name, (shape, dtype) in expect.items():
        t = getattr(w, name)
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(
                f"{name}: expected {dtype} {shape} for N={n}, K={k}, bits={bits}, group_size={w.group_size}; "
                f"got {t.dtype} {tuple(t.shape)}"
            )
        if t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device}; the CPU kernel needs CPU tensors")
    kp, n_pad = padded_k(k), -(-n // TILE) * TILE
    rows = max(TILE, (_CHUNK_CODES // kp) // TILE * TILE)
    parts = []
    for n0 in range(0, n_pad, rows):
        n1 = min(n0 + rows, n_pad)
        c = torch.zeros(n1 - n0, kp, dtype=torch.uint8)
        if n0 < n:
            c[: min(n1, n) - n0, :k] = unpack_rows(w.qweight[n0:n1], bits, k)
        parts.append(_tiles_from_codes(c, bits))
    return CpuLayout(
        qdata=torch.cat(parts, dim=0).contiguous(),
        scales=_per_tile(w.scales, n_pad),
        zeros=None if w.zeros is None else _per_tile(w.zeros, n_pad),
        perm=None if w.perm is None else w.perm.to(torch.int64).contiguous(),
        bits=bits,
        in_features=k,
        out_features=n,
        group_size=w.group_size,
    )
