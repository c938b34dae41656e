/* AVX-512 BF16 kernels for bf16 activations in the compute-bound (GEMM) regime.
 *
 * Weights are dequantized once per block into bf16 ((q - z) * s computed in fp32, then rounded to
 * nearest even: the weight a bf16 model would hold), and vdpbf16ps multiplies 32 bf16 pairs into
 * 16 fp32 accumulators per instruction, twice the multiply rate of fp32 FMA. Products of two bf16
 * values are exact in fp32, so the only roundings are the weight's and the fp32 sums'.
 * The 4-bit table trick of the fp32 kernels works here too: vpermw looks up 32 bf16 entries using
 * the low 5 bits of each 16-bit lane, so the 16-entry table is stored twice and the bit above the
 * nibble does not need masking. */
#include "lq_cpu.h"

#if LQ_X86
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")
#endif

#include "lq_avx512_inl.h"

/* tab[r] = 32 bf16: (q - z) * s for q = 0..15 (computed exactly in fp32 as fma(q, s, -z*s), then
 * rounded to nearest even), twice */
INLINE void tables32(const lq_layout *L, int64_t t, int64_t g, __m512i tab[4]) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    volatile float s[4], nzs[4]; /* broadcasts from memory are loads, not shuffles */
    float sz[4], z[4];
    group_params(L, t, g, sz, z);
    for (int r = 0; r < 4; r++) s[r] = sz[r], nzs[r] = -(z[r] * sz[r]);
    for (int r = 0; r < 4; r++) {
        const __m512 v = _mm512_fmadd_ps(iota, _mm512_set1_ps(s[r]), _mm512_set1_ps(nzs[r]));
        tab[r] = (__m512i)_mm512_cvtne2ps_pbh(v, v);
    }
}

static void dequant_bf16_avx512(const lq_layout *L, int64_t t0, int64_t ntl, int64_t k0, int64_t kc, uint16_t *buf,
                                int64_t ldb) {
    const int64_t nsb = lq_nsb(L), k1 = k0 + kc;
    /* 8-bit: [E0..E15 | O0..O15] -> E0 O0 E1 O1 ... */
    static const uint16_t il[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                    8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i interleave = _mm512_loadu_si512(il);
    for (int64_t t = t0; t < t0 + ntl; t++) {
        uint16_t *rows = buf + (t - t0) * LQ_TILE * ldb;
        lq_gcur gc = lq_gcur_at(L, k0);
        if (L->bits == 4) {
            __m512i tab[4];
            tables32(L, t, gc.g, tab);
            const int64_t sb1 = k1 / LQ_SB < nsb ? k1 / LQ_SB : nsb;
            const int sb_groups = L->NG == 1 || L->G % LQ_SB == 0;
            for (int64_t sb = k0 / LQ_SB; sb < sb1; sb++) {
                const uint8_t *q = lq_sb_row(L, t, sb, 0);
                uint16_t *dst = rows + (sb * LQ_SB - k0);
                if (sb_groups) {
                    if (lq_gcur_step(&gc, sb * LQ_SB)) tables32(L, t, gc.g, tab);
                    for (int r = 0; r < 4; r++) {
                        const __m512i W = _mm512_loadu_si512(q + 64 * r);
                        _mm512_storeu_si512(dst + r * ldb, _mm512_permutexvar_epi16(W, tab[r]));
                        _mm512_storeu_si512(dst + r * ldb + 32, _mm512_permutexvar_epi16(_mm512_srli_epi16(W, 4), tab[r]));
                        _mm512_storeu_si512(dst + r * ldb + 64, _mm512_permutexvar_epi16(_mm512_srli_epi16(W, 8), tab[r]));
                        _mm512_storeu_si512(dst + r * ldb + 96, _mm512_permutexvar_epi16(_mm512_srli_epi16(W, 12), tab[r]));
                    }
                } else {
                    for (unsigned h = 0; h < 4; h++) {
                        if (lq_gcur_step(&gc, sb * LQ_SB + 32 * h)) tables32(L, t, gc.g, tab);
                        for (int r = 0; r < 4; r++) {
                            const __m512i W = _mm512_loadu_si512(q + 64 * r);
                            _mm512_storeu_si512(dst + r * ldb + 32 * h, _mm512_permutexvar_epi16(_mm512_srli_epi16(W, 4 * h), tab[r]));
                        }
                    }
                }
            }
            for (int64_t kb = nsb * LQ_SB > k0 ? nsb * LQ_SB : k0; kb < k1; kb += LQ_BLK) { /* the tail */
                if (lq_gcur_step(&gc, kb)) tables32(L, t, gc.g, tab);
                for (int r = 0; r < 4; r++) {
                    /* byte b -> 16-bit lanes 2b (low nibble, in bits 0..3) and 2b+1 (high nibble) */
                    const __m512i D = load16_u8(lq_tail_row(L, t, r) + (kb - nsb * LQ_SB) / 2);
                    const __m512i idx = _mm512_or_si512(D, _mm512_slli_epi32(D, 12));
                    _mm512_storeu_si512(rows + r * ldb + (kb - k0), _mm512_permutexvar_epi16(idx, tab[r]));
                }
            }
        } else {
            float s[4], z[4];
            __m512 vs[4], vnzs[4];
            group_params(L, t, gc.g, s, z);
            for (int r = 0; r < 4; r++) vs[r] = _mm512_set1_ps(s[r]), vnzs[r] = _mm512_set1_ps(-(z[r] * s[r]));
            for (int64_t kb = k0; kb < k1; kb += LQ_BLK) {
                if (lq_gcur_step(&gc, kb)) {
                    group_params(L, t, gc.g, s, z);
                    for (int r = 0; r < 4; r++) vs[r] = _mm512_set1_ps(s[r]), vnzs[r] = _mm512_set1_ps(-(z[r] * s[r]));
                }
                const int64_t sb = kb / LQ_SB;
                for (int r = 0; r < 4; r++) {
                    const uint8_t *q = sb < nsb ? lq_sb_row(L, t, sb, r) + (kb % LQ_SB) : lq_tail_row(L, t, r) + (kb - nsb * LQ_SB);
                    const __m512 e = _mm512_fmadd_ps(_mm512_cvtepi32_ps(load16_u8(q)), vs[r], vnzs[r]);
                    const __m512 o = _mm512_fmadd_ps(_mm512_cvtepi32_ps(load16_u8(q + 16)), vs[r], vnzs[r]);
                    const __m512i eo = (__m512i)_mm512_cvtne2ps_pbh(o, e);
                    _mm512_storeu_si512(rows + r * ldb + (kb - k0), _mm512_permutexvar_epi16(interleave, eo));
                }
            }
        }
    }
}

INLINE void micro_bf16_k(const uint16_t *A, int64_t lda, const uint16_t *B, int64_t ldb, int64_t kc, const int MR,
                         float out[LQ_MR][4]) {
    __m512 acc[LQ_MR][4];
    for (int i = 0; i < MR; i++)
        for (int r = 0; r < 4; r++) acc[i][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kc; k += 32) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(B + k), b1 = (__m512bh)_mm512_loadu_si512(B + ldb + k);
        const __m512bh b2 = (__m512bh)_mm512_loadu_si512(B + 2 * ldb + k);
        const __m512bh b3 = (__m512bh)_mm512_loadu_si512(B + 3 * ldb + k);
        for (int i = 0; i < MR; i++) {
            const __m512bh a = (__m512bh)_mm512_loadu_si512(A + i * lda + k);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, b0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, b1);
            acc[i][2] = _mm512_dpbf16_ps(acc[i][2], a, b2);
            acc[i][3] = _mm512_dpbf16_ps(acc[i][3], a, b3);
        }
    }
    for (int i = 0; i < MR; i++) _mm_storeu_ps(out[i], hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
}

