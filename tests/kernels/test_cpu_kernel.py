"""The native CPU kernel (``llmquant.kernels.cpu``) against ``dequant_matmul_ref``.

Every instruction set this CPU has is tested (scalar, avx2, avx512, avx512_bf16, capped with the
kernel's ``isa`` argument), so a machine with AVX-512 also checks the fallbacks.

Tolerances (STYLE.md): fp32 outputs ``assert_close(rtol=1e-5, atol=1e-5 * max|ref|)`` (the kernel
dequantizes exactly like the reference; only the order of the fp32 sums differs); bf16 outputs:
relative mean absolute error ``mean|y - ref| / mean|ref|`` below 1e-2, with ``ref`` computed in
fp32 from the same bf16 input; where the CPU has AVX512-BF16 (bf16 weights, vdpbf16ps), also
against the product with the bf16-rounded weights, ``rtol=2**-8`` (one bf16 rounding of the
output). Dequantization and repacking are checked for exact equality.
"""
import concurrent.futures

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmquant.formats.packing import dequantize_packed, pack_rows, unpack_rows
from llmquant.kernels import act_int8, cpu_native, dequant_matmul_ref
from llmquant.kernels.cpu import cpu_dequantize, cpu_linear, cpu_qlinear
from llmquant.kernels.cpu_layout import CpuLayout, repack, unpack_codes
from llmquant.kernels.registry import PackedWeight

NATIVE, WHY = cpu_native.load()
needs_native = pytest.mark.skipif(NATIVE is None, reason=f"native CPU library unavailable: {WHY}")
ISAS = cpu_native.isas_up_to(NATIVE.detected_isa, NATIVE.has_avx_vnni) if NATIVE else ()
#: the instruction sets with the integer GEMV (lq_cpu.h): all but AVX-512 without VNNI
INT_ISAS = tuple(i for i in ISAS if not (i.startswith("avx512") and not NATIVE.has_vnni))

MS = (1, 2, 3, 7, 16, 33, 128)

# (bits, group_size, sym, act_order, N, K): each layer straddles some boundary of the layout or
# of the kernels' blocking: tiles of 4 rows (N % 4), GEMM blocks of 32 rows, superblocks of 128
# columns with a 32/64/96-column tail, K padded to 32, ragged last groups, several 1024/2048-column
# GEMM chunks, groups that switch inside a superblock (32, 64).
LAYERS = [
    (4, 128, True, False, 64, 640),
    (4, 128, False, True, 13, 576),  # ragged last group (576 = 4.5 * 128), act-order, asym
    (4, 32, True, False, 70, 160),
    (4, 64, False, False, 36, 100),  # K padded to 128, ragged group
    (4, -1, True, False, 8, 2080),  # several GEMM column chunks + a tail
    (8, 128, False, False, 40, 300),
    (8, 32, True, True, 20, 128),
    (3, 128, False, False, 24, 256),
    (3, 64, True, False, 5, 96),
    (2, 32, False, True, 12, 192),
    (2, -1, True, False, 33, 70),
    # packed 2- and 3-bit superblocks (expanded to 4 bits tile by tile), with and without a tail, on
    # the integer GEMV (groups of 128 or one per row) and off it; N past one expansion buffer
    (3, 128, True, False, 36, 416),
    (3, -1, False, False, 9, 1024),
    (2, 128, True, False, 70, 1152),
    (2, 64, False, False, 16, 544),
]


def make_packed(bits, group_size, sym, act_order, n, k, seed=0) -> PackedWeight:
    """Random codes, scales and zero points in the stored format (any group size, even ones
    QuantConfig does not offer)."""
    g = torch.Generator().manual_seed(seed)
    ng = -(-k // (k if group_size == -1 else group_size))
    codes = torch.randint(0, 1 << bits, (n, k), generator=g)
    scales = (torch.rand(n, ng, generator=g) * 0.02 + 0.001).to(torch.float16)
    zeros = None if sym else torch.randint(0, 1 << bits, (n, ng), generator=g).to(torch.uint8)
    perm = torch.randperm(k, generator=g).to(torch.int32) if act_order else None
    return PackedWeight(pack_rows(codes, bits), scales, zeros, perm, bits, group_size, k, n)


@pytest.fixture(scope="module")
def layers():
    out = []
    for i, spec in enumerate(LAYERS):
        w = make_packed(*spec, seed=i)
        out.append((spec, w, repack(w), torch.randn(spec[4], generator=torch.Generator().manual_seed(i))))
    return out


def check_fp32(y, ref):
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))


def rel_mean_abs_err(y, ref):
    return ((y.float() - ref).abs().mean() / ref.abs().mean().clamp_min(1e-30)).item()


