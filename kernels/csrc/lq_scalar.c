/* Portable kernels: plain C, any CPU. They are the fallback where neither AVX2 nor AVX-512 is
 * available, and the vector kernels' second reference in the tests. They accept any group size
 * (a group need not be a multiple of 32 columns). */
#include <math.h>
#include <string.h>

#include "lq_cpu.h"

float lq_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13); /* inf / nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13); /* normal: rebias 15 -> 127 */
    } else if (man == 0) {
        bits = sign; /* signed zero */
    } else {
        /* subnormal half: normalise the mantissa */
        int e = -1;
        do {
            man <<= 1;
            e++;
        } while ((man & 0x400u) == 0);
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    union { uint32_t u; float f; } v;
    v.u = bits;
    return v.f;
}

uint16_t lq_f32_to_bf16(float f) {
    union { uint32_t u; float f; } v;
    v.f = f;
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u); /* quiet nan */
    v.u += 0x7fffu + ((v.u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(v.u >> 16);
}

void lq_expand_tile_scalar(const lq_layout *L, int64_t t, uint8_t *out) {
    const int64_t rows = lq_nsb(L) * LQ_TILE, row_bytes = lq_prow_sb_bytes(L);
    const uint8_t *src = lq_tile(L, t);
    for (int64_t i = 0; i < rows; i++) { /* row-superblocks in stored order: [sb][r] */
        const uint8_t *a = src + i * row_bytes, *c = a + 32;
        uint8_t *o = out + i * 64;
        for (int j = 0; j < 64; j++) { /* byte position j: lo (nibbles 0, 2 of the words) | hi << 4 */
            unsigned lo, hi;
            if (L->pbits == 2) {
                lo = (a[j % 32] >> (2 * (j / 32))) & 3u;
                hi = (a[j % 32] >> (4 + 2 * (j / 32))) & 3u;
            } else if (j < 32) {
                lo = a[j] & 7u;
                hi = (a[j] >> 6) | (((c[j % 16] >> (6 + j / 16)) & 1u) << 2);
            } else {
                lo = (a[j - 32] >> 3) & 7u;
                hi = (c[j % 16] >> (3 * ((j - 32) / 16))) & 7u;
            }
            o[j] = (uint8_t)(lo | (hi << 4));
        }
    }
    memcpy(out + rows * 64, src + rows * row_bytes, (size_t)(LQ_TILE * lq_tail(L) / 2));
}

/* The 32 codes of the block starting at column kb of row r of tile t, in natural column order. */
static void decode_block(const lq_layout *L, int64_t t, int r, int64_t kb, uint8_t c[LQ_BLK]) {
    const int64_t nsb = lq_nsb(L);
    const int64_t sb = kb / LQ_SB;
    const uint8_t *p;
    if (L->bits == 4) {
        if (sb < nsb) {
            const int s = (int)((kb % LQ_SB) / LQ_BLK);
            p = lq_sb_row(L, t, sb, r);
            for (int w = 0; w < 32; w++) {
                const unsigned word = (unsigned)p[2 * w] | ((unsigned)p[2 * w + 1] << 8);
                c[w] = (uint8_t)((word >> (4 * s)) & 15u);
            }
        } else {
            p = lq_tail_row(L, t, r) + (kb - nsb * LQ_SB) / 2;
            for (int b = 0; b < 16; b++) {
                c[2 * b] = p[b] & 15u;
                c[2 * b + 1] = p[b] >> 4;
            }
        }
    } else {
        if (sb < nsb)
            p = lq_sb_row(L, t, sb, r) + (kb % LQ_SB);
        else
            p = lq_tail_row(L, t, r) + (kb - nsb * LQ_SB);
        for (int i = 0; i < 16; i++) {
            c[2 * i] = p[i];
            c[2 * i + 1] = p[16 + i];
        }
    }
}

/* Dequantize one block of row r of tile t into w[32] (natural order); per-column groups, so any G. */
static void dequant_block(const lq_layout *L, int64_t t, int r, int64_t kb, float w[LQ_BLK]) {
    uint8_t c[LQ_BLK];
    decode_block(L, t, r, kb, c);
    int64_t g = -1;
    float s = 0.f, z = 0.f;
    for (int i = 0; i < LQ_BLK; i++) {
        int64_t gi = (kb + i) / L->G;
        if (gi > L->NG - 1) gi = L->NG - 1;
        if (gi != g) {
            g = gi;
            const int64_t at = (t * L->NG + g) * LQ_TILE + r;
            s = lq_f16_to_f32(L->s[at]);
            z = L->z ? (float)L->z[at] : (float)L->zc;
        }
        w[i] = ((float)c[i] - z) * s;
    }
}

static void dequant_f32_scalar(const lq_layout *L, int64_t t0, int64_t ntl, int64_t k0, int64_t kc, float *buf,
                               int64_t ldb) {
    float w[LQ_BLK];
    for (int64_t t = t0; t < t0 + ntl; t++)
        for (int r = 0; r < LQ_TILE; r++) {
            float *row = buf + ((t - t0) * LQ_TILE + r) * ldb;
            for (int64_t kb = k0; kb < k0 + kc; kb += LQ_BLK) {
                dequant_block(L, t, r, kb, w);
                for (int i = 0; i < LQ_BLK; i++) row[kb - k0 + lq_xr_pos(i)] = w[i];
            }
        }
}

static void dequant_bf16_scalar(const lq_layout *L, int64_t t0, int64_t ntl, int64_t k0, int64_t kc,
                                uint16_t *buf, int64_t ldb) {
    float w[LQ_BLK];
    for (int64_t t = t0; t < t0 + ntl; t++)
        for (int r = 0; r < LQ_TILE; r++) {
            uint16_t *row = buf + ((t - t0) * LQ_TILE + r) * ldb;
            for (int64_t kb = k0; kb < k0 + kc; kb += LQ_BLK) {
                dequant_block(L, t, r, kb, w);
                for (int i = 0; i < LQ_BLK; i++) row[kb - k0 + i] = lq_f32_to_bf16(w[i]);
            }
        }
}

static void micro_f32_scalar(const float *A, int64_t lda, const float *B, int64_t ldb, int64_t kc, int mr,
                             float out[LQ_MR][4]) {
    for (int i = 0; i < mr; i++)
        for (int r = 0; r < 4; r++) {
            const float *a = A + i * lda, *b = B + r * ldb;
            float acc[8] = {0};
            for (int64_t k = 0; k < kc; k += 8)
                for (int u = 0; u < 8; u++) acc[u] += a[k + u] * b[k + u];
            out[i][r] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        }
}

static void gemv_tile_scalar(const lq_layout *L, int64_t t, const float *x, int64_t ldx, int mm, float out[4][4]) {
    enum { CH = 256 };
    float w[LQ_TILE][CH];
    float part[LQ_MR][4];
    memset(out, 0, sizeof(float) * 16);
    for (int64_t k0 = 0; k0 < L->Kp; k0 += CH) {
        const int64_t kc = L->Kp - k0 < CH ? L->Kp - k0 : CH;
        dequant_f32_scalar(L, t, 1, k0, kc, &w[0][0], CH);
        micro_f32_scalar(x + k0, ldx, &w[0][0], CH, kc, mm, part);
        for (int i = 0; i < mm; i++)
            for (int r = 0; r < 4; r++) out[i][r] += part[i][r];
    }
}

/* --- x on integer dot products (the format is documented in lq_cpu.h) -------------------------- */

/* where column i (0..127) of a superblock goes in a prepared row: its lane, and its byte in the lo
 * (hi = 0) or hi (hi = 1) vectors. Column 32 c + w is nibble c of word w: row byte 2 w + (c >= 2). */
static void xi_place(int i, int *lane, int *hi, int *byte) {
    const int c = i / 32, w = i % 32, rowbyte = 2 * w + (c >= 2);
    *lane = rowbyte / 4;
    *hi = c & 1;
    *byte = rowbyte;
}

/* round(v) to nearest even for |v| <= 2^22, without a libm call: adding and taking away 1.5 * 2^23
 * leaves v rounded to an integer (fp32 has 23 fraction bits). The 8-bit prepares (below) run on every
 * x86 table, so this is their speed. */
static inline int32_t round_small(float v) { return (int32_t)((v + 12582912.f) - 12582912.f); }

/* the exponent of a prepared lane (lq_cpu.h): floor(log2 amax), at least -100; 0 when amax is 0 */
static int xi_exponent(float amax) {
    int ex = 0;
    if (amax > 0.f) {
        frexpf(amax, &ex); /* amax = f 2^ex with f in [0.5, 1): floor(log2 amax) = ex - 1 */
        ex -= 1;
        if (ex < -100) ex = -100;
    }
    return ex;
}

int lq_prepare_xi_scalar(const float *xr, int64_t nsb, int nlimbs, uint8_t *xi) {
    const int S = LQ_XI_SHIFT(nlimbs);
    for (int64_t sb = 0; sb < nsb; sb++, xr += LQ_SB, xi += LQ_XI_SB_BYTES(nlimbs)) {
        float x[LQ_SB], amax[16] = {0};
        for (int i = 0; i < LQ_SB; i++) {
            x[i] = xr[(i / LQ_BLK) * LQ_BLK + lq_xr_pos(i % LQ_BLK)];
            if (!isfinite(x[i])) return 0;
            const int lane = (i % 32) / 2;
            if (fabsf(x[i]) > amax[lane]) amax[lane] = fabsf(x[i]);
        }
        for (int l = 0; l < 8; l++) /* lanes l and l + 8 share their scale (lq_cpu.h) */
            amax[l] = amax[l + 8] = fmaxf(amax[l], amax[l + 8]);
        int e[16];
        for (int l = 0; l < 16; l++) e[l] = xi_exponent(amax[l]);
        int32_t msum[16] = {0};
        for (int i = 0; i < LQ_SB; i++) {
            int lane, hi, byte;
            xi_place(i, &lane, &hi, &byte);
            int32_t m = (int32_t)rintf(ldexpf(x[i], S - e[lane])); /* exact scaling, nearest even */
            if (nlimbs == 1) m = m > 127 ? 127 : (m < -127 ? -127 : m);
            msum[lane] += m;
            const int32_t m1 = (m + 128) >> 8, m2 = (m1 + 128) >> 8; /* balanced limbs: low bytes of m, m1, m2 */
            const int32_t limb[3] = {m, m1, m2};
            for (int p = 0; p < nlimbs; p++) xi[64 * (hi ? nlimbs + p : p) + byte] = (uint8_t)(limb[p] & 0xFF);
        }
        memcpy(xi + 128 * nlimbs, msum, sizeof msum);
        float scale[16];
        for (int l = 0; l < 16; l++) scale[l] = ldexpf(1.f, e[l] - S);
        memcpy(xi + 128 * nlimbs + 64, scale, sizeof scale);
    }
    return 1;
}

/* the integer GEMVs' tail columns (Kp % 128) of tile t in fp32, as gemv_tile_scalar does them */
static void tail_f32_scalar(const lq_layout *L, int64_t t, const float *xr, float tail[4]) {
    const int64_t nsb = lq_nsb(L);
    for (int r = 0; r < 4; r++) tail[r] = 0.f;
    if (!lq_tail(L)) return;
    float w[LQ_TILE][LQ_SB];
    dequant_f32_scalar(L, t, 1, nsb * LQ_SB, lq_tail(L), &w[0][0], LQ_SB);
    for (int r = 0; r < 4; r++)
        for (int64_t k = 0; k < lq_tail(L); k++) tail[r] += w[r][k] * xr[nsb * LQ_SB + k];
}

static void gemv1_i8_scalar(const lq_layout *L, int64_t t, const uint8_t *xi, int nlimbs, const float *xr,
                            float out[4]) {
    const int64_t nsb = lq_nsb(L);
    float lanes[4][16] = {{0}};
    for (int64_t sb = 0; sb < nsb; sb++, xi += LQ_XI_SB_BYTES(nlimbs)) {
        int32_t msum[16];
        float scale[16];
        memcpy(msum, xi + 128 * nlimbs, sizeof msum);
        memcpy(scale, xi + 128 * nlimbs + 64, sizeof scale);
        const int64_t g = sb * LQ_SB / L->G < L->NG ? sb * LQ_SB / L->G : L->NG - 1;
        for (int r = 0; r < 4; r++) {
            const int64_t at = (t * L->NG + g) * LQ_TILE + r;
            const float s = lq_f16_to_f32(L->s[at]);
            const int32_t z = L->z ? L->z[at] : L->zc;
            const uint8_t *row = lq_sb_row(L, t, sb, r);
            int32_t T[16];
            for (int l = 0; l < 16; l++) T[l] = -z * msum[l];
            for (int b = 0; b < 64; b++) {
                const int32_t q[2] = {row[b] & 15, row[b] >> 4}; /* lo and hi nibble */
                for (int hi = 0; hi < 2; hi++)
                    for (int p = 0; p < nlimbs; p++) {
                        const int32_t limb = (int8_t)xi[64 * (hi ? nlimbs + p : p) + b];
                        T[b / 4] += q[hi] * limb * (1 << (8 * p));
                    }
            }
            for (int l = 0; l < 16; l++) lanes[r][l] += (float)T[l] * (scale[l] * s);
        }
    }
    float tail[4];
    tail_f32_scalar(L, t, xr, tail);
    for (int r = 0; r < 4; r++) {
        float sum = 0.f;
        for (int l = 0; l < 16; l++) sum += lanes[r][l];
        out[r] = sum + tail[r];
    }
}

/* The 8-bit prepares' lane scales (lq_cpu.h): value b of a superblock is in group (b % span) / width
 * (8 groups); e[g] its exponent and up[g] = 2^(S - e[g]), by which a product is exact (|x up| <= 2^(S+1),
 * tiny ones round to 0). 0 when some x is not finite. */
static int x8_group_scales(const float *xr, int span, int width, int S, int e[8], float up[8]) {
    float amax[8] = {0};
    for (int b = 0; b < LQ_SB; b++) {
        if (!isfinite(xr[b])) return 0;
        const int g = (b % span) / width;
        if (fabsf(xr[b]) > amax[g]) amax[g] = fabsf(xr[b]);
    }
    for (int g = 0; g < 8; g++) {
        e[g] = xi_exponent(amax[g]);
        up[g] = ldexpf(1.f, S - e[g]);
    }
    return 1;
}

int lq_prepare_xi8(const float *xr, int64_t nsb, uint8_t *xi) {
    for (int64_t sb = 0; sb < nsb; sb++, xr += LQ_SB, xi += LQ_XI8_SB_BYTES) {
        int e[8];
        float up[8];
        if (!x8_group_scales(xr, 32, 4, 21, e, up)) return 0;
        int32_t msum[3][16] = {{0}};
        for (int b = 0; b < LQ_SB; b++) {
            const int32_t m = round_small(xr[b] * up[(b % 32) / 4]); /* |m| <= 2^22 */
            const int32_t m1 = (m + 128) >> 8, m2 = (m1 + 128) >> 8;
            const int32_t limb[3] = {m - 256 * m1, m1 - 256 * m2, m2}; /* balanced: m = l0 + 2^8 l1 + 2^16 l2 */
            for (int p = 0; p < 3; p++) {
                xi[128 * p + b] = (uint8_t)(limb[p] & 0xFF);
                msum[p][(b % 64) / 4] += limb[p];
            }
        }
        memcpy(xi + 384, msum, sizeof msum);
        float scale[16];
        for (int l = 0; l < 16; l++) scale[l] = ldexpf(1.f, e[l % 8] - 21);
        memcpy(xi + 576, scale, sizeof scale);
    }
    return 1;
}

int lq_prepare_xa8(const float *xr, int64_t nsb, uint8_t *xi) {
    for (int64_t sb = 0; sb < nsb; sb++, xr += LQ_SB, xi += LQ_XI8_SB_BYTES) {
        int e[8];
        float up[8];
        if (!x8_group_scales(xr, 32, 4, 6, e, up)) return 0;
        int32_t msum[16] = {0};
        for (int b = 0; b < LQ_SB; b++) {
            int32_t m = round_small(xr[b] * up[(b % 32) / 4]); /* |m| <= 128 */
            m = m > 127 ? 127 : (m < -127 ? -127 : m);
            xi[b] = (uint8_t)(m & 0xFF);
            msum[(b % 64) / 4] += m;
        }
        memcpy(xi + 384, msum, sizeof msum);
        float scale[16];
        for (int l = 0; l < 16; l++) scale[l] = ldexpf(1.f, e[l % 8] - 6);
        memcpy(xi + 576, scale, sizeof scale);
    }
    return 1;
}

int lq_prepare_xw8(const float *xr, int64_t nsb, uint8_t *xi) {
    for (int64_t sb = 0; sb < nsb; sb++, xr += LQ_SB, xi += LQ_XI8_SB_BYTES) {
        int e[8];
        float up[8];
        if (!x8_group_scales(xr, 16, 2, 21, e, up)) return 0;
        int16_t limb[2][LQ_SB];
        int32_t msum[2][8] = {{0}};
        for (int b = 0; b < LQ_SB; b++) {
            const int l = (b % 16) / 2;
            const int32_t m = round_small(xr[b] * up[l]); /* |m| <= 2^22 */
            const int32_t m1 = (m + 32768) >> 16;
            limb[0][b] = (int16_t)(m - 65536 * m1);
            limb[1][b] = (int16_t)m1;
            msum[0][l] += limb[0][b];
            msum[1][l] += m1;
        }
        memcpy(xi, limb, sizeof limb);
        memcpy(xi + 512, msum, sizeof msum);
        float scale[8];
        for (int l = 0; l < 8; l++) scale[l] = ldexpf(1.f, e[l] - 21);
        memcpy(xi + 576, scale, sizeof scale);
    }
    return 1;
}

/* the C reference of gemv_x8 (nlimbs 3, mm 1) and gemv_a8x8 (nlimbs 1; lq_cpu.h): per row of x, lane and
 * superblock the exact int32 sums T_p = sum q l_p - z sum l_p, combined in fp32 as the vector kernels do
 * it, (T_2 2^8 + T_1) 2^8 + T_0, then acc += that * (scale * s) */
static void gemv_8bit_scalar(const lq_layout *L, int64_t t, const uint8_t *xi, int64_t ldxi, int mm, int nlimbs,
                             const float *xr, int64_t ldx, float out[4][4]) {
    const int64_t nsb = lq_nsb(L);
    for (int i = 0; i < mm; i++) {
        float tail[4];
        tail_f32_scalar(L, t, xr + i * ldx, tail);
        for (int r = 0; r < 4; r++) {
            float acc[16] = {0};
            for (int64_t sb = 0; sb < nsb; sb++) {
                const uint8_t *q = lq_sb_row(L, t, sb, r), *x = xi + i * ldxi + sb * LQ_XI8_SB_BYTES;
                const int64_t g = lq_gcur_at(L, sb * LQ_SB).g, at = (t * L->NG + g) * LQ_TILE + r;
                const float s = lq_f16_to_f32(L->s[at]);
                const int32_t z = L->z ? L->z[at] : L->zc;
                const int32_t *msum = (const int32_t *)(x + 384);
                const float *scale = (const float *)(x + 576);
                for (int l = 0; l < 16; l++) {
                    float f = 0.f;
                    for (int p = nlimbs - 1; p >= 0; p--) {
                        int32_t T = -z * msum[16 * p + l];
                        for (int h = 0; h < 2; h++)
                            for (int j = 0; j < 4; j++) {
                                const int b = 64 * h + 4 * l + j;
                                T += (int32_t)q[b] * (int32_t)(int8_t)x[128 * p + b];
                            }
                        f = p == nlimbs - 1 ? (float)T : fmaf(f, 256.f, (float)T);
                    }
                    acc[l] = fmaf(f, scale[l] * s, acc[l]);
                }
            }
            float sum = 0.f;
            for (int l = 0; l < 16; l++) sum += acc[l];
            out[i][r] = sum + tail[r];
        }
    }
}

static void gemv_x8_scalar(const lq_layout *L, int64_t t, const uint8_t *xi, const float *xr, float out[4][4]) {
    gemv_8bit_scalar(L, t, xi, 0, 1, 3, xr, 0, out);
}

static void gemv_a8x8_scalar(const lq_layout *L, int64_t t, const uint8_t *xi, int64_t ldxi, int mm, const float *xr,
                             int64_t ldx, float out[4][4]) {
    gemv_8bit_scalar(L, t, xi, ldxi, mm, 1, xr, ldx, out);
}

static void gemv_i8_scalar(const lq_layout *L, int64_t t, const uint8_t *xi, int64_t ldxi, int mm, int nlimbs,
                           const float *xr, int64_t ldx, float out[4][4]) {
    for (int i = 0; i < mm; i++) gemv1_i8_scalar(L, t, xi + i * ldxi, nlimbs, xr + i * ldx, out[i]);
}

const lq_kernels lq_kernels_scalar = {
    "scalar", gemv_tile_scalar, dequant_f32_scalar, dequant_bf16_scalar, micro_f32_scalar, NULL, NULL,
    lq_prepare_xi_scalar, gemv_i8_scalar, 4, 0, lq_expand_tile_scalar, 0, NULL, NULL, NULL, NULL, 0,
    gemv_x8_scalar, lq_prepare_xi8, gemv_a8x8_scalar, lq_prepare_xa8, 4, 1,
};
