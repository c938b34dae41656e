"""The Triton program behind :mod:`llmquant.kernels.triton_w4a16` (imported lazily, on first launch).

Kept apart from the kernel class so that importing the registry never imports Triton, and because
Triton decides at decoration time whether ``@triton.jit`` compiles or interprets (``TRITON_INTERPRET``
is read when this module is imported, not when the kernel runs).

Layout the program reads (derived by ``prepare()`` from the stored format, never written to disk):

    x          float  [M, K]      activations, already gathered by ``perm`` for act-order layers
    qweight_t  int32  [KW, N]     the stored qweight transposed; KW = ceil(K/32) * BITS. Word row
                                  r holds codes k = r*PER .. r*PER + PER-1 (PER = 32 // BITS), code
                                  k in bits [(k % PER) * BITS, +BITS): for BITS in (2, 4, 8) the
                                  stored bit stream never straddles a word, so this is exactly the
                                  on-disk word, moved so that a row of N words is contiguous.
                                  3-bit layers: the low two bits of every code, laid out as a 2-bit
                                  layer's qweight_t (KW = ceil(K/32) * 2), and
    qhigh_t    int32  [ceil(K/32), N]  their third bits, code k at bit k % 32 of word row k // 32
                                  (together 3 bits a code, as stored)
    scales_t   fp16   [NG, N]
    zeros_t    uint8  [NG, N]     asymmetric layers only; symmetric layers use 2**(BITS-1)
    y          [M, N] in x's dtype, or (SPLIT_OUT) fp32 [S, M, N] partial sums, one per K split

Transposing to K-major puts the N words of one K row side by side, so a tile's loads are
contiguous along N (coalesced), the way the dot product wants its right operand.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


# M varies call to call (decode, prefill): no specializing on it keeps one compiled program per
# layer shape. N, K and the strides stay specialized (divisibility by 16 gives wide loads).
@triton.jit(do_not_specialize=["M"])
def dequant_gemm_kernel(
    x_ptr,
    qw_ptr,
    qh_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    G,
    tiles_per_split,
    stride_xm,
    stride_qk,
    stride_qhk,
    stride_sg,
    stride_zg,
    stride_ys,
    stride_ym,
    BITS: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GROUP_PER_TILE: tl.constexpr,
    DEQ_FP16: tl.constexpr,
    DEQ_MAGIC: tl.constexpr,
    SWAP_AB: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    UNPACK_RESHAPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_OUT: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    # 3-bit layers come as a 2-bit plane (read like a 2-bit layer) and a plane of third bits
    LBITS: tl.constexpr = 2 if BITS == 3 else BITS
    PER: tl.constexpr = 32 // LBITS  # codes per int32 word
    QMASK: tl.constexpr = (1 << LBITS) - 1
    SYM_ZERO: tl.constexpr = 1 << (BITS - 1)

    # Program ids: axis 0 walks the (M, N) output tiles, in bands of GROUP_M tile rows so that
    # programs running together share weight tiles in L2 (large M); axis 1 is the K split.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_band = GROUP_M * num_pid_n
    first_m = (pid // per_band) * GROUP_M
    band_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_band) % band_m
    pid_n = (pid % per_band) // band_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # Row offsets in int64: M * N passes 2**31 for a quantized lm_head over a long prompt.
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T = W x^T
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_begin = pid_k * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, tl.cdiv(K, BLOCK_K))
    if PREFETCH:  # (set only with GROUP_PER_TILE)
        # The first tile's scale row (and zero points); each iteration then loads the next tile's
        # while it works on its own, so the load's latency hides behind a tile of work.
        # (the last iteration's "next" row is clamped to the last group: a valid, unused load)
        g_last = tl.cdiv(K, G) - 1
        g_nx = tl.minimum((t_begin * BLOCK_K) // G, g_last)
        s_nx = tl.load(s_ptr + g_nx * stride_sg + offs_n, mask=n_mask, other=0.0)
        if HAS_ZEROS:
            z_nx = tl.load(z_ptr + g_nx * stride_zg + offs_n, mask=n_mask, other=0)
    for t in range(t_begin, t_end):
        k0 = t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        # Columns past K read x = 0, so whatever the (zero-padded) weight holds there adds nothing.
        if SWAP_AB:
            x = tl.load(x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + offs_k[:, None],
                        mask=k_mask[:, None] & m_mask[None, :], other=0.0)  # fmt: skip
        else:
            x = tl.load(
                x_rows + offs_k[None, :],
                mask=m_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
        if SWAP_AB:
            # The weight tile as the left operand, [BLOCK_N, BLOCK_K]: Hopper's warp-group MMA takes
            # its left operand from registers, where the codes are unpacked, and only x^T through
            # shared memory. Words still load contiguously along N (axis 0 here).
            offs_r = k0 // PER + tl.arange(0, BLOCK_K // PER)
            words = tl.load(
                qw_ptr + offs_r[None, :] * stride_qk + offs_n[:, None],
                mask=(offs_r[None, :] * PER < K) & n_mask[:, None],
                other=0,
            )
            shifts = tl.arange(0, PER) * LBITS
            q = (words[:, :, None] >> shifts[None, None, :]) & QMASK
            q = tl.reshape(q, (BLOCK_N, BLOCK_K))
            if BITS == 3:
                offs_h = k0 // 32 + tl.arange(0, BLOCK_K // 32)
                hw = tl.load(qh_ptr + offs_h[None, :] * stride_qhk + offs_n[:, None],
                             mask=(offs_h[None, :] * 32 < K) & n_mask[:, None], other=0)  # fmt: skip
                hb = (hw[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
                q = q | (tl.reshape(hb, (BLOCK_N, BLOCK_K)) << 2)
        elif UNPACK_RESHAPE:
            # Load each word once ([BLOCK_K // PER, BLOCK_N]), shift out its PER codes along a new
            # middle axis and fold that axis into K: row r*PER + j of the tile is code j of word r.
            offs_r = k0 // PER + tl.arange(0, BLOCK_K // PER)
            words = tl.load(
                qw_ptr + offs_r[:, None] * stride_qk + offs_n[None, :],
                mask=(offs_r[:, None] * PER < K) & n_mask[None, :],
                other=0,
            )
            shifts = tl.arange(0, PER) * LBITS
            q = (words[:, None, :] >> shifts[None, :, None]) & QMASK
            q = tl.reshape(q, (BLOCK_K, BLOCK_N))
            if BITS == 3:
                offs_h = k0 // 32 + tl.arange(0, BLOCK_K // 32)
                hw = tl.load(qh_ptr + offs_h[:, None] * stride_qhk + offs_n[None, :],
                             mask=(offs_h[:, None] * 32 < K) & n_mask[None, :], other=0)  # fmt: skip
                hb = (hw[:, None, :] >> tl.arange(0, 32)[None, :, None]) & 1
                q = q | (tl.reshape(hb, (BLOCK_K, BLOCK_N)) << 2)
        else:
            # Load the word of every code ([BLOCK_K, BLOCK_N]; each word PER times, from cache) and
            # shift its own code down. Signed >> smears the sign bit, which QMASK clears.
            words = tl.load(
                qw_ptr + (offs_k // PER)[:, None] * stride_qk + offs_n[None, :],
                mask=k_mask[:, None] & n_mask[None, :],
                other=0,
            )
            q = (words >> ((offs_k % PER) * LBITS)[:, None]) & QMASK
            if BITS == 3:
                hw = tl.load(qh_ptr + (offs_k // 32)[:, None] * stride_qhk + offs_n[None, :],
                             mask=k_mask[:, None] & n_mask[None, :], other=0)  # fmt: skip
                q = q | (((hw >> (offs_k % 32)[:, None]) & 1) << 2)

        if PREFETCH:
            s_row = s_nx
            g_nx = tl.minimum((k0 + BLOCK_K) // G, g_last)
            s_nx = tl.load(s_ptr + g_nx * stride_sg + offs_n, mask=n_mask, other=0.0)
            if HAS_ZEROS:
                z_row = z_nx.to(tl.int32)
                z_nx = tl.load(z_ptr + g_nx * stride_zg + offs_n, mask=n_mask, other=0)
            if SWAP_AB:
                s = s_row[:, None]
                if HAS_ZEROS:
                    z = z_row[:, None]
                else:
                    z = SYM_ZERO
            else:
                s = s_row[None, :]
                if HAS_ZEROS:
                    z = z_row[None, :]
                else:
                    z = SYM_ZERO
        elif SWAP_AB:
            if GROUP_PER_TILE:
                g = k0 // G
                s = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_mask, other=0.0)[:, None]
                if HAS_ZEROS:
                    z = tl.load(z_ptr + g * stride_zg + offs_n, mask=n_mask, other=0).to(tl.int32)[:, None]
                else:
                    z = SYM_ZERO
            else:
                g = offs_k // G
                gk_mask = n_mask[:, None] & k_mask[None, :]
                s = tl.load(s_ptr + g[None, :] * stride_sg + offs_n[:, None], mask=gk_mask, other=0.0)
                if HAS_ZEROS:
                    z_ptrs = z_ptr + g[None, :] * stride_zg + offs_n[:, None]
                    z = tl.load(z_ptrs, mask=gk_mask, other=0).to(tl.int32)
                else:
                    z = SYM_ZERO
        elif GROUP_PER_TILE:
            # G is a multiple of BLOCK_K (or the layer has one group): the tile lies in one group.
            g = k0 // G
            s = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_mask, other=0.0)[None, :]
            if HAS_ZEROS:
                z = tl.load(z_ptr + g * stride_zg + offs_n, mask=n_mask, other=0).to(tl.int32)[None, :]
            else:
                z = SYM_ZERO
        else:
            g = offs_k // G
            gk_mask = k_mask[:, None] & n_mask[None, :]
            s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :], mask=gk_mask, other=0.0)
            if HAS_ZEROS:
                z = tl.load(z_ptr + g[:, None] * stride_zg + offs_n[None, :], mask=gk_mask, other=0).to(tl.int32)
            else:
                z = SYM_ZERO

        if DEQ_MAGIC:
            # No integer-to-float instruction per code: OR-ing q (< 1024) into the bits of fp16
            # 1024.0 gives the float 1024 + q exactly (likewise 2**23 + q in fp32); subtracting
            # 1024 + z leaves q - z exactly, the value the "cvt" branch converts.
            if DEQ_FP16:
                if HAS_ZEROS:
                    zm = (z + 1024).to(tl.float16)  # one row (or tile) of zero points, not per code
                else:
                    zm = tl.full((1, 1), SYM_ZERO + 1024, tl.float16)
                w = ((q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - zm) * s
            else:
                if HAS_ZEROS:
                    zm = (z + 8388608).to(tl.float32)
                else:
                    zm = tl.full((1, 1), SYM_ZERO + 8388608, tl.float32)
                qf = (q | 0x4B000000).to(tl.float32, bitcast=True)
                w = ((qf - zm) * s.to(tl.float32)).to(x.dtype)
        elif DEQ_FP16:
            # q - z is a small integer (exact in fp16) and s is fp16, so one fp16 multiply rounds
            # exactly like the format's float32 product rounded to fp16, with no float32 round trip.
            w = (q - z).to(tl.float16) * s
        else:
            w = ((q - z).to(tl.float32) * s.to(tl.float32)).to(x.dtype)

        if SWAP_AB:
            if IEEE_DOT:
                acc = tl.dot(w, x, acc, input_precision="ieee")
            else:
                acc = tl.dot(w, x, acc)
        elif IEEE_DOT:
            acc = tl.dot(x, w, acc, input_precision="ieee")  # fp32 inputs: no TF32 rounding
        else:
            acc = tl.dot(x, w, acc)

    if SWAP_AB:
        y_mask = n_mask[:, None] & m_mask[None, :]
        y_off = offs_m.to(tl.int64)[None, :] * stride_ym + offs_n[:, None]
        if HAS_BIAS and not SPLIT_OUT:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    else:
        y_mask = m_mask[:, None] & n_mask[None, :]
        y_off = offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        if HAS_BIAS and not SPLIT_OUT:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if not SPLIT_OUT:
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        # fp32 partial sums; the wrapper adds the splits in a fixed order (deterministic), then bias.
        tl.store(y_ptr + pid_k * stride_ys + y_off, acc, mask=y_mask)


@triton.jit
def splitk_sum_kernel(p_ptr, b_ptr, y_ptr, MN, N, S, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y[M, N] = sum over s of p[s, M, N] (in order s = 0, 1, ...: deterministic) + bias, in y's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(S):
        acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def splitk_sum(part, bias, y):
    """y = part.sum(0) + bias in y's dtype, one launch (part: fp32 [S, M, N] contiguous)."""
    s, m, n = part.shape
    block = 1024
    splitk_sum_kernel[(triton.cdiv(m * n, block),)](
        part, bias if bias is not None else part, y, m * n, n, s, HAS_BIAS=bias is not None, BLOCK=block
    )