def test_library_builds_and_loads():
    assert NATIVE is not None, WHY
    assert NATIVE.detected_isa in cpu_native.ISA_NAMES


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_dequantize_is_exact(layers, isa):
    """The layout round-trips: every ISA's dequantization equals the format's, bit for bit."""
    for spec, w, lay, _ in layers:
        ref = dequantize_packed(w.qweight, w.scales, w.zeros, bits=w.bits, group_size=w.group_size, in_features=w.in_features)
        assert torch.equal(cpu_dequantize(lay, torch.float32, isa=isa), ref), spec
        assert torch.equal(cpu_dequantize(lay, torch.bfloat16, isa=isa), ref.to(torch.bfloat16)), spec


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", MS)
def test_fp32_matches_reference(layers, isa, m):
    for spec, w, lay, bias in layers:
        x = torch.randn(m, w.in_features)
        for b in (None, bias):
            check_fp32(cpu_linear(x, lay, b, isa=isa), dequant_matmul_ref(x, w, b))


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", MS)
def test_bf16_matches_reference(layers, isa, m):
    for spec, w, lay, bias in layers:
        x = torch.randn(m, w.in_features).to(torch.bfloat16)
        y = cpu_linear(x, lay, bias.to(torch.bfloat16), isa=isa)
        assert y.dtype == torch.bfloat16 and y.shape == (m, w.out_features)
        ref = dequant_matmul_ref(x.float(), w, bias.to(torch.bfloat16).float())
        assert rel_mean_abs_err(y, ref) < 1e-2, (spec, rel_mean_abs_err(y, ref))


@needs_native
@pytest.mark.skipif(NATIVE is None or NATIVE.isa != "avx512_bf16",
                    reason=f"needs AVX512-BF16 (kernels run {NATIVE.isa if NATIVE else None})")
@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_bf16_math_uses_bf16_rounded_weights(layers, m):
    """The vdpbf16ps paths (4-bit GEMV, the GEMM up to M = 32) multiply by the weights rounded once to
    bf16 (cpu_dequantize(..., bfloat16)) and sum in fp32: within one bf16 rounding of that product.
    Past M = 32 bf16 x is widened and multiplied exactly on the outer-product fp32 GEMM (faster)."""
    for spec, w, lay, bias in layers:
        if spec[0] == 8 and m <= 4:
            continue  # 8-bit layers take the exact fp32 GEMV
        x = torch.randn(m, w.in_features).to(torch.bfloat16)
        xg = x if w.perm is None else x[:, w.perm.long()]  # the kernel reads W in stored column order
        exact = m == 1 and act_int8.applies(w.bits, w.group_size, w.in_features)  # the integer GEMV
        y = cpu_linear(x, lay)
        if m > 32:
            ref = torch.nn.functional.linear(xg.float(), cpu_dequantize(lay))
            torch.testing.assert_close(y.float(), ref, rtol=2**-8, atol=1e-5 * ref.abs().max().item())
            assert torch.equal(y, cpu_linear(x.float(), lay).to(torch.bfloat16)), spec  # the fp32 result, rounded
            continue
        weights = cpu_dequantize(lay) if exact else cpu_dequantize(lay, torch.bfloat16).float()
        ref = torch.nn.functional.linear(xg.float(), weights)
        torch.testing.assert_close(y.float(), ref, rtol=2**-8, atol=1e-5 * ref.abs().max().item())


LIMBS2_ISAS = tuple(i for i in ("scalar", "avx2", "avx2_vnni") if i in ISAS)  # tables with i8_limbs2


@needs_native
@pytest.mark.parametrize("isa", LIMBS2_ISAS)
def test_bf16_decode_takes_two_limbs_of_x(layers, isa):
    """bf16 x at M = 1 (and fp32 x under "medium" precision) on the integer GEMV: x in two limbs, 15 bits
    a lane (act_int8.quantize_x(bits=15)), times the exact weights, to fp32 rounding; a bf16 x that spans
    less than 2^6 within each lane is exact, so equal to the three-limb fp32 decode's result."""
    g = torch.Generator().manual_seed(3)
    saved = torch.get_float32_matmul_precision()
    for spec, w, lay, bias in layers:
        if not act_int8.applies(w.bits, w.group_size, w.in_features) or w.bits == 8:
            continue
        k = w.in_features
        x = (torch.randn(1, k, generator=g) * torch.exp(2 * torch.randn(1, k, generator=g))).to(torch.bfloat16)
        xg = x.float() if w.perm is None else x.float()[:, w.perm.long()]
        emu = act_int8.quantize_x(xg, bits=15)
        assert not torch.equal(emu, xg)  # the wide range loses bits in some lanes
        b16 = bias.to(torch.bfloat16)
        ref16 = torch.nn.functional.linear(emu, cpu_dequantize(lay)) + b16.float()
        y = cpu_linear(x, lay, b16, isa=isa)
        torch.testing.assert_close(y.float(), ref16, rtol=2**-8, atol=1e-5 * ref16.abs().max().item())
        ref = torch.nn.functional.linear(emu, cpu_dequantize(lay)) + bias
        try:  # the same integers from fp32 x under "medium", unrounded: to fp32 rounding
            torch.set_float32_matmul_precision("medium")
            y32 = cpu_linear(x.float(), lay, bias, isa=isa)
        finally:
            torch.set_float32_matmul_precision(saved)
        check_fp32(y32, ref)
        assert not torch.equal(y32, cpu_linear(x.float(), lay, bias, isa=isa)), spec  # not the 3-limb path
        narrow = (torch.rand(1, k, generator=g) + 1).to(torch.bfloat16)  # [1, 2): every value exact in 15 bits
        assert torch.equal(act_int8.quantize_x(narrow.float(), bits=15), narrow.float())
        with torch.no_grad():
            torch.set_float32_matmul_precision("medium")
            try:
                y2 = cpu_linear(narrow.float(), lay, isa=isa)
            finally:
                torch.set_float32_matmul_precision(saved)
        check_fp32(y2, cpu_linear(narrow.float(), lay, isa=isa))