static void micro_bf16_avx512(const uint16_t *A, int64_t lda, const uint16_t *B, int64_t ldb, int64_t kc, int mr,
                              float out[LQ_MR][4]) {
    switch (mr) {
    case 1: micro_bf16_k(A, lda, B, ldb, kc, 1, out); break;
    case 2: micro_bf16_k(A, lda, B, ldb, kc, 2, out); break;
    case 3: micro_bf16_k(A, lda, B, ldb, kc, 3, out); break;
    case 4: micro_bf16_k(A, lda, B, ldb, kc, 4, out); break;
    case 5: micro_bf16_k(A, lda, B, ldb, kc, 5, out); break;
    default: micro_bf16_k(A, lda, B, ldb, kc, 6, out); break;
    }
}

/* ---- GEMV for bf16 activations: vpermw looks up 32 bf16 weights, vdpbf16ps multiplies 32 ---- */

#define GEMV4B_STEP(S)                                                                                 \
    do {                                                                                               \
        __m512i xv[4];                                                                                 \
        for (int i = 0; i < MM; i++) xv[i] = _mm512_loadu_si512(xb + 32 * (S) + i * ldx);              \
        for (int r = 0; r < 4; r++) {                                                                  \
            const __m512bh w = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(W[r], 4 * (S)), tab[r]); \
            for (int i = 0; i < MM; i++)                                                               \
                acc[(S) % NACC][i][r] = _mm512_dpbf16_ps(acc[(S) % NACC][i][r], w, (__m512bh)xv[i]);   \
        }                                                                                              \
    } while (0)