def launch(x, qweight_t, qhigh_t, scales_t, zeros_t, bias, y, *, bits, group_size, cfg, tiles_per_split):
    """Launch one dequant-GEMM; shapes and the config have been checked by the caller."""
    m, k = x.shape
    n = qweight_t.shape[1]
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
    ng = scales_t.shape[0]
    group_per_tile = (ng == 1) or (group_size % cfg.block_k == 0)
    dequant_gemm_kernel[grid](
        x,
        qweight_t,
        qhigh_t if qhigh_t is not None else qweight_t,  # placeholder pointer, never read
        scales_t,
        zeros_t if zeros_t is not None else scales_t,  # placeholder pointer, never read
        bias if bias is not None else scales_t,  # placeholder pointer, never read
        y,
        m,
        n,
        k,
        group_size,
        tiles_per_split,
        x.stride(0),
        qweight_t.stride(0),
        qhigh_t.stride(0) if qhigh_t is not None else 0,
        scales_t.stride(0),
        zeros_t.stride(0) if zeros_t is not None else 0,
        y.stride(0) if cfg.split_k > 1 else 0,
        y.stride(-2),
        BITS=bits,
        HAS_ZEROS=zeros_t is not None,
        HAS_BIAS=bias is not None,
        GROUP_PER_TILE=group_per_tile,
        DEQ_FP16=x.dtype == torch.float16,
        DEQ_MAGIC=cfg.deq == "magic",
        SWAP_AB=cfg.operands == "wx",
        IEEE_DOT=x.dtype == torch.float32,
        UNPACK_RESHAPE=cfg.unpack == "reshape",
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        SPLIT_OUT=cfg.split_k > 1,
        PREFETCH=bool(cfg.prefetch) and group_per_tile,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_DIVISIBLE_16 = ("x_ptr", "qw_ptr", "qh_ptr", "s_ptr", "z_ptr", "b_ptr", "y_ptr", "N", "K", "stride_xm", "stride_qk",
                 "stride_sg", "stride_zg", "stride_ym")  # fmt: skip


def compile_for_target(arch: int, x_dtype, *, bits: int, has_zeros: bool, has_bias: bool,
                       group_per_tile: bool, cfg):  # fmt: skip
    """Compile the program ahead of time for CUDA compute capability ``arch`` (80, 90, ...) with no
    GPU present (Triton ships ptxas), as ``launch`` would for shapes divisible by 16. Returns
    Triton's compiled kernel: ``.asm["cubin"]``, ``.asm["ptx"]``, ``.metadata.shared`` (bytes).

    For checks on machines without a GPU; needs a process where TRITON_INTERPRET was unset when
    Triton was imported.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    split_out = cfg.split_k > 1
    t = _TRITON_TYPES[x_dtype]
    sig = {
        "x_ptr": f"*{t}", "qw_ptr": "*i32", "qh_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8" if has_zeros else "*fp16",
        "b_ptr": f"*{t}" if has_bias else "*fp16", "y_ptr": "*fp32" if split_out else f"*{t}",
    }  # fmt: skip
    for name in ("M", "N", "K", "G", "tiles_per_split", "stride_xm", "stride_qk", "stride_qhk", "stride_sg", "stride_zg",
                 "stride_ys", "stride_ym"):  # fmt: skip
        sig[name] = "i32"
    constexprs = dict(
        BITS=bits, HAS_ZEROS=has_zeros, HAS_BIAS=has_bias, GROUP_PER_TILE=group_per_tile,
        DEQ_FP16=x_dtype == torch.float16, DEQ_MAGIC=cfg.deq == "magic", SWAP_AB=cfg.operands == "wx",
        IEEE_DOT=x_dtype == torch.float32,
        UNPACK_RESHAPE=cfg.unpack == "reshape", BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, SPLIT_OUT=split_out,
        PREFETCH=bool(cfg.prefetch) and group_per_tile,
    )  # fmt: skip
    sig.update({name: "constexpr" for name in constexprs})
    names = dequant_gemm_kernel.arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in _DIVISIBLE_16}
    src = ASTSource(dequant_gemm_kernel, sig, constexprs, attrs)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