@needs_native
def test_fp32_medium_precision_uses_bf16_and_highest_stays_exact(layers):
    """torch.set_float32_matmul_precision("medium") lets fp32 prefill run in bf16 (AVX512-BF16) up to
    M = 32; past that the exact outer-product GEMM is the faster one and runs."""
    _, w, lay, bias = layers[0]
    x, xl = torch.randn(16, w.in_features), torch.randn(40, w.in_features)
    ref, ref_l = dequant_matmul_ref(x, w, bias), dequant_matmul_ref(xl, w, bias)  # (before "medium": torch's too)
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        y = cpu_linear(x, lay, bias)
        assert y.dtype == torch.float32 and rel_mean_abs_err(y, ref) < 1e-2
        if NATIVE.isa == "avx512_bf16":
            assert not torch.equal(y, cpu_linear(x, lay, bias, isa="avx512"))  # really took the bf16 path
        check_fp32(cpu_linear(xl, lay, bias), ref_l)
    finally:
        torch.set_float32_matmul_precision(saved)
    check_fp32(cpu_linear(x, lay, bias), ref)


needs_int = pytest.mark.skipif(
    NATIVE is None or NATIVE.isa not in INT_ISAS,
    reason="the kernels run AVX-512 without VNNI: fp32 decode uses the FMA GEMV")


