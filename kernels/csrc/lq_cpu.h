/* llmquant CPU dequant-GEMM: the shared internal header.
 *
 * The library is a plain C shared object (no Python or torch headers); Python loads it with ctypes
 * (llmquant/kernels/cpu_native.py). Only the functions marked LQ_API are exported.
 *
 * Shape letters: M tokens (rows of x), N out_features, K in_features, G group size, NG groups.
 *
 * Run-time layout (derived from the checkpoint's packed format at load; never written to disk)
 * -------------------------------------------------------------------------------------------
 * Rows are grouped in tiles of LQ_TILE = 4 output channels (N is padded to a multiple of 4 with
 * all-zero rows); K is padded to Kp = ceil(K / 32) * 32 with code 0 (the kernel pads x with zeros,
 * so padded columns contribute nothing). Each tile is one contiguous run of bytes:
 *
 *   for each full superblock sb of 128 columns:  for each row r of the tile:  SB bytes
 *   then the tail (Kp % 128 = 0, 32, 64 or 96 columns): for each row r:  tail bytes
 *
 * 4-bit codes:
 *   superblock, 64 bytes = 32 little-endian uint16 "words": nibble s (bits 4s..4s+3) of word w
 *     holds column base + 32*s + w. A word is 4 columns 32 apart, so one 16-bit shift plus one
 *     16-entry table lookup (vpermw) yields 32 consecutive columns (the bf16 path); read as 16
 *     uint32 lanes, nibble j of lane l holds column base + 32*(j%4) + 2*l + (j/4), i.e. the even
 *     columns of block j%4 for j < 4 and the odd ones for j >= 4 (the fp32 path, vpermps).
 *   tail, 16 bytes per 32-column block: byte b holds column pb + 2b (low nibble) and pb + 2b + 1
 *     (high nibble).
 * 8-bit codes:
 *   superblock, 128 bytes = 4 blocks of 32 columns; block bytes 0..15 hold the even columns
 *     (pb + 2i), bytes 16..31 the odd columns (pb + 2i + 1). The tail uses the same 32-byte blocks.
 *
 * 2- and 3-bit codes (stored packed; the integer GEMVs of AVX2 and AVX512-VNNI read them as they are,
 * for every other kernel the driver expands a few tiles at a time into the 4-bit layout above, in a
 * buffer that stays in L1/L2):
 *   superblock, 32 bytes (2-bit) or 48 bytes (3-bit) per row, laid out for the decode kernels, which
 *     unpack a 4-bit row's 64 bytes as two vectors of byte positions j = 0..63: lo[j] = byte j & 15
 *     and hi[j] = byte j >> 4 (so lo[2w], lo[2w + 1], hi[2w], hi[2w + 1] are nibbles 0, 2, 1, 3 of
 *     word w).
 *     2-bit: bit pair f (bits 2f, 2f + 1) of byte b (b < 32) holds lo[32 f + b] for f < 2 and
 *     hi[32 (f - 2) + b] for f >= 2, so one shift and one mask give 32 positions.
 *     3-bit: bytes A = 0..31 and C = 32..47. Byte b of A holds lo[b] (bits 0-2), lo[32 + b] (bits 3-5)
 *     and the low two bits of hi[b] (bits 6-7); byte k of C holds hi[32 + k] (bits 0-2), hi[48 + k]
 *     (bits 3-5) and the third bits of hi[k] (bit 6) and hi[16 + k] (bit 7). Three of the four vectors
 *     of 32 positions are one shift and one mask (C broadcast to both 128-bit lanes, shifted by 0 | 3);
 *     hi[0..31] two more (an earlier layout, the low bits as for 2-bit and the 128 third bits in C,
 *     took three operations more per vector).
 *   tail: as the 4-bit tail (at most 96 columns a row).
 *
 * The fp32 kernels therefore read x in "xr order": inside every block of 32 columns, the 16 even
 * columns first, then the 16 odd ones. The bf16 kernels read x in natural order.
 *
 * Scales: fp16 [ntiles][NG][4]; zero points (asymmetric only): uint8 [ntiles][NG][4]; a symmetric
 * layer uses the implicit zero zc = 2**(bits-1) of its original bit width.
 * Dequantization is exactly the format's: w = (q - z) * s in fp32 (one rounding, like the reference).
 */
