/* Portable kernels: plain C, any CPU. They are the fallback where neither AVX2 nor AVX-512 is
 * available, and the vector kernels' second reference in the tests. They accept any group size
 * (a group need not be a multiple of 32 columns). */
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

const lq_kernels lq_kernels_scalar = {
    "scalar", gemv_tile_scalar, dequant_f32_scalar, dequant_bf16_scalar, micro_f32_scalar, NULL, NULL,
};
