/* AVX2 + FMA + F16C kernels (fp32): for x86 CPUs without AVX-512. Same layout and the same exact
 * dequantization as the AVX-512 kernels, with 8-lane vectors and a mask + int->float conversion in
 * place of the 16-entry permute (AVX2 has no 16-entry float permute): w = fma(q, s, -z*s), which is
 * exact because q*s and z*s fit in fp32's 24-bit significand. */
#include "lq_cpu.h"

#if LQ_X86
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#define INLINE static inline __attribute__((always_inline))

INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE void row_scales(const lq_layout *L, int64_t t, int r, int64_t g, __m256 *vs, __m256 *vnzs) {
    const int64_t at = (t * L->NG + g) * LQ_TILE + r;
    const float s = _cvtsh_ss(L->s[at]);
    const float z = L->z ? (float)L->z[at] : (float)L->zc;
    *vs = _mm256_set1_ps(s);
    *vnzs = _mm256_set1_ps(-(z * s));
}

INLINE __m256i load8_u8(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }

/* The 32 dequantized weights of the block at column kb of row r, in xr order, as 4 vectors. */
INLINE void block_weights(const lq_layout *L, int64_t t, int r, int64_t kb, __m256 vs, __m256 vnzs, __m256 w[4]) {
    const int64_t nsb = lq_nsb(L), sb = kb / LQ_SB;
    const __m256i m15 = _mm256_set1_epi32(15);
    __m256i q[4];
    if (L->bits == 4) {
        if (sb < nsb) {
            const uint8_t *p = lq_sb_row(L, t, sb, r);
            const __m256i W0 = _mm256_loadu_si256((const __m256i *)p), W1 = _mm256_loadu_si256((const __m256i *)(p + 32));
            const int h = (int)((kb % LQ_SB) / LQ_BLK);
            const __m128i se = _mm_cvtsi32_si128(4 * h), so = _mm_cvtsi32_si128(4 * h + 16);
            q[0] = _mm256_and_si256(_mm256_srl_epi32(W0, se), m15);
            q[1] = _mm256_and_si256(_mm256_srl_epi32(W1, se), m15);
            q[2] = _mm256_and_si256(_mm256_srl_epi32(W0, so), m15);
            q[3] = _mm256_and_si256(_mm256_srl_epi32(W1, so), m15);
        } else {
            const uint8_t *p = lq_tail_row(L, t, r) + (kb - nsb * LQ_SB) / 2;
            const __m256i D0 = load8_u8(p), D1 = load8_u8(p + 8);
            q[0] = _mm256_and_si256(D0, m15);
            q[1] = _mm256_and_si256(D1, m15);
            q[2] = _mm256_srli_epi32(D0, 4);
            q[3] = _mm256_srli_epi32(D1, 4);
        }
    } else {
        const uint8_t *p = sb < nsb ? lq_sb_row(L, t, sb, r) + (kb % LQ_SB) : lq_tail_row(L, t, r) + (kb - nsb * LQ_SB);
        for (int v = 0; v < 4; v++) q[v] = load8_u8(p + 8 * v);
    }
    for (int v = 0; v < 4; v++) w[v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[v]), vs, vnzs);
}

INLINE void gemv_k(const lq_layout *L, int64_t t, const float *x, int64_t ldx, const int MM, float out[4][4]) {
    for (int r = 0; r < 4; r++) {
        __m256 acc[4][2];
        for (int i = 0; i < MM; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
        lq_gcur gc = lq_gcur_at(L, 0);
        __m256 vs, vnzs, w[4];
        row_scales(L, t, r, gc.g, &vs, &vnzs);
        for (int64_t kb = 0; kb < L->Kp; kb += LQ_BLK) {
            if (lq_gcur_step(&gc, kb)) row_scales(L, t, r, gc.g, &vs, &vnzs);
            block_weights(L, t, r, kb, vs, vnzs, w);
            for (int i = 0; i < MM; i++) {
                const float *xb = x + i * ldx + kb;
                acc[i][0] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xb), acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), acc[i][1]);
                acc[i][0] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + 16), acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), acc[i][1]);
            }
        }
        for (int i = 0; i < MM; i++) out[i][r] = hsum8(_mm256_add_ps(acc[i][0], acc[i][1]));
    }
}

static void gemv_tile_avx2(const lq_layout *L, int64_t t, const float *x, int64_t ldx, int mm, float out[4][4]) {
    switch (mm) {
    case 1: gemv_k(L, t, x, ldx, 1, out); break;
    case 2: gemv_k(L, t, x, ldx, 2, out); break;
    case 3: gemv_k(L, t, x, ldx, 3, out); break;
    default: gemv_k(L, t, x, ldx, 4, out); break;
    }
}

static void dequant_f32_avx2(const lq_layout *L, int64_t t0, int64_t ntl, int64_t k0, int64_t kc, float *buf,
                             int64_t ldb) {
    for (int64_t t = t0; t < t0 + ntl; t++)
        for (int r = 0; r < 4; r++) {
            float *row = buf + ((t - t0) * LQ_TILE + r) * ldb;
            lq_gcur gc = lq_gcur_at(L, k0);
            __m256 vs, vnzs, w[4];
            row_scales(L, t, r, gc.g, &vs, &vnzs);
            for (int64_t kb = k0; kb < k0 + kc; kb += LQ_BLK) {
                if (lq_gcur_step(&gc, kb)) row_scales(L, t, r, gc.g, &vs, &vnzs);
                block_weights(L, t, r, kb, vs, vnzs, w);
                for (int v = 0; v < 4; v++) _mm256_storeu_ps(row + (kb - k0) + 8 * v, w[v]);
            }
        }
}

INLINE void micro_pair(const float *A, int64_t lda, const float *B, int64_t ldb, int64_t kc, const int MR,
                       float out[2][4]) {
    __m256 acc[2][4];
    for (int i = 0; i < MR; i++)
        for (int r = 0; r < 4; r++) acc[i][r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < kc; k += 8) {
        const __m256 b0 = _mm256_loadu_ps(B + k), b1 = _mm256_loadu_ps(B + ldb + k);
        const __m256 b2 = _mm256_loadu_ps(B + 2 * ldb + k), b3 = _mm256_loadu_ps(B + 3 * ldb + k);
        for (int i = 0; i < MR; i++) {
            const __m256 a = _mm256_loadu_ps(A + i * lda + k);
            acc[i][0] = _mm256_fmadd_ps(a, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(a, b1, acc[i][1]);
            acc[i][2] = _mm256_fmadd_ps(a, b2, acc[i][2]);
            acc[i][3] = _mm256_fmadd_ps(a, b3, acc[i][3]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int r = 0; r < 4; r++) out[i][r] = hsum8(acc[i][r]);
}

static void micro_f32_avx2(const float *A, int64_t lda, const float *B, int64_t ldb, int64_t kc, int mr,
                           float out[LQ_MR][4]) {
    for (int i = 0; i < mr; i += 2) {
        if (mr - i >= 2)
            micro_pair(A + i * lda, lda, B, ldb, kc, 2, (float(*)[4])out[i]);
        else
            micro_pair(A + i * lda, lda, B, ldb, kc, 1, (float(*)[4])out[i]);
    }
}

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

const lq_kernels lq_kernels_avx2 = {
    "avx2", gemv_tile_avx2, dequant_f32_avx2, NULL, micro_f32_avx2, NULL, NULL,
};

#endif /* LQ_X86 */
