/* AArch64 kernels: Advanced SIMD (NEON, every ARMv8-A CPU), and with the dot-product extension
 * (Armv8.2 SDOT, "asimddp" in /proc/cpuinfo) the integer GEMV of lq_cpu.h.
 *
 * Every 32-column block is decoded into two vectors of 16 codes in xr order (the 16 even columns,
 * then the 16 odd ones), so one FMA loop serves every layout:
 *   4-bit superblock: one de-interleaving load (ld4) of a row's 64 bytes gives byte 4l + j in
 *     lane l of vector j: vectors 0 and 1 are word 2l (even columns), 2 and 3 word 2l + 1 (odd);
 *     block c is nibble c & 1 of vector c >> 1 (even) and 2 + (c >> 1) (odd);
 *   4-bit tail: low nibbles of the block's 16 bytes are the even columns, high nibbles the odd ones;
 *   8-bit: the block's 32 bytes already are in xr order.
 * The weights are dequantized exactly like the reference, w = (q - z) * s in fp32.
 *
 * The integer GEMV: codes 0..15 are non-negative int8, so SDOT (signed x signed, 4 bytes into an
 * int32 lane) multiplies them with the prepared x limbs directly; 16 bytes of a 4-bit row (4 of the
 * 16 int32 lanes of lq_cpu.h) per instruction and nibble half.
 *
 * Nobody here has an ARM machine: these kernels are checked against the reference under qemu-user
 * (tests/kernels/test_aarch64_qemu.py); their speed is unmeasured. */
#include <string.h>

#include "lq_cpu.h"

#if LQ_ARM64
#include <arm_neon.h>

#if defined(__clang__)
#define LQ_DOTPROD __attribute__((target("dotprod")))
#else
#define LQ_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#endif
#define LQ_INLINE static inline __attribute__((always_inline))

/* 16 codes of a block in xr order (e: even columns, o: odd columns) */
typedef struct {
    uint8x16_t e, o;
} codes32;

/* block c (0..3) of a 4-bit superblock row, from its de-interleaved bytes */
LQ_INLINE codes32 sb4_block(const uint8x16x4_t v, int c) {
    const uint8x16_t lo = v.val[c >> 1], hi = v.val[2 + (c >> 1)], m = vdupq_n_u8(15);
    codes32 r;
    r.e = (c & 1) ? vshrq_n_u8(lo, 4) : vandq_u8(lo, m);
    r.o = (c & 1) ? vshrq_n_u8(hi, 4) : vandq_u8(hi, m);
    return r;
}

/* the block at column kb (kb % 32 == 0) of row r of tile t, outside 4-bit superblocks */
LQ_INLINE codes32 flat_block(const lq_layout *L, int64_t t, int r, int64_t kb) {
    const int64_t nsb = lq_nsb(L), sb = kb / LQ_SB;
    codes32 c;
    if (L->bits == 8) {
        const uint8_t *p = sb < nsb ? lq_sb_row(L, t, sb, r) + kb % LQ_SB : lq_tail_row(L, t, r) + (kb - nsb * LQ_SB);
        c.e = vld1q_u8(p);
        c.o = vld1q_u8(p + 16);
    } else { /* the 4-bit tail */
        const uint8x16_t v = vld1q_u8(lq_tail_row(L, t, r) + (kb - nsb * LQ_SB) / 2);
        c.e = vandq_u8(v, vdupq_n_u8(15));
        c.o = vshrq_n_u8(v, 4);
    }
    return c;
}

/* 32 weights in xr order: w[j] holds positions 4j..4j+3 */
LQ_INLINE void dequant32(codes32 c, float s, float z, float32x4_t w[8]) {
    const float32x4_t vs = vdupq_n_f32(s), vz = vdupq_n_f32(z);
    const uint16x8_t h[4] = {vmovl_u8(vget_low_u8(c.e)), vmovl_high_u8(c.e), vmovl_u8(vget_low_u8(c.o)),
                             vmovl_high_u8(c.o)};
    for (int j = 0; j < 4; j++) {
        w[2 * j] = vmulq_f32(vsubq_f32(vcvtq_f32_u32(vmovl_u16(vget_low_u16(h[j]))), vz), vs);
        w[2 * j + 1] = vmulq_f32(vsubq_f32(vcvtq_f32_u32(vmovl_high_u16(h[j])), vz), vs);
    }
}