INLINE void gemv4_bf16_k(const lq_layout *L, int64_t t, const uint16_t *x, int64_t ldx, const int MM,
                         float out[4][4]) {
    const int NACC = MM <= 2 ? 2 : 1; /* independent accumulation chains for the dot products */
    __m512 acc[2][4][4];
    __m512i tab[4];
    for (int a = 0; a < NACC; a++)
        for (int i = 0; i < 4; i++)
            for (int r = 0; r < 4; r++) acc[a][i][r] = _mm512_setzero_ps();
    lq_gcur gc = lq_gcur_at(L, 0);
    tables32(L, t, gc.g, tab);
    const int64_t nsb = lq_nsb(L);
    const int sb_groups = L->NG == 1 || L->G % LQ_SB == 0;
    const uint8_t *q = lq_tile(L, t);
    for (int64_t sb = 0; sb < nsb; sb++, q += 4 * 64) {
        __m512i W[4];
        prefetch_superblock(q);
        for (int r = 0; r < 4; r++) W[r] = _mm512_loadu_si512(q + 64 * r);
        const uint16_t *xb = x + sb * LQ_SB;
        if (sb_groups) { /* the next superblock's tables are built ahead of its lookups */
            __m512i next[4];
            const int change = lq_gcur_step(&gc, (sb + 1) * LQ_SB);
            if (change) tables32(L, t, gc.g, next);
            GEMV4B_STEP(0); GEMV4B_STEP(1); GEMV4B_STEP(2); GEMV4B_STEP(3);
            if (change)
                for (int r = 0; r < 4; r++) tab[r] = next[r];
        } else { /* groups of 32 or 64 columns: each block's tables are built one block ahead */
#define GEMV4B_BLOCK(S)                                                                                \
    do {                                                                                               \
        __m512i next[4];                                                                               \
        const int change = lq_gcur_step(&gc, sb * LQ_SB + 32 * ((S) + 1));                             \
        if (change) tables32(L, t, gc.g, next);                                                        \
        GEMV4B_STEP(S);                                                                                \
        if (change)                                                                                    \
            for (int r = 0; r < 4; r++) tab[r] = next[r];                                              \
    } while (0)
            GEMV4B_BLOCK(0); GEMV4B_BLOCK(1); GEMV4B_BLOCK(2); GEMV4B_BLOCK(3);
#undef GEMV4B_BLOCK
        }
    }
    const int64_t nblk = lq_tail(L) / LQ_BLK;
    for (int64_t p = 0; p < nblk; p++) {
        const int64_t kb = nsb * LQ_SB + 32 * p;
        if (lq_gcur_step(&gc, kb)) tables32(L, t, gc.g, tab);
        __m512i xv[4];
        for (int i = 0; i < MM; i++) xv[i] = _mm512_loadu_si512(x + kb + i * ldx);
        for (int r = 0; r < 4; r++) {
            const __m512i D = load16_u8(lq_tail_row(L, t, r) + 16 * p);
            const __m512bh w = (__m512bh)_mm512_permutexvar_epi16(_mm512_or_si512(D, _mm512_slli_epi32(D, 12)), tab[r]);
            for (int i = 0; i < MM; i++) acc[0][i][r] = _mm512_dpbf16_ps(acc[0][i][r], w, (__m512bh)xv[i]);
        }
    }
    for (int a = 1; a < NACC; a++)
        for (int i = 0; i < MM; i++)
            for (int r = 0; r < 4; r++) acc[0][i][r] = _mm512_add_ps(acc[0][i][r], acc[a][i][r]);
    for (int i = 0; i < MM; i++) _mm_storeu_ps(out[i], hsum4(acc[0][i][0], acc[0][i][1], acc[0][i][2], acc[0][i][3]));
}

static void gemv_tile_bf16_avx512(const lq_layout *L, int64_t t, const uint16_t *x, int64_t ldx, int mm,
                                  float out[4][4]) {
    switch (mm) {
    case 1: gemv4_bf16_k(L, t, x, ldx, 1, out); break;
    case 2: gemv4_bf16_k(L, t, x, ldx, 2, out); break;
    case 3: gemv4_bf16_k(L, t, x, ldx, 3, out); break;
    default: gemv4_bf16_k(L, t, x, ldx, 4, out); break;
    }
}

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

const lq_kernels lq_kernels_avx512_bf16 = {
    "avx512_bf16", lq_gemv_tile_avx512, lq_dequant_f32_avx512, dequant_bf16_avx512, lq_micro_f32_avx512,
    micro_bf16_avx512, gemv_tile_bf16_avx512, lq_prepare_xi_avx512, lq_gemv_i8_avx512, 4, 1,
    lq_expand_tile_avx2, 1, lq_dequant_panel_f32_avx2, lq_micro_op_f32_avx512, NULL, NULL, 2, lq_gemv_x8_avx512,
    lq_prepare_xi8_avx512, lq_gemv_a8x8_avx512, lq_prepare_xa8_avx512, 4,
};

#endif /* LQ_X86 */