#ifndef LQ_CPU_H
#define LQ_CPU_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define LQ_API __declspec(dllexport)
#else
#define LQ_API __attribute__((visibility("default")))
#endif

/* LQ_PORTABLE_ONLY builds the scalar kernels alone (setup.py retries with it when the compiler
 * rejects the x86 vector code, e.g. one too old for AVX512-BF16) */
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(LQ_PORTABLE_ONLY)
#define LQ_X86 1
#else
#define LQ_X86 0
#endif
#if defined(__aarch64__) && !defined(LQ_PORTABLE_ONLY)
#define LQ_ARM64 1
#else
#define LQ_ARM64 0
#endif

#define LQ_TILE 4   /* output rows per tile */
#define LQ_SB 128   /* columns per superblock */
#define LQ_BLK 32   /* columns per block (the padding unit of K) */
#define LQ_MR 6     /* rows of x per GEMM micro-kernel call */
#define LQ_NR 16    /* output rows of one packed panel of the outer-product fp32 GEMM */
/* M up to this runs the GEMV kernel (weights dequantized in registers, in passes of 4 rows of x
 * over an L1-resident tile) rather than the GEMM (dequantized into a buffer once, then a
 * register-blocked micro-kernel). Measured crossover on Zen 4: about 32 in fp32, 4 in bf16. */
#ifndef LQ_GEMV_MAX_M_F32
#define LQ_GEMV_MAX_M_F32 32
#endif
#define LQ_GEMV_MAX_M_BF16 4

/* x86-64: SCALAR < AVX2 < AVX2_VNNI < AVX512 < AVX512_BF16 (lq_isa_rank; AVX2_VNNI, numbered last, is
 * AVX2 with the VEX-encoded vpdpbusd of AVX-VNNI, which some AVX-512 CPUs lack: a cap at it runs AVX2
 * there); AArch64: SCALAR < NEON < NEON_DOTPROD. A cap from the other family means "scalar". */
enum { LQ_ISA_SCALAR = 0, LQ_ISA_AVX2 = 1, LQ_ISA_AVX512 = 2, LQ_ISA_AVX512_BF16 = 3, LQ_ISA_NEON = 4,
       LQ_ISA_NEON_DOTPROD = 5, LQ_ISA_AVX2_VNNI = 6 };
#define LQ_ISA_LAST LQ_ISA_AVX2_VNNI
enum { LQ_F32 = 0, LQ_BF16 = 1 };
enum { LQ_OK = 0, LQ_EINVAL = -1, LQ_ENOMEM = -2 };

typedef struct {
    const uint8_t *q;  /* tiles, see above */
    const uint16_t *s; /* fp16 scales [ntiles][NG][4] */
    const uint8_t *z;  /* uint8 zero points [ntiles][NG][4], or NULL (symmetric) */
    int64_t N, K, Kp, G, NG, ntiles;
    int bits;    /* code width the kernels read: 4 or 8 */
    int pbits;   /* code width stored at q: 2, 3 (expanded to 4 by the driver), 4 or 8 */
    int64_t qt0; /* the tile index of q's first tile (a buffer of expanded tiles starts at t = qt0) */
    int zc;      /* implicit zero point of a symmetric layer */
} lq_layout;