/* scale and zero point of rows 0..3 of tile t in group g */
LQ_INLINE void load_sz(const lq_layout *L, int64_t t, int64_t g, float s[4], float z[4]) {
    const int64_t at = (t * L->NG + g) * LQ_TILE;
    for (int r = 0; r < 4; r++) {
        s[r] = lq_f16_to_f32(L->s[at + r]);
        z[r] = L->z ? (float)L->z[at + r] : (float)L->zc;
    }
}

/* acc[i] += w . x_i over one block, for MM rows of x (x_i = x + i * ldx, xr order) */
LQ_INLINE void fma_block(const float32x4_t w[8], const float *x, int64_t ldx, int MM, float32x4_t acc[4]) {
    for (int i = 0; i < MM; i++)
        for (int j = 0; j < 8; j++) acc[i] = vfmaq_f32(acc[i], w[j], vld1q_f32(x + i * ldx + 4 * j));
}

/* the fp32 GEMV on one tile, MM (1..4) rows of x, columns [kbeg, Kp) */
LQ_INLINE void gemv_tile_mm(const lq_layout *L, int64_t t, const float *x, int64_t ldx, const int MM, int64_t kbeg,
                            float out[4][4]) {
    float32x4_t acc[4][4]; /* [r][i] */
    for (int r = 0; r < 4; r++)
        for (int i = 0; i < 4; i++) acc[r][i] = vdupq_n_f32(0.f);
    const int64_t nsb = lq_nsb(L), Kp = L->Kp;
    lq_gcur gc = lq_gcur_at(L, kbeg);
    float s[4][4], z[4][4]; /* [block][r] */
    float32x4_t w[8];
    int64_t kb = kbeg;
    if (L->bits == 4)
        for (int64_t sb = kbeg / LQ_SB; sb < nsb; sb++, kb += LQ_SB) {
            for (int c = 0; c < 4; c++) {
                if (c == 0 && kb == kbeg) load_sz(L, t, gc.g, s[0], z[0]);
                else if (lq_gcur_step(&gc, kb + c * LQ_BLK)) load_sz(L, t, gc.g, s[c], z[c]);
                else memcpy(s[c], s[(c + 3) & 3], sizeof s[c]), memcpy(z[c], z[(c + 3) & 3], sizeof z[c]);
            }
            for (int r = 0; r < 4; r++) {
                const uint8x16x4_t v = vld4q_u8(lq_sb_row(L, t, sb, r));
                for (int c = 0; c < 4; c++) {
                    dequant32(sb4_block(v, c), s[c][r], z[c][r], w);
                    fma_block(w, x + kb + c * LQ_BLK, ldx, MM, acc[r]);
                }
            }
        }
    if (kb < Kp) load_sz(L, t, gc.g, s[0], z[0]);
    for (; kb < Kp; kb += LQ_BLK) {
        if (lq_gcur_step(&gc, kb)) load_sz(L, t, gc.g, s[0], z[0]);
        for (int r = 0; r < 4; r++) {
            dequant32(flat_block(L, t, r, kb), s[0][r], z[0][r], w);
            fma_block(w, x + kb, ldx, MM, acc[r]);
        }
    }
    for (int i = 0; i < MM; i++)
        for (int r = 0; r < 4; r++) out[i][r] = vaddvq_f32(acc[r][i]);
}