def decode_inputs(k: int) -> dict:
    """Rows of fp32 activations for M = 1: ordinary, a few large outliers (LLMs' "massive
    activations"), a wide dynamic range, tiny and huge magnitudes, zeros."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(1, k, generator=g)
    return {
        "randn": x,
        "outliers": x * torch.where(torch.rand(1, k, generator=g) < 0.01, 300.0, 1.0),
        "wide": x * torch.exp(3 * torch.randn(1, k, generator=g)),
        "tiny": x * 1e-30,
        "huge": x * 1e30,
        "zeros": torch.zeros(1, k),
    }


@pytest.mark.parametrize("isa", INT_ISAS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("k, group_size", [(4096, 128), (1000, -1), (640, 128), (4192, 256), (160, -1), (300, 128)])
def test_fp32_decode_int_is_as_accurate_as_fma(monkeypatch, isa, bits, sym, k, group_size):
    """The integer GEMV carries x as 24-bit block floating point: its error against the float64
    product stays at fp32 rounding level, for outliers and wide ranges too (worst over these cases, of
    max|y|: 4-bit integer GEMV 7.8e-7 scalar and VNNI, 9.6e-7 AVX2, 8-bit (gemv_x8, limbs combined in
    fp32) 9.1e-7; FMA 7.6e-7; torch's own fp32 F.linear 1.3e-6; bound 2e-6), and its results
    differ from the FMA GEMV's (it really ran). On every instruction set that has it (AVX2 emulates
    vpdpbusd with vpmaddubsw + vpmaddwd; the scalar code is the C reference)."""
    w = make_packed(bits, group_size, sym, False, 64, k, seed=k)
    lay = repack(w)
    wd = dequantize_packed(w.qweight, w.scales, w.zeros, bits=bits, group_size=group_size, in_features=k).double()
    differs = False
    for name, x in decode_inputs(k).items():
        exact = x.double() @ wd.T
        y = {}
        for mode in ("int", "fma"):
            monkeypatch.setenv("LLMQUANT_CPU_FP32_GEMV", mode)
            y[mode] = cpu_linear(x, lay, isa=isa)
        scale = exact.abs().max().item()
        for mode, out in y.items():
            err = (out.double() - exact).abs().max().item()
            assert err <= 2e-6 * scale, (name, mode, err / max(scale, 1e-300))
        differs |= not torch.equal(y["int"], y["fma"])
    assert differs


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_fp32_decode_propagates_nan_and_inf(bad, bits):
    """A NaN or infinite activation gives what the reference gives (the integer GEMVs, which cannot
    carry them, hand such rows to the FMA GEMV)."""
    w = make_packed(bits, 128, True, False, 16, 512, seed=3)
    lay = repack(w)
    x = torch.randn(1, 512)
    x[0, 200] = bad
    torch.testing.assert_close(cpu_linear(x, lay), dequant_matmul_ref(x, w), equal_nan=True, rtol=1e-5, atol=1e-5)


def test_fp32_gemv_env_is_checked(monkeypatch):
    monkeypatch.setenv("LLMQUANT_CPU_FP32_GEMV", "fast")
    with pytest.raises(ValueError, match="LLMQUANT_CPU_FP32_GEMV"):
        cpu_native.fp32_gemv_flags()


@needs_native
@pytest.mark.parametrize("group_size", [16, 48])
def test_group_sizes_not_multiple_of_32(group_size):
    """Groups that split a 32-column block run on the portable path, still exactly."""
    w = make_packed(4, group_size, False, False, 9, 200, seed=7)
    lay = repack(w)
    ref_w = dequantize_packed(w.qweight, w.scales, w.zeros, bits=4, group_size=group_size, in_features=200)
    assert torch.equal(cpu_dequantize(lay), ref_w)
    for m in (1, 9):
        x = torch.randn(m, 200)
        check_fp32(cpu_linear(x, lay), dequant_matmul_ref(x, w))


def test_layout_golden_bytes():
    """The byte order documented in cpu_layout / lq_cpu.h, on hand-computed examples."""
    k = 160  # one superblock + a 32-column tail
    codes = (torch.arange(k) % 16).repeat(4, 1)  # 4 rows (one tile), code = column % 16
    codes[1] = 15 - codes[1]
    w = PackedWeight(pack_rows(codes, 4), torch.ones(4, 2, dtype=torch.float16), None, None, 4, 128, k, 4)
    q = repack(w).qdata[0]
    # row 0, superblock 0: word w holds columns w, 32+w, 64+w, 96+w, all with code w % 16
    assert q[2 * 3].item() == 0x33 and q[2 * 3 + 1].item() == 0x33
    # row 1 starts 64 bytes later: codes 15 - col % 16
    assert q[64 + 2 * 3].item() == 0xCC
    # tail (after 4 rows x 64 bytes): byte b = column 128+2b (low nibble) | column 129+2b (high)
    assert q[256].item() == 0x10 and q[257].item() == 0x32 and q[256 + 15].item() == 0xFE
    assert q.numel() == 4 * k // 2

    codes8 = torch.arange(64).repeat(4, 1)
    w8 = PackedWeight(pack_rows(codes8, 8), torch.ones(4, 1, dtype=torch.float16), None, None, 8, -1, 64, 4)
    q8 = repack(w8).qdata[0]
    # K=64: no full superblock; per row, 2 blocks of [16 even columns, 16 odd columns]
    assert q8[:4].tolist() == [0, 2, 4, 6] and q8[16:18].tolist() == [1, 3] and q8[32:34].tolist() == [32, 34]
    assert q8[64:66].tolist() == [0, 2]  # row 1


def test_layout_golden_bytes_2_and_3_bit():
    """Packed 2- and 3-bit superblocks (lq_cpu.h). Byte position j of a 4-bit row splits into lo[j] (low
    nibble) and hi[j]; lo[2w + e] is column 64e + w, hi[2w + e] column 32 + 64e + w. 2-bit: bit pair f of
    byte b holds lo[32f + b] (f < 2) or hi[32(f - 2) + b]. 3-bit: byte b < 32 holds lo[b] (bits 0-2),
    lo[32 + b] (bits 3-5), hi[b]'s low two bits (bits 6-7); byte 32 + k holds hi[32 + k] (bits 0-2),
    hi[48 + k] (bits 3-5), the third bits of hi[k] (bit 6) and hi[16 + k] (bit 7). The tail stays 4-bit."""
    k = 160
    c2 = torch.zeros(4, k, dtype=torch.int64)
    c2[0, 0] = 1  # lo[0]: byte 0, bits 0-1
    c2[0, 32 + 17] = 2  # hi[34]: f = 3, b = 2 -> byte 2, bits 6-7
    c2[0, 64 + 5] = 3  # lo[11]: f = 0, b = 11 -> byte 11, bits 0-1
    c2[0, 96 + 20] = 1  # hi[41]: f = 3, b = 9 -> byte 9, bits 6-7
    c2[0, 64 + 16] = 2  # lo[33]: f = 1, b = 1 -> byte 1, bits 2-3
    c2[1, 129] = 3  # row 1, tail column 1: high nibble of its first tail byte
    w2 = PackedWeight(pack_rows(c2, 2), torch.ones(4, 2, dtype=torch.float16), None, None, 2, 128, k, 4)
    q2 = repack(w2).qdata[0]
    assert q2.numel() == 4 * (32 + 16)  # 128 columns at 2 bits + a 32-column 4-bit tail, per row
    assert q2[:4].tolist() == [0b01, 0b1000, 0b1000_0000, 0]
    assert q2[9].item() == 0b0100_0000 and q2[11].item() == 0b11
    assert q2[:32].count_nonzero().item() == 5 and q2[32:128].count_nonzero().item() == 0
    assert q2[128 + 16].item() == 0x30 and q2[128:].count_nonzero().item() == 1  # row 1's tail

    c3 = torch.zeros(4, k, dtype=torch.int64)
    c3[0, 32] = 6  # hi[0]: low bits 2 -> byte 0 bits 6-7; third bit -> byte 32 bit 6
    c3[0, 32 + 17] = 5  # hi[34] = hi[32 + 2]: byte 34 bits 0-2
    c3[0, 32 + 16 + 12] = 3  # hi[56] = hi[48 + 8]: byte 40 bits 3-5
    c3[0, 32 + 9] = 4  # hi[18] = hi[16 + 2]: third bit only -> byte 34 bit 7
    c3[0, 64 + 5] = 7  # lo[11]: byte 11 bits 0-2
    c3[0, 64 + 16] = 5  # lo[33] = lo[32 + 1]: byte 1 bits 3-5
    c3[0, 128] = 5  # tail column 0: code 5 in the low nibble
    w3 = PackedWeight(pack_rows(c3, 3), torch.ones(4, 2, dtype=torch.float16), None, None, 3, 128, k, 4)
    q3 = repack(w3).qdata[0]
    assert q3.numel() == 4 * (48 + 16)
    assert q3[0].item() == 0b1000_0000 and q3[1].item() == 0b10_1000 and q3[11].item() == 0b111
    assert q3[32].item() == 0b0100_0000 and q3[34].item() == 0b1000_0101 and q3[40].item() == 0b01_1000
    assert q3[:48].count_nonzero().item() == 6 and q3[48:192].count_nonzero().item() == 0
    assert q3[192].item() == 0x05


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layout_holds_the_packed_bytes(bits):
    """A layer's codes take bits/8 bytes a weight in memory (full superblocks), and round-trip."""
    w = make_packed(bits, 128, True, False, 64, 1024, seed=bits)
    lay = repack(w)
    assert lay.qdata.numel() == 64 * 1024 * bits // 8
    assert torch.equal(unpack_codes(lay), unpack_rows(w.qweight, bits, 1024))