static inline int64_t lq_nsb(const lq_layout *L) { return L->Kp / LQ_SB; }
static inline int64_t lq_tail(const lq_layout *L) { return L->Kp % LQ_SB; }
/* bytes of one row of a superblock as stored (2-, 3-bit: packed), and as the 4- or 8-bit kernels read it */
static inline int64_t lq_prow_sb_bytes(const lq_layout *L) { return LQ_SB * L->pbits / 8; }
static inline int64_t lq_row_sb_bytes(const lq_layout *L) { return LQ_SB * L->bits / 8; }
static inline int64_t lq_tile_bytes(const lq_layout *L) {
    return LQ_TILE * (lq_nsb(L) * lq_prow_sb_bytes(L) + lq_tail(L) * L->bits / 8);
}
static inline const uint8_t *lq_tile(const lq_layout *L, int64_t t) {
    return L->q + (t - L->qt0) * lq_tile_bytes(L);
}
/* bytes of row r of superblock sb inside tile t (a layout that is not packed) */
static inline const uint8_t *lq_sb_row(const lq_layout *L, int64_t t, int64_t sb, int r) {
    return lq_tile(L, t) + (sb * LQ_TILE + r) * lq_row_sb_bytes(L);
}
/* bytes of row r of the tail of tile t (block p of the tail is at + p * 32 * bits / 8); any layout */
static inline const uint8_t *lq_tail_row(const lq_layout *L, int64_t t, int r) {
    return lq_tile(L, t) + lq_nsb(L) * LQ_TILE * lq_prow_sb_bytes(L) + r * lq_tail(L) * L->bits / 8;
}

/* Which group a block of 32 columns belongs to, walked left to right. Valid when G % 32 == 0 or
 * NG == 1 (a block never straddles groups); the vector kernels require that, the scalar ones don't
 * use it. Columns past K (padding) stay in the last group. */
typedef struct {
    int64_t g, end, G, NG;
} lq_gcur;

static inline lq_gcur lq_gcur_at(const lq_layout *L, int64_t k) {
    lq_gcur c;
    c.G = L->G;
    c.NG = L->NG;
    c.g = k / L->G;
    if (c.g > L->NG - 1) c.g = L->NG - 1;
    c.end = (c.g == L->NG - 1) ? INT64_MAX : (c.g + 1) * L->G;
    return c;
}
/* advance to column k (k >= the previous one); returns 1 when the group changed */
static inline int lq_gcur_step(lq_gcur *c, int64_t k) {
    if (k < c->end) return 0;
    while (k >= c->end) {
        c->g++;
        c->end = (c->g == c->NG - 1) ? INT64_MAX : c->end + c->G;
    }
    return 1;
}

/* The per-ISA building blocks. Kernels only compute dot products; the driver (lq_driver.c) adds
 * the bias, converts and stores. A NULL entry means "not available at this ISA".
 *   gemv_tile:   out[i][r] = sum_k x[i][k] * W[4t + r][k] for i < mm (<= 4); x fp32 in xr order.
 *   dequant_*:   rows of tiles [t0, t0 + ntl), columns [k0, k0 + kc) (k0 % 128 == 0, kc % 32 == 0)
 *                -> buf[row * ldb + (k - k0)], fp32 in xr order or bf16 (RNE) in natural order.
 *   micro_*:     out[i][r] = sum_{k < kc} A[i][k] * B[r][k] for i < mr (<= LQ_MR), r < 4.
 *   gemv_tile_bf16: as gemv_tile, with x bf16 in natural order and the weights rounded to bf16
 *                (the bf16 GEMM's weights); 4-bit layouts only. */