static void gemv_tile_neon(const lq_layout *L, int64_t t, const float *x, int64_t ldx, int mm, float out[4][4]) {
    switch (mm) {
    case 1: gemv_tile_mm(L, t, x, ldx, 1, 0, out); break;
    case 2: gemv_tile_mm(L, t, x, ldx, 2, 0, out); break;
    case 3: gemv_tile_mm(L, t, x, ldx, 3, 0, out); break;
    default: gemv_tile_mm(L, t, x, ldx, 4, 0, out); break;
    }
}

static void dequant_f32_neon(const lq_layout *L, int64_t t0, int64_t ntl, int64_t k0, int64_t kc, float *buf,
                             int64_t ldb) {
    const int64_t nsb = lq_nsb(L);
    float32x4_t w[8];
    for (int64_t t = t0; t < t0 + ntl; t++) {
        lq_gcur gc = lq_gcur_at(L, k0);
        float s[4], z[4];
        load_sz(L, t, gc.g, s, z);
        for (int64_t kb = k0; kb < k0 + kc; kb += LQ_BLK) {
            if (lq_gcur_step(&gc, kb)) load_sz(L, t, gc.g, s, z);
            const int64_t sb = kb / LQ_SB;
            for (int r = 0; r < 4; r++) {
                const codes32 c = (L->bits == 4 && sb < nsb)
                                      ? sb4_block(vld4q_u8(lq_sb_row(L, t, sb, r)), (int)(kb % LQ_SB / LQ_BLK))
                                      : flat_block(L, t, r, kb);
                dequant32(c, s[r], z[r], w);
                float *row = buf + ((t - t0) * LQ_TILE + r) * ldb + (kb - k0);
                for (int j = 0; j < 8; j++) vst1q_f32(row + 4 * j, w[j]);
            }
        }
    }
}

/* out[i][r] = A[i] . B[r] over kc (a multiple of 32) columns, two rows of A at a time */
static void micro_f32_neon(const float *A, int64_t lda, const float *B, int64_t ldb, int64_t kc, int mr,
                           float out[LQ_MR][4]) {
    for (int i = 0; i < mr; i += 2) {
        const int two = i + 1 < mr;
        const float *a0 = A + i * lda, *a1 = two ? a0 + lda : a0;
        float32x4_t c0[4], c1[4];
        for (int r = 0; r < 4; r++) c0[r] = c1[r] = vdupq_n_f32(0.f);
        for (int64_t k = 0; k < kc; k += 4) {
            const float32x4_t x0 = vld1q_f32(a0 + k), x1 = vld1q_f32(a1 + k);
            for (int r = 0; r < 4; r++) {
                const float32x4_t b = vld1q_f32(B + r * ldb + k);
                c0[r] = vfmaq_f32(c0[r], x0, b);
                c1[r] = vfmaq_f32(c1[r], x1, b);
            }
        }
        for (int r = 0; r < 4; r++) {
            out[i][r] = vaddvq_f32(c0[r]);
            if (two) out[i + 1][r] = vaddvq_f32(c1[r]);
        }
    }
}

/* --- x on SDOT (Armv8.2 dot product) ---------------------------------------------------------- */

