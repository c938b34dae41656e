"""The llmquant packed weight format, version 1 (normative).

This docstring is the specification of how a quantized linear layer is stored on disk in a
checkpoint whose ``config.json`` carries ``quantization_config.quant_method == "llmquant"`` and
``format_version == 1``. Golden tests in ``tests/formats/test_packing.py`` pin every example below.

Shape letters: N = out_features, K = in_features, G = group size (G = K when ``group_size == -1``,
i.e. one group per output channel), NG = ceil(K / G) groups per row, b = bits (2, 3, 4 or 8).

Tensors of a quantized ``nn.Linear`` named ``<prefix>``
-------------------------------------------------------
==================  ======  =====================  ===================================================
name                dtype   shape                  meaning
==================  ======  =====================  ===================================================
<prefix>.qweight    int32   [N, ceil(K / 32) * b]  codes q in [0, 2**b - 1], packed along K (below)
<prefix>.scales     fp16    [N, NG]                one scale per (output row, group)
<prefix>.zeros      uint8   [N, NG]                zero point per group; asymmetric layers only
<prefix>.perm       int32   [K]                    act-order layers only: stored column j holds
                                                   input column perm[j]
<prefix>.bias       float   [N]                    unchanged from the float layer, if it has one
==================  ======  =====================  ===================================================

Bit order
---------
Each row of codes (one output channel, K codes in stored column order) is cut into blocks of 32
codes; the last block is padded with code 0. Block j occupies the b words
``qweight[n, j*b : (j+1)*b]``, read as one little-endian bit stream of 32*b bits: code i of the block
occupies bits ``[i*b, (i+1)*b)`` of the stream, and bit t of the stream is bit ``t % 32`` of word
``t // 32``. Words are stored as int32 (two's complement) with the same bits.

Worked example, b = 4, codes q = [1, 2, 3, 4, 5, 6, 7, 8] (first 8 of a block):
word 0 = 0x87654321 (code 0 in the lowest nibble). As an int32 that is -2023406815.
For b = 2, 32 codes fill 2 words, 16 per word; for b = 8, 4 per word (code 0 in the lowest byte).
For b = 3, 32 codes fill 3 words and codes 10 and 21 straddle a word boundary: code 10 has its
lowest two bits in bits 30..31 of word 0 and its top bit in bit 0 of word 1.

Groups
------
Group g covers stored columns ``[g*G, min((g+1)*G, K))``. K need not be a multiple of G: the last
group is then shorter ("ragged"), and NG = ceil(K / G). This is how models with a hidden size of 576
(SmolLM2-135M) are stored with G = 128.

Dequantization
--------------
For stored column k of row n, with g = k // G:

    W_stored[n, k] = (q[n, k] - z[n, g]) * s[n, g]        computed in float32

where ``z = zeros`` for asymmetric layers and ``z = 2**(b-1)`` (an implicit constant, no tensor) for
symmetric ones. The layer computes ``y = x[..., perm] @ W_stored.T + bias``; without ``perm`` the
stored order is the input order. Act-order (GPTQ's descending-Hessian-diagonal column order) is
stored *permuted*, so its groups stay contiguous and the kernel reads them exactly like a plain
layer; the only extra work at run time is one gather of the activations.

How scales and zero points are chosen is up to the quantizer (round-to-nearest, GPTQ, ...); the
format only fixes how they are read back.

Compact group parameters (``quantization_config.compact_qparams: true``)
-----------------------------------------------------------------------
A checkpoint quantized with ``compact_qparams`` stores every quantized linear layer's scales, zero
points and (where K allows) perm in fewer bits; codes, rotation signs and the dequantization above are
unchanged:

==================  ======  ========================  ================================================
name                dtype   shape                     meaning
==================  ======  ========================  ================================================
<prefix>.scales     uint8   [N, NG]                   scale codes c: s = T[c % 12] * 2**(c // 12 - 14)
<prefix>.zeros      uint8   [N, ceil(NG * b / 8)]     asymmetric only: each row's NG zero points, b bits
                                                      each, as one little-endian bit stream per row
<prefix>.perm       int16   [K]                       act-order, K <= 32768: the same values as the
                                                      int32 perm (int32 when K > 32768)
==================  ======  ========================  ================================================

Scales lie on a logarithmic grid of 12 steps per octave (5.9% apart), from
2**-14 (c = 0, float16's smallest normal number) to 2**7 * T[3] = 152.25 (c = 255). ``T[j]`` is
``2**(j / 12)`` rounded to float16 (:data:`LOG_SCALE_TABLE`, whose float16 bit patterns are pinned by
the golden tests), so every decoded scale is a float16 number, the same on every machine; the
dequantization then reads it like a stored float16 scale. Zero points: zero point g of a row occupies bits
``[g*b, (g+1)*b)`` of the row's bytes, bit t being bit ``t % 8`` of byte ``t // 8``; the last byte is
padded with 0 bits. Worked example, b = 3, zero points [1, 2, 3, 4, 5] (NG = 5): bytes 0xD1 0x58.
At group size 128 this stores 1 byte of scale and b bits of zero point per 128 weights instead of 3
bytes: a 3-bit asymmetric layer takes 3.086 bits a weight instead of 3.188. The int16 perm saves 16 / N
bits a weight more (0.0625 for a 256-row k_proj). Readers also accept an int32 perm in a compact
checkpoint (those written before the int16 one).
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
BLOCK = 32  # codes per packing block; a block of b-bit codes fills exactly b int32 words


#: steps per octave of the compact scale grid and its float16 table: T[j] = 2**(j / 12) in float16
LOG_SCALE_STEPS = 12
LOG_SCALE_TABLE = torch.tensor([2.0 ** (j / LOG_SCALE_STEPS) for j in range(LOG_SCALE_STEPS)], dtype=torch.float16)
#: the exponent of code 0 (float16's smallest normal number, 2**-14)
LOG_SCALE_MIN_EXP = -14
LOG_SCALE_MAX = float(LOG_SCALE_TABLE[255 % LOG_SCALE_STEPS]) * 2.0 ** (255 // LOG_SCALE_STEPS + LOG_SCALE_MIN_EXP)


#: the largest K whose compact perm is stored as int16 (its values are 0 .. K - 1)
PERM_INT16_MAX_K = 1 << 15


def perm_dtype(k: int, compact: bool) -> torch.dtype:
    """The dtype of a stored ``perm`` of ``k`` columns: int16 in a compact checkpoint when its values fit."""
    return torch.int16 if compact and k <= PERM_INT16_MAX_K else torch.int32


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def packed_words(k: int, bits: int) -> int:
    """Number of int32 words one row of ``k`` codes occupies."""
    _check_bits(bits)
    return -(-k // BLOCK) * bits


def num_groups(k: int, group_size: int) -> int:
    g = k if group_size == -1 else group_size
    return -(-k // g)


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``q`` [N, K] (values in [0, 2**bits - 1]) into int32 [N, ceil(K/32)*bits]."""
    _check_bits(bits)
    if q.dim() != 2:
        raise ValueError(f"pack_rows expects codes of shape [N, K], got {tuple(q.shape)}")
    n, k = q.shape
    q = q.to(torch.int64)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > (1 << bits) - 1):
        raise ValueError(f"codes out of range for {bits}-bit packing: [{int(q.min())}, {int(q.max())}]")
    nblk = -(-k // BLOCK)
    padded = torch.zeros(n, nblk * BLOCK, dtype=torch.int64, device=q.device)
    padded[:, :k] = q
    blocks = padded.view(n, nblk, BLOCK)
    words = torch.zeros(n, nblk, bits, dtype=torch.int64, device=q.device)
    for i in range(BLOCK):
        off = i * bits
        w, s = divmod(off, 32)
        v = blocks[:, :, i]
        words[:, :, w] |= (v << s) & 0xFFFFFFFF
        if s + bits > 32:  # the code straddles into the next word (only for 3-bit)
            words[:, :, w + 1] |= v >> (32 - s)
    words = words.view(n, nblk * bits)
    # reinterpret the low 32 bits as int32 (two's complement)
    words = torch.where(words >= (1 << 31), words - (1 << 32), words)
    return words.to(torch.int32).contiguous()


def unpack_rows(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 [N, ceil(K/32)*bits] -> uint8 codes [N, K]."""
    _check_bits(bits)
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"unpack_rows expects int32 [N, W], got {packed.dtype} {tuple(packed.shape)}")
    n, nw = packed.shape
    if nw != packed_words(k, bits):
        raise ValueError(f"packed row has {nw} words, expected {packed_words(k, bits)} for K={k}, bits={bits}")
    nblk = nw // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = words.view(n, nblk, bits)
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        per = 32 // bits
        shifts = torch.arange(per, device=packed.device, dtype=torch.int64) * bits
        codes = (words.unsqueeze(-1) >> shifts) & mask  # [n, nblk, bits, per]
        codes = codes.reshape(n, nblk * BLOCK)
    else:
        cols = []
        for i in range(BLOCK):
            off = i * bits
            w, s = divmod(off, 32)
            v = words[:, :, w] >> s
            if s + bits > 32:
                v = v | (words[:, :, w + 1] << (32 - s))
            cols.append(v & mask)
        codes = torch.stack(cols, dim=-1).reshape(n, nblk * BLOCK)
    return codes[:, :k].to(torch.uint8).contiguous()


def group_index(k: int, group_size: int, device=None) -> torch.Tensor:
    """Group of each stored column: int64 [K]."""
    g = k if group_size == -1 else group_size
    return torch.arange(k, device=device) // g


def dequantize_packed(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """Dequantize to float32 W_stored [N, K] (stored column order; apply ``perm`` to x, not here)."""
    codes = unpack_rows(qweight, bits, in_features).to(torch.float32)
    gidx = group_index(in_features, group_size, device=qweight.device)
    s = scales.to(torch.float32)[:, gidx]
    if zeros is None:
        z = float(1 << (bits - 1))
    else:
        z = zeros.to(torch.float32)[:, gidx]
    return (codes - z) * s


# --- compact group parameters ------------------------------------------------------------------
def decode_scales(codes: torch.Tensor) -> torch.Tensor:
    """Compact scale codes (uint8, any shape) -> their float16 scales (exact, see the module docstring)."""
    if codes.dtype != torch.uint8:
        raise ValueError(f"compact scale codes must be uint8, got {codes.dtype}")
    c = codes.to(torch.int64)
    table = LOG_SCALE_TABLE.to(device=codes.device, dtype=torch.float32)
    return torch.ldexp(table[c % LOG_SCALE_STEPS], (c // LOG_SCALE_STEPS + LOG_SCALE_MIN_EXP).to(torch.float32)).to(torch.float16)


_GRID_F32: dict[torch.device, torch.Tensor] = {}


def _grid(device: torch.device) -> torch.Tensor:
    """The 256 decoded scales as float32 (strictly increasing: code c is position c), one copy per device."""
    g = _GRID_F32.get(device)
    if g is None:
        g = _GRID_F32[device] = decode_scales(torch.arange(256, dtype=torch.uint8)).to(device=device, dtype=torch.float32)
    return g


def snap_scales(scales: torch.Tensor) -> torch.Tensor:
    """Each scale moved up to the next point of the compact grid (the nearest one at or above it, to within
    float16 precision; clamped to the grid's range), as float32. Up, so that the range the scale was made
    for is not clipped: at 8 bits a 3% smaller step would cut off the largest weights by several steps."""
    grid = _grid(scales.device)
    s = scales.to(torch.float32).clamp(min=2.0 ** LOG_SCALE_MIN_EXP, max=LOG_SCALE_MAX)
    return grid[torch.searchsorted(grid, s * (1 - 2.0 ** -11)).clamp_(max=255)]


def encode_scales(scales: torch.Tensor) -> torch.Tensor:
    """float16 scales that lie on the compact grid -> their uint8 codes; raises ValueError otherwise
    (storing them would change the weights)."""
    grid = _grid(scales.device)
    s = scales.to(torch.float16).to(torch.float32)
    codes = torch.searchsorted(grid, s).clamp_(max=255)
    off = grid[codes] != s
    if bool(off.any()):
        bad = s[off][0]
        raise ValueError(f"{int(off.sum())} scales are not on the compact grid (e.g. {float(bad)!r}); "
                         "they were not quantized with compact_qparams")
    return codes.to(torch.uint8)


def packed_zero_bytes(ng: int, bits: int) -> int:
    """Bytes one row of ``ng`` compact zero points takes."""
    _check_bits(bits)
    return -(-ng * bits // 8)


def pack_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points uint8 [N, NG] (values below 2**bits) -> compact uint8 [N, ceil(NG * bits / 8)]."""
    n, ng = zeros.shape
    z = zeros.to(torch.int64)
    if z.numel() and int(z.max()) > (1 << bits) - 1:
        raise ValueError(f"zero points out of range for {bits}-bit codes: max {int(z.max())}")
    bitpos = torch.arange(bits, device=zeros.device)
    stream = ((z.unsqueeze(-1) >> bitpos) & 1).reshape(n, ng * bits)
    nb = packed_zero_bytes(ng, bits)
    padded = torch.zeros(n, nb * 8, dtype=torch.int64, device=zeros.device)
    padded[:, : ng * bits] = stream
    weights = 1 << torch.arange(8, device=zeros.device)
    return (padded.view(n, nb, 8) * weights).sum(-1).to(torch.uint8)


def unpack_zeros(packed: torch.Tensor, bits: int, ng: int) -> torch.Tensor:
    """Inverse of :func:`pack_zeros`: uint8 [N, ceil(NG * bits / 8)] -> uint8 [N, NG]."""
    n, nb = packed.shape
    if packed.dtype != torch.uint8 or nb != packed_zero_bytes(ng, bits):
        raise ValueError(f"compact zero points: expected uint8 [N, {packed_zero_bytes(ng, bits)}], "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    stream = ((packed.to(torch.int64).unsqueeze(-1) >> torch.arange(8, device=packed.device)) & 1).reshape(n, nb * 8)
    bitval = 1 << torch.arange(bits, device=packed.device)
    return (stream[:, : ng * bits].view(n, ng, bits) * bitval).sum(-1).to(torch.uint8)


def decode_qparams(scales: torch.Tensor, zeros: torch.Tensor | None, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A compact layer's stored scales and zero points -> the float16 scales [N, NG] and uint8 zero points
    [N, NG] (or None, symmetric) of the plain format, which every kernel and export takes."""
    scales = decode_scales(scales)
    return scales, None if zeros is None else unpack_zeros(zeros, bits, scales.shape[1])