typedef struct {
    const char *name;
    void (*gemv_tile)(const lq_layout *L, int64_t t, const float *x, int64_t ldx, int mm, float out[4][4]);
    void (*dequant_f32)(const lq_layout *L, int64_t t0, int64_t ntl, int64_t k0, int64_t kc, float *buf,
                        int64_t ldb);
    void (*dequant_bf16)(const lq_layout *L, int64_t t0, int64_t ntl, int64_t k0, int64_t kc, uint16_t *buf,
                         int64_t ldb);
    void (*micro_f32)(const float *A, int64_t lda, const float *B, int64_t ldb, int64_t kc, int mr,
                      float out[LQ_MR][4]);
    void (*micro_bf16)(const uint16_t *A, int64_t lda, const uint16_t *B, int64_t ldb, int64_t kc, int mr,
                       float out[LQ_MR][4]);
    void (*gemv_tile_bf16)(const lq_layout *L, int64_t t, const uint16_t *x, int64_t ldx, int mm, float out[4][4]);
    /* x on integer dot products (4-bit layouts whose groups change at superblock boundaries; the format
     * of a prepared row is below):
     *   prepare_xi: one row of x in xr order, nsb superblocks -> xi (LQ_XI_SB_BYTES(nlimbs) each,
     *               64-aligned); nlimbs 3: x to within 2^-22 of the largest of its 16 columns (the
     *               fp32 path), 1: int8 with a power-of-two scale per 16 columns (dynamic INT8
     *               activations).
     *               Returns 0, leaving xi undefined, when some x is NaN or infinite.
     *   gemv_i8:    out[i][r] = sum_k x[i][k] * W[4t + r][k] for mm (<= i8_rows) prepared rows xi (row
     *               stride ldxi bytes; mm = 1 when nlimbs = 3); xr: the same rows in xr order, stride ldx
     *               (the tail columns, Kp % 128, are done in fp32). */
    int (*prepare_xi)(const float *xr, int64_t nsb, int nlimbs, uint8_t *xi);
    void (*gemv_i8)(const lq_layout *L, int64_t t, const uint8_t *xi, int64_t ldxi, int mm, int nlimbs,
                    const float *xr, int64_t ldx, float out[4][4]);
    /* the most rows gemv_i8 takes at once (the registers hold mm x 4 accumulators) */
    int i8_rows;
    /* 1 when gemv_i8 needs AVX512-VNNI, which the AVX-512 tables cannot assume */
    int i8_needs_vnni;
    /* tile t of a packed 2- or 3-bit layout -> the same tile in the 4-bit layout (LQ_TILE * Kp / 2 bytes) */
    void (*expand_tile)(const lq_layout *L, int64_t t, uint8_t *out);
    /* 1 when gemv_i8 reads packed 2- and 3-bit layouts itself (the others get expanded tiles) */
    int i8_reads_packed;
    /* The outer-product fp32 GEMM (both NULL: the driver's GEMM multiplies with micro_f32 instead):
     *   dequant_panel_f32: the rows of tiles [t0, t0 + ntl) (ntl <= LQ_NR / 4), columns [k0, k0 + kc)
     *                 (k0 % 128 == 0, kc % 32 == 0) -> one panel P[(k - k0) * LQ_NR + j] = row 4 t0 + j's
     *                 weight at column k, fp32 in xr order (rows 4 ntl .. LQ_NR - 1 zero).
     *   micro_op_f32: C[i * ldc + j] = sum_{k < kc} A[i * lda + k] * P[k * LQ_NR + j] for i < mr (<= LQ_MR),
     *                 j < LQ_NR (and with op_np = 2 the same for the panel at P + kc * LQ_NR into
     *                 C + LQ_NR); added to C's values when acc, else stored. One value of each of the mr rows
     *                 of x at a time is broadcast against a panel row of LQ_NR weights: no horizontal sums,
     *                 a register block of mr x LQ_NR accumulators. */
    void (*dequant_panel_f32)(const lq_layout *L, int64_t t0, int ntl, int64_t k0, int64_t kc, float *P);
    void (*micro_op_f32)(const float *A, int64_t lda, const float *P, int64_t kc, int mr, float *C, int64_t ldc,
                         int acc);
    /* The outer-product GEMM of dynamic INT8 activations (4-bit codes, groups constant within a
     * superblock; both NULL: run_gemv_i8 instead):
     *   pack_i8:     superblocks [sb0, sb0 + nsbc) of the rows of tiles [t0, t0 + ntl) (ntl <= LQ_NR / 4)
     *                -> one panel of LQ_I8_PANEL_SB bytes per superblock: 32 steps of 4 columns (scale
     *                lane s = 0..7 takes steps 4s .. 4s + 3: the lo and hi nibble bytes of code lane s,
     *                then of lane s + 8, the columns of prepared-x dwords lo[s], hi[s], lo[s+8], hi[s+8]),
     *                each LQ_NR rows x 4 codes (one byte each); then the LQ_NR rows' fp32 scales and int32
     *                zero points of the superblock's group (rows past 4 ntl: codes, scales 0).
     *   micro_op_i8: C[i * ldc + j] += sum over the nsbc superblocks of x row i (prepared, one limb;
     *                row stride ldxi) times panel row j, for i < mr (<= LQ_I8_MR), j < LQ_NR; zs: per row
     *                and superblock 8 int32 per scale lane (code lanes l and l + 8): the sums of m when
     *                asym (the zero points differ by row), else the zero-point term -zc * sum m itself;
     *                row stride ldzs ints. */
    void (*pack_i8)(const lq_layout *L, int64_t t0, int ntl, int64_t sb0, int64_t nsbc, uint8_t *P);
    void (*micro_op_i8)(const uint8_t *xi, int64_t ldxi, const int32_t *zs, int64_t ldzs, const uint8_t *P,
                        int64_t nsbc, int mr, int asym, float *C, int64_t ldc);
    /* panels per micro_op_f32 call (1 or 2: the second at P + kc * LQ_NR, its columns at C + LQ_NR; a
     * missing one is all zeros) */
    int op_np;
    /* fp32 decode (M = 1) of 8-bit layouts whose groups change at superblock boundaries, on integer dot
     * products (NULL: the FMA GEMV; needs VNNI where i8_needs_vnni): out[0][r] = x . W[4t + r] for one
     * row of x prepared by prepare_x8 (xi: lq_prepare_xi8 or lq_prepare_xw8, LQ_XI8_SB_BYTES a
     * superblock) and in xr order (xr: the tail columns, done in fp32) */
    void (*gemv_x8)(const lq_layout *L, int64_t t, const uint8_t *xi, const float *xr, float out[4][4]);
    int (*prepare_x8)(const float *xr, int64_t nsb, uint8_t *xi);
    /* Dynamic INT8 activations on 8-bit layouts (W8A8) whose groups change at superblock boundaries
     * (NULL: such a call keeps the exact fp32 paths; needs VNNI where i8_needs_vnni): out[i][r] =
     * x_i . W[4t + r] for mm (<= a8x8_rows) rows of x prepared by prepare_xa8 (LQ_XI8_SB_BYTES a
     * superblock, one limb; row stride ldxi bytes) and in xr order (row stride ldx: the tail columns,
     * done in fp32) */
    void (*gemv_a8x8)(const lq_layout *L, int64_t t, const uint8_t *xi, int64_t ldxi, int mm, const float *xr,
                      int64_t ldx, float out[4][4]);
    int (*prepare_xa8)(const float *xr, int64_t nsb, uint8_t *xi);
    int a8x8_rows;
    /* 1 when gemv_i8 and prepare_xi take nlimbs = 2 (bf16-class x at M = 1; tables without it run 3) */
    int i8_limbs2;
} lq_kernels;