/* MM prepared rows of x against tile t: whole superblocks on SDOT, the tail in fp32 */
LQ_DOTPROD LQ_INLINE void gemv_i8_mm(const lq_layout *L, int64_t t, const uint8_t *xi, int64_t ldxi, const int MM,
                                     const int nlimbs, const float *xr, int64_t ldx, float out[4][4]) {
    const int64_t nsb = lq_nsb(L), sbb = LQ_XI_SB_BYTES(nlimbs);
    float32x4_t acc[4][4]; /* [r][i]: lane sums times their scales */
    for (int r = 0; r < 4; r++)
        for (int i = 0; i < 4; i++) acc[r][i] = vdupq_n_f32(0.f);
    const uint8x16_t m15 = vdupq_n_u8(15);
    for (int64_t sb = 0; sb < nsb; sb++) {
        const int64_t g = sb * LQ_SB / L->G < L->NG ? sb * LQ_SB / L->G : L->NG - 1;
        float s[4], z[4];
        load_sz(L, t, g, s, z);
        for (int r = 0; r < 4; r++) {
            const uint8_t *row = lq_sb_row(L, t, sb, r);
            int8x16_t qlo[4], qhi[4];
            for (int j = 0; j < 4; j++) {
                const uint8x16_t v = vld1q_u8(row + 16 * j);
                qlo[j] = vreinterpretq_s8_u8(vandq_u8(v, m15));
                qhi[j] = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
            }
            const int32x4_t vz = vdupq_n_s32((int32_t)z[r]);
            for (int i = 0; i < MM; i++) {
                const uint8_t *X = xi + i * ldxi + sb * sbb;
                float32x4_t lanes = vdupq_n_f32(0.f);
                for (int j = 0; j < 4; j++) { /* int32 lanes 4j..4j+3 */
                    int32x4_t T = vmulq_s32(vld1q_s32((const int32_t *)(X + 128 * nlimbs) + 4 * j), vnegq_s32(vz));
                    for (int p = 0; p < nlimbs; p++) {
                        int32x4_t d = vdupq_n_s32(0);
                        d = vdotq_s32(d, qlo[j], vld1q_s8((const int8_t *)X + 64 * p + 16 * j));
                        d = vdotq_s32(d, qhi[j], vld1q_s8((const int8_t *)X + 64 * (nlimbs + p) + 16 * j));
                        T = vaddq_s32(T, vshlq_s32(d, vdupq_n_s32(8 * p))); /* wraps like int32; the sum fits */
                    }
                    const float32x4_t sc = vld1q_f32((const float *)(X + 128 * nlimbs + 64) + 4 * j);
                    lanes = vfmaq_f32(lanes, vcvtq_f32_s32(T), sc);
                }
                acc[r][i] = vfmaq_n_f32(acc[r][i], lanes, s[r]);
            }
        }
    }
    float tail[4][4] = {{0}};
    if (lq_tail(L)) gemv_tile_mm(L, t, xr, ldx, MM, nsb * LQ_SB, tail);
    for (int i = 0; i < MM; i++)
        for (int r = 0; r < 4; r++) out[i][r] = vaddvq_f32(acc[r][i]) + tail[i][r];
}

LQ_DOTPROD static void gemv_i8_neon_dot(const lq_layout *L, int64_t t, const uint8_t *xi, int64_t ldxi, int mm,
                                        int nlimbs, const float *xr, int64_t ldx, float out[4][4]) {
    if (nlimbs == 3) { /* the fp32 decode path: one row */
        for (int i = 0; i < mm; i++) {
            float o[4][4];
            gemv_i8_mm(L, t, xi + i * ldxi, ldxi, 1, 3, xr + i * ldx, ldx, o);
            memcpy(out[i], o[0], sizeof o[0]);
        }
        return;
    }
    switch (mm) {
    case 1: gemv_i8_mm(L, t, xi, ldxi, 1, 1, xr, ldx, out); break;
    case 2: gemv_i8_mm(L, t, xi, ldxi, 2, 1, xr, ldx, out); break;
    case 3: gemv_i8_mm(L, t, xi, ldxi, 3, 1, xr, ldx, out); break;
    default: gemv_i8_mm(L, t, xi, ldxi, 4, 1, xr, ldx, out); break;
    }
}

/* Dynamic INT8 activations on an 8-bit layout (W8A8; x by lq_prepare_xa8, lq_cpu.h): SDOT multiplies
 * signed bytes, so each code goes in as q - 128 (its top bit flipped) and the lane sums of m put the
 * 128 back: sum q m - z sum m = sum (q - 128) m + (128 - z) sum m, exact in int32. Vector j of a row's
 * 128 code bytes holds int32 lanes 4 (j % 4) .. 4 (j % 4) + 3. */