@needs_native
@pytest.mark.parametrize("isa", INT_ISAS)
@pytest.mark.parametrize("bits", [2, 3])
def test_fp32_decode_of_packed_codes_is_exact_enough(isa, bits):
    """2- and 3-bit layers at M = 1 run the integer GEMV on their expanded tiles: as accurate as for 4-bit."""
    for k, g in ((4096, 128), (640, -1)):
        w = make_packed(bits, g, False, False, 72, k, seed=k + bits)
        lay = repack(w)
        wd = dequantize_packed(w.qweight, w.scales, w.zeros, bits=bits, group_size=g, in_features=k).double()
        for name, x in decode_inputs(k).items():
            exact = x.double() @ wd.T
            err = (cpu_linear(x, lay, isa=isa).double() - exact).abs().max().item()
            assert err <= 2e-6 * exact.abs().max().item(), (k, name, err)


@needs_native
def test_act_order_gathers_x():
    w = make_packed(4, 32, True, True, 16, 96, seed=3)
    x = torch.randn(3, 96)
    plain = PackedWeight(w.qweight, w.scales, w.zeros, None, 4, 32, 96, 16)
    y = cpu_linear(x, repack(w))
    check_fp32(y, cpu_linear(x[:, w.perm.long()], repack(plain)))
    check_fp32(y, dequant_matmul_ref(x, w))


@needs_native
def test_leading_dims_strides_and_empty(layers):
    _, w, lay, bias = layers[1]
    x = torch.randn(2, 5, 2 * w.in_features)[..., ::2]  # non-contiguous [2, 5, K]
    y = cpu_linear(x, lay, bias)
    assert y.shape == (2, 5, w.out_features)
    check_fp32(y, dequant_matmul_ref(x, w, bias))
    assert cpu_linear(torch.randn(0, w.in_features), lay).shape == (0, w.out_features)


@needs_native
def test_threads_do_not_change_results():
    """Each output row is computed by one thread with the same code: bitwise equal for any count,
    on torch's OpenMP threads and on the library's own pool. (2048 x 2048: large enough that even
    M = 1 is split between threads.)"""
    saved = torch.get_num_threads()
    w = make_packed(4, 128, False, False, 2048, 2048, seed=11)
    lay, bias = repack(w), torch.randn(2048)
    try:
        for m in (1, 33):
            x = torch.randn(m, w.in_features)
            torch.set_num_threads(1)
            y1 = cpu_linear(x, lay, bias)
            torch.set_num_threads(2)
            for threads in ("pool", "openmp"):
                NATIVE.use_threads(threads)
                assert torch.equal(y1, cpu_linear(x, lay, bias)), threads
    finally:
        torch.set_num_threads(saved)
        NATIVE.use_threads(cpu_native.requested_threads())


@needs_native
def test_runs_on_torchs_openmp_threads(monkeypatch):
    """torch's OpenMP runtime (already loaded by torch) is found and used by default; the
    environment variable selects the pool and is checked."""
    if cpu_native.torch_openmp_entry_points() is None:
        pytest.skip("torch's OpenMP runtime not found in torch/lib")
    assert NATIVE.threads == "openmp"
    try:
        assert NATIVE.use_threads("pool") == "pool"
    finally:
        NATIVE.use_threads("openmp")
    monkeypatch.setenv("LLMQUANT_CPU_THREADS", "tbb")
    with pytest.raises(ValueError, match="LLMQUANT_CPU_THREADS"):
        cpu_native.requested_threads()


@needs_native
def test_concurrent_callers(layers):
    """ctypes releases the GIL: two Python threads may call at once (the second runs inline)."""
    _, w, lay, bias = layers[0]
    xs = [torch.randn(m, w.in_features) for m in (1, 40, 3, 64, 1, 17)]
    with concurrent.futures.ThreadPoolExecutor(3) as ex:
        ys = list(ex.map(lambda x: cpu_linear(x, lay, bias), xs))
    for x, y in zip(xs, ys):
        check_fp32(y, dequant_matmul_ref(x, w, bias))