/* A row of x prepared for the integer GEMV, one block of LQ_XI_SB_BYTES(n) bytes per superblock.
 *
 * The superblock's 128 columns form 16 lanes of 8: lane l holds columns 32 c + 2 l + j (c = 0..3,
 * j = 0, 1), the columns that share int32 lane l of the dot products against the 4-bit superblock
 * layout above (nibble s of word w is column 32 s + w: the low nibbles of byte pair (2l, 2l+1) ... of
 * a 64-byte row are columns 2l, 64+2l, 2l+1, 65+2l; the high nibbles 32+2l, 96+2l, 33+2l, 97+2l).
 * Lanes l and l + 8 share one power-of-two scale 2^(e - S): e = floor(log2 max|x|) over their 16
 * columns (at least -100; 0 when all are zero), S = LQ_XI_SHIFT(n) (21 for n = 3 limbs, 13 for n = 2,
 * 6 for n = 1), and each x becomes the integer m = round(x * 2^(S - e)) (to nearest even; with n = 1
 * clamped to [-127, 127]), stored as n signed bytes m = l0 + 2^8 l1 + 2^16 l2 (l0 and l1 "balanced",
 * in [-128, 127]).
 *   n = 3: |m| <= 2^22, so x is kept to within 2^(e - 22) <= 2^-22 of the largest of its 16
 *          columns: the fp32 path, as accurate as fp32 FMA (tests).
 *   n = 2: |m| <= 2^14: within 2^-14 of the largest of its 16 columns, and exact for a bf16 x at least
 *          2^-6 of that largest (bf16 keeps 8 significant bits): decode of bf16 x, and of fp32 x whose
 *          user allowed bf16 math (torch's "medium" matmul precision), where the table has i8_limbs2.
 *   n = 1: dynamic INT8 activations: 7 bits per value relative to the largest of its 16 columns.
 * The shared scale lets AVX2 add a row's two halves in int16 before widening them to int32 (a third
 * fewer instructions with one limb; with three, the limbs' products stay under vpmaddubsw's count).
 * Byte order in the block: for limb p, "lo" (64 bytes at 64 p) and "hi" (64 bytes at 64 n + 64 p):
 * byte 4 l + b of lo is limb p of the column paired with low-nibble byte b of lane l (columns 2l,
 * 64+2l, 2l+1, 65+2l), of hi the high-nibble columns (32+2l, 96+2l, 33+2l, 97+2l). Then 16 int32
 * lane sums of m (at 128 n; the zero-point term -z sum m) and 16 fp32 lane scales 2^(e - S)
 * (at 128 n + 64). The dot product of a row with codes q and zero point z over a superblock is
 * sum_l scale_l * (sum_{k in l} q_k m_k - z * msum_l), the inner sums exact in int32. */