LQ_DOTPROD LQ_INLINE void gemv_a8x8_mm(const lq_layout *L, int64_t t, const uint8_t *xi, int64_t ldxi, const int MM,
                                       const float *xr, int64_t ldx, float out[4][4]) {
    const int64_t nsb = lq_nsb(L);
    float32x4_t acc[4][4]; /* [r][i]: lane sums times their scales */
    for (int r = 0; r < 4; r++)
        for (int i = 0; i < 4; i++) acc[r][i] = vdupq_n_f32(0.f);
    const uint8x16_t top = vdupq_n_u8(0x80);
    for (int64_t sb = 0; sb < nsb; sb++) {
        const int64_t g = sb * LQ_SB / L->G < L->NG ? sb * LQ_SB / L->G : L->NG - 1;
        float s[4], z[4];
        load_sz(L, t, g, s, z);
        for (int r = 0; r < 4; r++) {
            const uint8_t *row = lq_sb_row(L, t, sb, r);
            int8x16_t q[8];
            for (int j = 0; j < 8; j++) q[j] = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(row + 16 * j), top));
            const int32x4_t vz = vdupq_n_s32(128 - (int32_t)z[r]);
            for (int i = 0; i < MM; i++) {
                const uint8_t *X = xi + i * ldxi + sb * LQ_XI8_SB_BYTES;
                float32x4_t lanes = vdupq_n_f32(0.f);
                for (int j = 0; j < 4; j++) { /* int32 lanes 4j..4j+3: bytes 16 j and 64 + 16 j */
                    int32x4_t T = vmulq_s32(vld1q_s32((const int32_t *)(X + 384) + 4 * j), vz);
                    T = vdotq_s32(T, q[j], vld1q_s8((const int8_t *)X + 16 * j));
                    T = vdotq_s32(T, q[j + 4], vld1q_s8((const int8_t *)X + 64 + 16 * j));
                    lanes = vfmaq_f32(lanes, vcvtq_f32_s32(T), vld1q_f32((const float *)(X + 576) + 4 * j));
                }
                acc[r][i] = vfmaq_n_f32(acc[r][i], lanes, s[r]);
            }
        }
    }
    float tail[4][4] = {{0}};
    if (lq_tail(L)) gemv_tile_mm(L, t, xr, ldx, MM, nsb * LQ_SB, tail);
    for (int i = 0; i < MM; i++)
        for (int r = 0; r < 4; r++) out[i][r] = vaddvq_f32(acc[r][i]) + tail[i][r];
}

LQ_DOTPROD static void gemv_a8x8_neon_dot(const lq_layout *L, int64_t t, const uint8_t *xi, int64_t ldxi, int mm,
                                          const float *xr, int64_t ldx, float out[4][4]) {
    switch (mm) {
    case 1: gemv_a8x8_mm(L, t, xi, ldxi, 1, xr, ldx, out); break;
    case 2: gemv_a8x8_mm(L, t, xi, ldxi, 2, xr, ldx, out); break;
    case 3: gemv_a8x8_mm(L, t, xi, ldxi, 3, xr, ldx, out); break;
    default: gemv_a8x8_mm(L, t, xi, ldxi, 4, xr, ldx, out); break;
    }
}

/* bf16 math is not offered here (no micro_bf16): bf16 x is widened and computed in fp32, exactly */
const lq_kernels lq_kernels_neon = {
    "neon", gemv_tile_neon, dequant_f32_neon, NULL, micro_f32_neon, NULL, NULL,
    NULL, NULL, 4, 0, lq_expand_tile_scalar, 0,
};

const lq_kernels lq_kernels_neon_dotprod = {
    "neon_dotprod", gemv_tile_neon, dequant_f32_neon, NULL, micro_f32_neon, NULL, NULL,
    lq_prepare_xi_scalar, gemv_i8_neon_dot, 4, 0, lq_expand_tile_scalar, 0, NULL, NULL, NULL, NULL, 0, NULL, NULL,
    gemv_a8x8_neon_dot, lq_prepare_xa8, 4,
};

#endif