@needs_native
def test_invalid_shapes_raise_value_error(layers):
    _, w, lay, _ = layers[0]  # N=64, K=640
    with pytest.raises(ValueError, match="K=640"):
        cpu_linear(torch.randn(2, 639), lay)
    with pytest.raises(ValueError, match=r"N=64"):
        cpu_linear(torch.randn(2, 640), lay, torch.randn(63))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        cpu_linear(torch.randn(2, 640).half(), lay)
    with pytest.raises(ValueError, match=r"qdata: expected torch.uint8 \(16, 1280\)"):
        cpu_qlinear(torch.randn(2, 640), lay.qdata[:, :-1].contiguous(), lay.scales, None, None, 4, 64, 128, -1)
    with pytest.raises(ValueError, match=r"scales: expected torch.float16 \(16, 5, 4\)"):
        CpuLayout(lay.qdata, lay.scales[:, :4].contiguous(), None, None, 4, 640, 64, 128)
    with pytest.raises(ValueError, match="unknown CPU instruction set"):
        cpu_linear(torch.randn(1, 640), lay, isa="sse9")
    bad = PackedWeight(w.qweight[:, :-1], w.scales, w.zeros, w.perm, 4, 128, 640, 64)
    with pytest.raises(ValueError, match=r"qweight: expected torch.int32 \(64, 80\)"):
        repack(bad)


@needs_native
def test_env_isa_cap(layers, monkeypatch):
    _, w, lay, bias = layers[2]
    x = torch.randn(5, w.in_features)
    monkeypatch.setenv("LLMQUANT_CPU_ISA", "scalar")
    check_fp32(cpu_linear(x, lay, bias), dequant_matmul_ref(x, w, bias))
    monkeypatch.setenv("LLMQUANT_CPU_ISA", "mmx")
    with pytest.raises(ValueError, match="mmx"):
        cpu_linear(x, lay, bias)
    other = "avx2" if "neon" in ISAS else "neon"  # another architecture's instruction set
    monkeypatch.setenv("LLMQUANT_CPU_ISA", other)
    with pytest.raises(ValueError, match=f"{other}.* not one of this machine's"):
        cpu_linear(x, lay, bias)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sym,with_bias", [(True, False), (False, True)])
def test_opcheck(layers, dtype, sym, with_bias):
    _, w, lay, bias = layers[0] if sym else layers[1]
    for m in (1, 9):
        x = torch.randn(m, w.in_features).to(dtype)
        args = (x, lay.qdata, lay.scales, lay.zeros, bias.to(dtype) if with_bias else None, lay.bits,
                lay.out_features, lay.group_size, -1)  # fmt: skip
        torch.library.opcheck(cpu_qlinear, args)


@needs_native
def test_torch_compile_quant_linear(layers):
    """Inductor traces through the custom op (fake implementation) and the act-order gather.
    The layer is run once eagerly first: that derives the kernel's layout outside the graph."""
    from llmquant.modules.quant_linear import QuantLinear

    _, w, _, bias = layers[1]  # act-order, asymmetric, ragged group
    mod = QuantLinear.from_packed(w, bias)

    def f(x):
        return torch.relu(mod(x * 2.0)) + 1.0

    x = torch.randn(3, 7, w.in_features)
    eager = f(x)
    assert mod.kernel_for(x.dtype)[0].name == "cpu"
    compiled = torch.compile(f, fullgraph=True)
    check_fp32(compiled(x), eager)
    check_fp32(eager, torch.relu(dequant_matmul_ref(x * 2.0, w, bias)) + 1.0)


@needs_native
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 70),
    k=st.integers(1, 300),
    m=st.integers(1, 40),
    bits=st.sampled_from([2, 3, 4, 8]),
    group_size=st.sampled_from([-1, 32, 64, 128]),
    sym=st.booleans(),
)
def test_property_any_shape(n, k, m, bits, group_size, sym):
    w = make_packed(bits, group_size, sym, False, n, k, seed=n * 1000 + k)
    x = torch.randn(m, k)
    check_fp32(cpu_linear(x, repack(w)), dequant_matmul_ref(x, w))