#define LQ_XI_SB_BYTES(nlimbs) (128 * (nlimbs) + 128)
#define LQ_XI_SHIFT(nlimbs) ((nlimbs) == 3 ? 21 : (nlimbs) == 2 ? 13 : 6)
/* A row of x prepared for gemv_x8 (8-bit layouts), one block of LQ_XI8_SB_BYTES bytes per superblock.
 * An 8-bit superblock row is in xr order, so code byte b multiplies xr[b], and int32 lane L of the dot
 * products over a 64-byte half h takes xr positions 64 h + 4 L + j (j = 0..3). Lanes L and L + 8 share
 * one scale 2^(e - 21), e over the 16 positions 32 q + 4 (L % 8) + j (q = 0..3) as for 4-bit, and x
 * becomes the same three balanced signed bytes of m = round(x 2^(21 - e)). Limb p: 128 bytes at 128 p
 * (byte b: limb p of xr[b]); then per limb 16 int32 lane sums of that limb (at 384 + 64 p, over both
 * halves); then the 16 fp32 lane scales (at 576). A code is up to 255, so the sum of q m over a lane
 * could overflow int32: each limb's sum T_p = sum q l_p - z sum l_p (|T_p| < 2^20) is converted to
 * fp32 exactly and they are combined there, (T_2 2^8 + T_1) 2^8 + T_0 (two roundings). */
#define LQ_XI8_SB_BYTES 640
int lq_prepare_xi8(const float *xr, int64_t nsb, uint8_t *xi); /* lq_scalar.c; 0 when some x is not finite */
/* The same block for dynamic INT8 activations (gemv_a8x8), one limb: m = round(x 2^(6 - e)) clamped to
 * [-127, 127] (e over the same 16 positions; kernels/act_int8.py) at bytes 0..127, its 16 int32 lane
 * sums at 384, the 16 fp32 lane scales 2^(e - 6) at 576; the other bytes are unused. The products
 * q m of a lane (|q| <= 255, |m| <= 127, 8 of them) and the zero-point term stay exact in int32. */
int lq_prepare_xa8(const float *xr, int64_t nsb, uint8_t *xi); /* lq_scalar.c */
/* The same for AVX2 without VNNI, whose vpmaddubsw cannot take a whole 8-bit code (its int16 pair sums
 * would overflow): x as two int16 limbs for vpmaddwd against the codes widened to 16 bits. Int32 lane L
 * of vpmaddwd over 16 codes at 16 i takes xr positions 16 i + 2 L + j (j = 0, 1; L = 0..7); its 16
 * positions (i = 0..7) share one scale 2^(e - 21), and m = round(x 2^(21 - e)) = l0 + 2^16 l1 (l0 in
 * [-2^15, 2^15), |l1| <= 64). Limb p: 128 int16 at 256 p (element b: limb p of xr[b]); 8 int32 lane
 * sums of each limb at 512 + 32 p; 8 fp32 lane scales at 576. */
int lq_prepare_xw8(const float *xr, int64_t nsb, uint8_t *xi); /* lq_scalar.c */
/* bytes of one prepared row of x for layout L: gemv_x8's for an 8-bit layout, else gemv_i8's */
static inline int64_t lq_xi_row_bytes(const lq_layout *L, int nlimbs) {
    return lq_nsb(L) * (L->bits == 8 ? LQ_XI8_SB_BYTES : LQ_XI_SB_BYTES(nlimbs));
}

/* bytes of one superblock of a pack_i8 panel: codes, then fp32 scales and int32 zero points */
#define LQ_I8_PANEL_SB (LQ_SB * LQ_NR + 8 * LQ_NR)
#define LQ_I8_MR 3 /* rows of x per micro_op_i8 call (4 spills accumulators with gcc on AVX2) */

extern const lq_kernels lq_kernels_scalar;
void lq_expand_tile_scalar(const lq_layout *L, int64_t t, uint8_t *out);
int lq_prepare_xi_scalar(const float *xr, int64_t nsb, int nlimbs, uint8_t *xi);
#if LQ_ARM64
extern const lq_kernels lq_kernels_neon;
extern const lq_kernels lq_kernels_neon_dotprod;
#endif
#if LQ_X86
void lq_expand_tile_avx2(const lq_layout *L, int64_t t, uint8_t *out);
/* the AVX2 panel dequantization, shared by the AVX-512 tables (exact: the same weights at every ISA) */
void lq_dequant_panel_f32_avx2(const lq_layout *L, int64_t t0, int ntl, int64_t k0, int64_t kc, float *P);
extern const lq_kernels lq_kernels_avx2;
extern const lq_kernels lq_kernels_avx2_vnni;
extern const lq_kernels lq_kernels_avx512;
extern const lq_kernels lq_kernels_avx512_bf16;
/* the fp32 AVX-512 blocks, shared by the AVX-512 BF16 table */
void lq_gemv_tile_avx512(const lq_layout *L, int64_t t, const float *x, int64_t ldx, int mm, float out[4][4]);
void lq_dequant_f32_avx512(const lq_layout *L, int64_t t0, int64_t ntl, int64_t k0, int64_t kc, float *buf,
                           int64_t ldb);
void lq_micro_f32_avx512(const float *A, int64_t lda, const float *B, int64_t ldb, int64_t kc, int mr,
                         float out[LQ_MR][4]);
int lq_prepare_xi_avx512(const float *xr, int64_t nsb, int nlimbs, uint8_t *xi);
void lq_micro_op_f32_avx512(const float *A, int64_t lda, const float *P, int64_t kc, int mr, float *C, int64_t ldc,
                            int acc);
void lq_gemv_i8_avx512(const lq_layout *L, int64_t t, const uint8_t *xi, int64_t ldxi, int mm, int nlimbs,
                       const float *xr, int64_t ldx, float out[4][4]);
void lq_gemv_x8_avx512(const lq_layout *L, int64_t t, const uint8_t *xi, const float *xr, float out[4][4]);
int lq_prepare_xi8_avx512(const float *xr, int64_t nsb, uint8_t *xi);
int lq_prepare_xa8_avx512(const float *xr, int64_t nsb, uint8_t *xi);
void lq_gemv_a8x8_avx512(const lq_layout *L, int64_t t, const uint8_t *xi, int64_t ldxi, int mm, const float *xr,
                         int64_t ldx, float out[4][4]);