@needs_int
@pytest.mark.parametrize("act_order", [False, True])
def test_fp32_greedy_decode_same_on_int_and_fma(monkeypatch, act_order):
    """A tiny Llama (hidden 256, MLP 512: 2 and 4 superblocks), INT4 g128, decoded greedily one token
    at a time: every step's logits on the integer GEMV match the FMA GEMV's to fp32 rounding, so the
    same tokens come out."""
    import llmquant
    from llmquant.config import QuantConfig
    from tests.conftest import build_tiny_llama

    from llmquant.modules.quant_linear import QuantLinear

    model = build_tiny_llama(vocab_size=512, hidden=256, inter=512)
    llmquant.quantize(model, QuantConfig(bits=4, group_size=128, sym=not act_order, quantize_lm_head=True), progress=False)
    if act_order:  # RTN has no act-order; random column orders exercise the gather all the same
        g = torch.Generator().manual_seed(0)
        for name, mod in list(model.named_modules()):
            if isinstance(mod, QuantLinear):
                p = mod.packed()
                p.perm = torch.randperm(mod.in_features, generator=g).to(torch.int32)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, QuantLinear.from_packed(p, mod.bias))

    def run(mode):
        monkeypatch.setenv("LLMQUANT_CPU_FP32_GEMV", mode)
        ids = torch.tensor([[1, 17, 42, 99]])
        out, past, logits_seen = [], None, []
        with torch.no_grad():
            for _ in range(12):
                res = model(input_ids=ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
                past = res.past_key_values
                logits = res.logits[0, -1]
                logits_seen.append(logits)
                ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
        return ids, torch.stack(logits_seen)

    ids_int, logits_int = run("int")
    ids_fma, logits_fma = run("fma")
    assert not torch.equal(logits_int, logits_fma)  # two different computations ran
    torch.testing.assert_close(logits_int, logits_fma, rtol=1e-4, atol=1e-4 * logits_fma.abs().max().item())
    assert torch.equal(ids_int, ids_fma)


# --- dynamic INT8 activations -----------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("isa", INT_ISAS)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 11, 12, 40, 128])
def test_act_int8_is_exactly_the_emulation(layers, isa, m):
    """act_int8: the kernel computes x quantized as llmquant.kernels.act_int8 defines it (groups of 16
    columns that follow the code width, power-of-two scales, 7 bits), times the exact weights, to fp32
    rounding, for 2- to 8-bit codes (W4A8, W8A8); layers it does not apply to (groups of 32/64, K < 128)
    stay exact fp32. Every M (GEMV and GEMM sizes)."""
    g = torch.Generator().manual_seed(m)
    for spec, w, lay, bias in layers:
        # a wide dynamic range across columns, as LLM activations have
        x = torch.randn(m, w.in_features, generator=g) * torch.exp(2 * torch.randn(1, w.in_features, generator=g))
        y = cpu_linear(x, lay, bias, isa=isa, act_int8=True)
        check_fp32(y, dequant_matmul_ref(x, w, bias, act_int8=True))
        if act_int8.applies(w.bits, w.group_size, w.in_features):
            assert not torch.equal(y, cpu_linear(x, lay, bias, isa=isa)), spec  # really quantized
        else:
            check_fp32(y, dequant_matmul_ref(x, w, bias))
            if w.bits == 8:  # the very path it takes without the option (at M = 1 the fast exact decode)
                assert torch.equal(y, cpu_linear(x, lay, bias, isa=isa)), spec


@needs_native
@pytest.mark.parametrize("isa", INT_ISAS)
@pytest.mark.parametrize("sym", [True, False])
def test_act_int8_gemm_in_several_passes_over_x(isa, sym):
    """The INT8 GEMM takes the rows of x in passes of at most 1 MiB of prepared rows (lq_driver.c,
    LQ_I8_X_BYTES): 301 rows of 4224 columns (8 KiB each) run in passes of 102, 102 and 97 rows. Every
    row is the emulation's, and bit for bit what the same rows give in one pass."""
    k = 4224  # 33 superblocks (the 33rd has 128 columns: whole) -- and a tail below
    for kk in (k, k + 96):
        w = make_packed(4, 128, sym, False, 21, kk, seed=11)
        lay = repack(w)
        x = torch.randn(301, kk) * torch.exp(2 * torch.randn(1, kk))
        y = cpu_linear(x, lay, isa=isa, act_int8=True)
        check_fp32(y, dequant_matmul_ref(x, w, act_int8=True))
        for a, b in ((0, 102), (102, 204), (204, 301)):
            assert torch.equal(y[a:b], cpu_linear(x[a:b], lay, isa=isa, act_int8=True)), (kk, a)


@needs_native
def test_prefetch_distances_are_settable_checked_and_change_no_result(monkeypatch):
    """LLMQUANT_CPU_PREFETCH / Native.prefetch set how far ahead the GEMVs (AVX2, AVX-512) prefetch their
    codes: bad values are refused with the numbers, and no distance changes a result."""
    default = NATIVE.prefetch
    assert default == (cpu_native.requested_prefetch() or (2048, 16384))
    lays = [repack(make_packed(b, 128, True, False, 37, 1152, seed=2)) for b in (3, 4, 8)]
    x = torch.randn(2, 1152)

    def results():  # every GEMV that prefetches: each ISA, 3/4/8-bit, fp32 / bf16 / INT8 activations
        return [cpu_linear(x[:m].to(dt), lay, isa=isa, act_int8=a) for isa in ISAS for lay in lays for m in (1, 2)
                for dt, a in ((torch.float32, False), (torch.bfloat16, False), (torch.float32, True))]

    ref = results()
    try:
        for pf in ((0, 0), (64, 0), (4096, 65536)):
            NATIVE.prefetch = pf
            assert NATIVE.prefetch == pf
            assert all(torch.equal(g, r) for g, r in zip(results(), ref)), pf
        for bad in ((100, 0), (-64, 0), (0, 1 << 21)):
            with pytest.raises(ValueError, match="multiples of 64"):
                NATIVE.prefetch = bad
        assert NATIVE.prefetch == (4096, 65536)  # a refused setting changes nothing
    finally:
        NATIVE.prefetch = default
    monkeypatch.setenv("LLMQUANT_CPU_PREFETCH", "1024,0")
    assert cpu_native.requested_prefetch() == (1024, 0)
    monkeypatch.setenv("LLMQUANT_CPU_PREFETCH", "1024")
    with pytest.raises(ValueError, match="LLMQUANT_CPU_PREFETCH='1024'"):
        cpu_native.requested_prefetch()
    monkeypatch.delenv("LLMQUANT_CPU_PREFETCH")
    assert cpu_native.requested_prefetch() is None


@needs_native
def test_act_int8_emulation_matches_the_definition():
    """quantize_x by hand: lane l of superblock s holds columns 128 s + 32 c + 2 l + j; one power of two
    per lane; 7 bits."""
    x = torch.zeros(1, 256)
    x[0, 0], x[0, 1], x[0, 32], x[0, 97] = 3.0, 0.1, -1.5, 0.0123  # lane 0 of superblock 0 (max 3: e = 1)
    x[0, 2] = 1e-3  # lane 1, alone: its own scale
    x[0, 130] = 5.0  # lane 1 of superblock 1
    q = act_int8.quantize_x(x)
    step = 2.0 ** (1 - 6)
    assert q[0, 0] == 3.0 and q[0, 32] == -1.5 and q[0, 1] == round(0.1 / step) * step
    assert q[0, 97] == round(0.0123 / step) * step == 0.0  # small against its lane's largest
    assert abs(q[0, 2] - 1e-3) <= 2.0 ** (-10 - 7) and q[0, 130] == 5.0
    tail = torch.randn(2, 100)  # no whole superblock: nothing to quantize
    assert torch.equal(act_int8.quantize_x(tail), tail)


@needs_native
def test_act_int8_emulation_of_8_bit_layers_matches_the_definition():
    """For 8-bit codes group 4 p + g of superblock s is the columns 128 s + 32 c + 8 g + 2 i + p: the
    even or odd columns of 8-column runs (the 8-bit layout stores a block's even columns first)."""
    x = torch.zeros(1, 256)
    x[0, 0], x[0, 6], x[0, 32 * 3 + 4] = 3.0, 0.1, -1.5  # group 0 (even columns of run 0), max 3: e = 1
    x[0, 1] = 1e-3  # column 1: the odd group of run 0, alone
    x[0, 8] = 1e-2  # column 8: run 1, alone
    x[0, 128 + 6] = 5.0  # superblock 1
    q = act_int8.quantize_x(x, code_bits=8)
    step = 2.0 ** (1 - 6)
    assert q[0, 0] == 3.0 and q[0, 100] == -1.5 and q[0, 6] == round(0.1 / step) * step
    assert abs(q[0, 1] - 1e-3) <= 2.0 ** (-10 - 7) and abs(q[0, 8] - 1e-2) <= 2.0 ** (-7 - 7)
    assert q[0, 134] == 5.0
    # the 4-bit grouping puts column 1 with column 0 (and column 8 alone): a different result
    assert act_int8.quantize_x(x, code_bits=4)[0, 1] == 0.0
    with pytest.raises(ValueError, match="code_bits"):
        act_int8.quantize_x(x, code_bits=5)


@needs_native
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("bits", [4, 8])
def test_act_int8_with_nonfinite_x_falls_back_to_fp32(bad, bits):
    w = make_packed(bits, 128, True, False, 16, 512, seed=5)
    lay = repack(w)
    x = torch.randn(3, 512)
    x[1, 300] = bad
    torch.testing.assert_close(cpu_linear(x, lay, act_int8=True), dequant_matmul_ref(x, w), equal_nan=True,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("avx2_vnni" not in ISAS, reason="the CPU lacks AVX-VNNI (vpdpbusd on ymm)")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_avx_vnni_kernels_are_bit_equal_to_the_avx2_ones(bits, sym):
    """The avx2_vnni table's integer GEMVs and INT8 GEMM (vpdpbusd) sum the same exact integers as AVX2's
    vpmaddubsw + vpmaddwd emulation and convert and scale them alike: fp32 decode and INT8 activations at
    M = 1 and 3 (GEMV) and 16 and 40 (the outer-product GEMM of 4-bit layers), bit for bit. 8-bit layers:
    INT8 activations only (their fp32 decode carries x in other limbs on AVX2, lq_prepare_xw8)."""
    k = 4192  # 32 superblocks and a 96-column tail
    lay = repack(make_packed(bits, 128, sym, False, 70, k, seed=bits))
    x = torch.randn(40, k) * torch.exp(2 * torch.randn(1, k))
    for act in (False, True) if bits != 8 else (True,):
        for m in (1, 3, 16, 40):
            y = cpu_linear(x[:m], lay, isa="avx2_vnni", act_int8=act)
            assert torch.equal(y, cpu_linear(x[:m], lay, isa="avx2", act_int8=act)), (act, m)
    assert not torch.equal(cpu_linear(x[:1], lay, isa="avx2_vnni"), cpu_linear(x[:1], lay, isa="avx2", act_int8=True))