/* tails[i][r]: the fp32 dot product of row r of an 8-bit layout's tile t with row i of xr (i < mm, rows ldx
 * apart) over the tail columns (Kp % 128), from group cursor gc (the AVX2 and AVX512-VNNI 8-bit GEMVs) */
void lq_tails_8bit_avx2(const lq_layout *L, int64_t t, lq_gcur gc, const float *xr, int64_t ldx, int mm,
                        float tails[4][4]);
#endif
/* The body of a micro_op_f32 entry point (parameters A, lda, P, kc, mr, C, ldc, acc): KERNEL, an inline
 * function with those parameters and a compile-time row count in place of mr, instantiated for
 * mr = 1 .. LQ_MR (LQ_MR = 6) */
#define LQ_MICRO_OP_DISPATCH(KERNEL)                              \
    switch (mr) {                                                 \
    case 1: KERNEL(A, lda, P, kc, 1, C, ldc, acc); break;         \
    case 2: KERNEL(A, lda, P, kc, 2, C, ldc, acc); break;         \
    case 3: KERNEL(A, lda, P, kc, 3, C, ldc, acc); break;         \
    case 4: KERNEL(A, lda, P, kc, 4, C, ldc, acc); break;         \
    case 5: KERNEL(A, lda, P, kc, 5, C, ldc, acc); break;         \
    default: KERNEL(A, lda, P, kc, 6, C, ldc, acc); break;        \
    }

/* lq_api.c: how many bytes ahead of the codes they read the x86 GEMVs (AVX2, AVX-512) prefetch into L1 (lq_pf_l1) and,
 * further, into L2 (lq_pf_l2); 0: no such prefetch. Measured defaults, or lq_set_prefetch's
 * (LLMQUANT_CPU_PREFETCH). */
extern int lq_pf_l1, lq_pf_l2;

/* lq_api.c: whether the CPU has AVX-512 and AVX512-VNNI (cached cpuid) */
LQ_API int lq_has_vnni(void);

/* One call of the library: a prepared x and where the result goes. */
typedef struct {
    lq_layout L;
    const lq_kernels *kern;
    int64_t M;
    int mode;        /* LQ_F32: xp is fp32 [M][Kp] in xr order; LQ_BF16: bf16 [M][Kp] natural */
    const void *xp;
    int64_t ldx;       /* row stride of xp, in elements (>= Kp) */
    const uint8_t *xi; /* rows of x prepared for gemv_i8 or gemv_x8 ([M][lq_xi_row_bytes]), or NULL */
    int nlimbs;
    const float *bias; /* [N] or NULL */
    void *y;           /* [M][N] */
    int y_dtype;
} lq_problem;

/* lq_driver.c */
int lq_run_tiles(const lq_problem *p, int64_t t_begin, int64_t t_end); /* LQ_OK or LQ_ENOMEM */
void lq_prepare_x(const void *x, int x_dtype, int64_t m_begin, int64_t m_end, int64_t K, int64_t Kp, int mode,
                  void *xp, int64_t ldx);

/* lq_pool.c: run fn(arg, part, nparts) for part in [0, nparts) on up to nparts threads (the caller
 * runs part 0). Returns when every part is done. */
typedef void (*lq_task_fn)(void *arg, int part, int nparts);
void lq_parallel(int nparts, lq_task_fn fn, void *arg);
/* lq_pool.c: run the parts on torch's OpenMP team from now on (entry points of the runtime torch
 * loaded), or on our own pool again (all NULL). LQ_EINVAL if only some are given. */
LQ_API int lq_set_openmp(void *gomp_parallel, void *get_thread_num, void *get_num_threads);

/* lq_scalar.c: conversions shared by every ISA */
float lq_f16_to_f32(uint16_t h);
uint16_t lq_f32_to_bf16(float f);
static inline float lq_bf16_to_f32(uint16_t b) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)b << 16;
    return v.f;
}
/* position of column i (0..31) of a block in xr order */
static inline int lq_xr_pos(int i) { return (i & 1) * 16 + (i >> 1); }

#endif
