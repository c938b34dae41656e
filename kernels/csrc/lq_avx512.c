/* AVX-512 (F, BW, VL) kernels in fp32: exact dequantization (w = (q - z) * s, one rounding, the
 * same as the reference) and FMA accumulation.
 *
 * The trick that makes the 4-bit GEMV cheap: per (row, group) we build a 16-entry fp32 table
 * T[q] = (q - z) * s; vpermps looks a code up using only the low 4 bits of each 32-bit lane, so a
 * lane holding 8 nibbles needs one shift and one permute per nibble, no mask, no int->float
 * conversion, and the scale and zero point are already folded in (no per-group rescaling of the
 * accumulators). Four output rows are processed together so each x vector is loaded once; each
 * group's tables are built ahead of the lookups that use them. Measured on Zen 4 (one core, hot
 * weights): about 8 weights/cycle with G = 128, 10 with one group per row, 5 with G = 32.
 * Decode (M = 1) of 4-bit layers on CPUs with VNNI uses lq_avx512_vnni.c's GEMV instead. */
#include "lq_cpu.h"

#if LQ_X86
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#endif

#include "lq_avx512_inl.h"

/* 8-bit: w = fma(q, s, -z*s), exact because q*s and z*s are (8 + 11 significant bits) */
INLINE void scales8(const lq_layout *L, int64_t t, int64_t g, __m512 vs[4], __m512 vnzs[4]) {
    float s[4], z[4];
    group_params(L, t, g, s, z);
    for (int r = 0; r < 4; r++) {
        vs[r] = _mm512_set1_ps(s[r]);
        vnzs[r] = _mm512_set1_ps(-(z[r] * s[r]));
    }
}

INLINE void reduce_out(__m512 acc[4][4], int mm, float out[4][4]) {
    for (int i = 0; i < mm; i++) _mm_storeu_ps(out[i], hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
}

/* ---- GEMV: mm (<= 4) rows of x against the 4 rows of tile t ---------------------------------- */

/* one nibble position J (0..7) of a superblock: 16 columns of each of the 4 rows; J is a literal,
 * so the shift is an immediate */
#define GEMV4_STEP(J)                                                                                  \
    do {                                                                                               \
        const float *xj = xb + ((J) & 3) * 32 + ((J) >> 2) * 16;                                       \
        __m512 xv[4];                                                                                  \
        for (int i = 0; i < MM; i++) xv[i] = _mm512_loadu_ps(xj + i * ldx);                            \
        for (int r = 0; r < 4; r++) {                                                                  \
            const __m512 w = _mm512_permutexvar_ps(_mm512_srli_epi32(W[r], 4 * (J)), tab[r]);          \
            for (int i = 0; i < MM; i++)                                                               \
                acc[(J) % NACC][i][r] = _mm512_fmadd_ps(w, xv[i], acc[(J) % NACC][i][r]);  \
        }                                                                                              \
    } while (0)

INLINE void gemv4_k(const lq_layout *L, int64_t t, const float *x, int64_t ldx, const int MM, float out[4][4]) {
    /* FMA latency (4 cycles) x throughput (1 zmm/cycle) needs >= 4 independent chains, more for
     * slack: with few rows of x, even and odd nibble positions accumulate separately */
    const int NACC = MM <= 2 ? 2 : 1;
    __m512 acc[2][4][4], tab[4];
    for (int a = 0; a < NACC; a++)
        for (int i = 0; i < 4; i++)
            for (int r = 0; r < 4; r++) acc[a][i][r] = _mm512_setzero_ps();
    lq_gcur gc = lq_gcur_at(L, 0);
    tables16(L, t, gc.g, tab);
    const int64_t nsb = lq_nsb(L);
    /* groups change only at superblock boundaries (G % 128 == 0, or one group): check once per sb */
    const int sb_groups = L->NG == 1 || L->G % LQ_SB == 0;
    const uint8_t *q = lq_tile(L, t);
    if (sb_groups) {
        for (int64_t sb = 0; sb < nsb; sb++, q += 4 * 64) {
            __m512i W[4];
            prefetch_superblock(q);
            for (int r = 0; r < 4; r++) W[r] = _mm512_loadu_si512(q + 64 * r);
            const float *xb = x + sb * LQ_SB;
            /* the next superblock's tables are built now, off the critical path of its lookups */
            __m512 next[4];
            const int change = lq_gcur_step(&gc, (sb + 1) * LQ_SB);
            if (change) tables16(L, t, gc.g, next);
            GEMV4_STEP(0); GEMV4_STEP(4); GEMV4_STEP(1); GEMV4_STEP(5);
            GEMV4_STEP(2); GEMV4_STEP(6); GEMV4_STEP(3); GEMV4_STEP(7);
            if (change)
                for (int r = 0; r < 4; r++) tab[r] = next[r];
        }
    } else {
        /* groups of 32 or 64 columns: each block's tables are built one block ahead */
#define GEMV4_BLOCK(H)                                                                                 \
    do {                                                                                               \
        __m512 next[4];                                                                                \
        const int change = lq_gcur_step(&gc, sb * LQ_SB + 32 * ((H) + 1));                             \
        if (change) tables16(L, t, gc.g, next);                                                        \
        GEMV4_STEP(H);                                                                                 \
        GEMV4_STEP((H) + 4);                                                                           \
        if (change)                                                                                    \
            for (int r = 0; r < 4; r++) tab[r] = next[r];                                              \
    } while (0)
        for (int64_t sb = 0; sb < nsb; sb++, q += 4 * 64) {
            __m512i W[4];
            prefetch_superblock(q);
            for (int r = 0; r < 4; r++) W[r] = _mm512_loadu_si512(q + 64 * r);
            const float *xb = x + sb * LQ_SB;
            GEMV4_BLOCK(0);
            GEMV4_BLOCK(1);
            GEMV4_BLOCK(2);
            GEMV4_BLOCK(3);
        }
#undef GEMV4_BLOCK
    }
    gemv4_tail_f32(L, t, x, ldx, MM, &gc, tab, acc[0]);
    for (int a = 1; a < NACC; a++)
        for (int i = 0; i < MM; i++)
            for (int r = 0; r < 4; r++) acc[0][i][r] = _mm512_add_ps(acc[0][i][r], acc[a][i][r]);
    reduce_out(acc[0], MM, out);
}

INLINE void gemv8_k(const lq_layout *L, int64_t t, const float *x, int64_t ldx, const int MM, float out[4][4]) {
    __m512 acc[4][4], vs[4], vnzs[4];
    for (int i = 0; i < 4; i++)
        for (int r = 0; r < 4; r++) acc[i][r] = _mm512_setzero_ps();
    lq_gcur gc = lq_gcur_at(L, 0);
    scales8(L, t, gc.g, vs, vnzs);
    const int64_t nsb = lq_nsb(L), nblk = L->Kp / LQ_BLK;
    for (int64_t b = 0; b < nblk; b++) {
        const int64_t kb = b * LQ_BLK;
        if (lq_gcur_step(&gc, kb)) scales8(L, t, gc.g, vs, vnzs);
        const uint8_t *q[4];
        for (int r = 0; r < 4; r++)
            q[r] = b / 4 < nsb ? lq_sb_row(L, t, b / 4, r) + 32 * (b % 4) : lq_tail_row(L, t, r) + (kb - nsb * LQ_SB);
        for (int par = 0; par < 2; par++) {
            __m512 xv[4];
            for (int i = 0; i < MM; i++) xv[i] = _mm512_loadu_ps(x + kb + 16 * par + i * ldx);
            for (int r = 0; r < 4; r++) {
                const __m512 w = _mm512_fmadd_ps(_mm512_cvtepi32_ps(load16_u8(q[r] + 16 * par)), vs[r], vnzs[r]);
                for (int i = 0; i < MM; i++) acc[i][r] = _mm512_fmadd_ps(w, xv[i], acc[i][r]);
            }
        }
    }
    reduce_out(acc, MM, out);
}

static void gemv_tile_avx512(const lq_layout *L, int64_t t, const float *x, int64_t ldx, int mm, float out[4][4]) {
    if (L->bits == 4) {
        switch (mm) {
        case 1: gemv4_k(L, t, x, ldx, 1, out); break;
        case 2: gemv4_k(L, t, x, ldx, 2, out); break;
        case 3: gemv4_k(L, t, x, ldx, 3, out); break;
        default: gemv4_k(L, t, x, ldx, 4, out); break;
        }
    } else {
        switch (mm) {
        case 1: gemv8_k(L, t, x, ldx, 1, out); break;
        case 2: gemv8_k(L, t, x, ldx, 2, out); break;
        case 3: gemv8_k(L, t, x, ldx, 3, out); break;
        default: gemv8_k(L, t, x, ldx, 4, out); break;
        }
    }
}

/* ---- GEMM building blocks ------------------------------------------------------------------- */

void lq_dequant_f32_avx512(const lq_layout *L, int64_t t0, int64_t ntl, int64_t k0, int64_t kc, float *buf,
                           int64_t ldb) {
    const int64_t nsb = lq_nsb(L), k1 = k0 + kc;
    for (int64_t t = t0; t < t0 + ntl; t++) {
        float *rows = buf + (t - t0) * LQ_TILE * ldb;
        lq_gcur gc = lq_gcur_at(L, k0);
        if (L->bits == 4) {
            __m512 tab[4];
            tables16(L, t, gc.g, tab);
            const int64_t sb1 = k1 / LQ_SB < nsb ? k1 / LQ_SB : nsb;
            for (int64_t sb = k0 / LQ_SB; sb < sb1; sb++) {
                const uint8_t *q = lq_sb_row(L, t, sb, 0);
                float *dst = rows + (sb * LQ_SB - k0);
                for (unsigned h = 0; h < 4; h++) {
                    if (lq_gcur_step(&gc, sb * LQ_SB + 32 * h)) tables16(L, t, gc.g, tab);
                    for (int r = 0; r < 4; r++) {
                        const __m512i W = _mm512_loadu_si512(q + 64 * r);
                        _mm512_storeu_ps(dst + r * ldb + 32 * h, _mm512_permutexvar_ps(_mm512_srli_epi32(W, 4 * h), tab[r]));
                        _mm512_storeu_ps(dst + r * ldb + 32 * h + 16,
                                         _mm512_permutexvar_ps(_mm512_srli_epi32(W, 4 * h + 16), tab[r]));
                    }
                }
            }
            for (int64_t kb = nsb * LQ_SB > k0 ? nsb * LQ_SB : k0; kb < k1; kb += LQ_BLK) { /* the tail */
                if (lq_gcur_step(&gc, kb)) tables16(L, t, gc.g, tab);
                for (int r = 0; r < 4; r++) {
                    float *dst = rows + r * ldb + (kb - k0);
                    const __m512i D = load16_u8(lq_tail_row(L, t, r) + (kb - nsb * LQ_SB) / 2);
                    _mm512_storeu_ps(dst, _mm512_permutexvar_ps(D, tab[r]));
                    _mm512_storeu_ps(dst + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(D, 4), tab[r]));
                }
            }
        } else {
            __m512 vs[4], vnzs[4];
            scales8(L, t, gc.g, vs, vnzs);
            for (int64_t kb = k0; kb < k1; kb += LQ_BLK) {
                if (lq_gcur_step(&gc, kb)) scales8(L, t, gc.g, vs, vnzs);
                const int64_t sb = kb / LQ_SB;
                for (int r = 0; r < 4; r++) {
                    const uint8_t *q = sb < nsb ? lq_sb_row(L, t, sb, r) + (kb % LQ_SB) : lq_tail_row(L, t, r) + (kb - nsb * LQ_SB);
                    float *dst = rows + r * ldb + (kb - k0);
                    for (int par = 0; par < 2; par++)
                        _mm512_storeu_ps(dst + 16 * par,
                                         _mm512_fmadd_ps(_mm512_cvtepi32_ps(load16_u8(q + 16 * par)), vs[r], vnzs[r]));
                }
            }
        }
    }
}

INLINE void micro_f32_k(const float *A, int64_t lda, const float *B, int64_t ldb, int64_t kc, const int MR,
                        float out[LQ_MR][4]) {
    __m512 acc[LQ_MR][4];
    for (int i = 0; i < MR; i++)
        for (int r = 0; r < 4; r++) acc[i][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kc; k += 16) {
        const __m512 b0 = _mm512_loadu_ps(B + k), b1 = _mm512_loadu_ps(B + ldb + k);
        const __m512 b2 = _mm512_loadu_ps(B + 2 * ldb + k), b3 = _mm512_loadu_ps(B + 3 * ldb + k);
        for (int i = 0; i < MR; i++) {
            const __m512 a = _mm512_loadu_ps(A + i * lda + k);
            acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
            acc[i][2] = _mm512_fmadd_ps(a, b2, acc[i][2]);
            acc[i][3] = _mm512_fmadd_ps(a, b3, acc[i][3]);
        }
    }
    for (int i = 0; i < MR; i++) _mm_storeu_ps(out[i], hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
}

void lq_micro_f32_avx512(const float *A, int64_t lda, const float *B, int64_t ldb, int64_t kc, int mr,
                         float out[LQ_MR][4]) {
    switch (mr) {
    case 1: micro_f32_k(A, lda, B, ldb, kc, 1, out); break;
    case 2: micro_f32_k(A, lda, B, ldb, kc, 2, out); break;
    case 3: micro_f32_k(A, lda, B, ldb, kc, 3, out); break;
    case 4: micro_f32_k(A, lda, B, ldb, kc, 4, out); break;
    case 5: micro_f32_k(A, lda, B, ldb, kc, 5, out); break;
    default: micro_f32_k(A, lda, B, ldb, kc, 6, out); break;
    }
}

/* The outer-product micro-kernel (lq_cpu.h) over two consecutive panels (op_np = 2: P and P + kc * 16,
 * 32 output columns): MR (<= 6) rows of x, two zmm accumulators a row, each x value broadcast once for
 * both. Named accumulators (gcc keeps an array of them in memory). The panels come from the AVX2
 * dequantization (lq_dequant_panel_f32_avx2). */
#define OPZ_ROW(i)                                             \
    if (MR > i) {                                              \
        const __m512 a = _mm512_set1_ps(A[i * lda + k]);       \
        c##i##a = _mm512_fmadd_ps(a, b0, c##i##a);             \
        c##i##b = _mm512_fmadd_ps(a, b1, c##i##b);             \
    }
#define OPZ_STORE(i)                                                                     \
    if (MR > i) {                                                                        \
        if (acc) {                                                                       \
            c##i##a = _mm512_add_ps(c##i##a, _mm512_loadu_ps(C + i * ldc));              \
            c##i##b = _mm512_add_ps(c##i##b, _mm512_loadu_ps(C + i * ldc + LQ_NR));      \
        }                                                                                \
        _mm512_storeu_ps(C + i * ldc, c##i##a);                                          \
        _mm512_storeu_ps(C + i * ldc + LQ_NR, c##i##b);                                  \
    }
INLINE void micro_op_k(const float *A, int64_t lda, const float *P, int64_t kc, const int MR, float *C, int64_t ldc,
                       int acc) {
    __m512 c0a = _mm512_setzero_ps(), c0b = c0a, c1a = c0a, c1b = c0a, c2a = c0a, c2b = c0a, c3a = c0a, c3b = c0a,
           c4a = c0a, c4b = c0a, c5a = c0a, c5b = c0a;
    const float *P1 = P + kc * LQ_NR;
    for (int64_t k = 0; k < kc; k++) {
        const __m512 b0 = _mm512_load_ps(P + k * LQ_NR), b1 = _mm512_load_ps(P1 + k * LQ_NR);
        OPZ_ROW(0) OPZ_ROW(1) OPZ_ROW(2) OPZ_ROW(3) OPZ_ROW(4) OPZ_ROW(5)
    }
    OPZ_STORE(0) OPZ_STORE(1) OPZ_STORE(2) OPZ_STORE(3) OPZ_STORE(4) OPZ_STORE(5)
}
#undef OPZ_ROW
#undef OPZ_STORE

void lq_micro_op_f32_avx512(const float *A, int64_t lda, const float *P, int64_t kc, int mr, float *C, int64_t ldc,
                            int acc) {
    LQ_MICRO_OP_DISPATCH(micro_op_k)
}

void lq_gemv_tile_avx512(const lq_layout *L, int64_t t, const float *x, int64_t ldx, int mm, float out[4][4]) {
    gemv_tile_avx512(L, t, x, ldx, mm, out);
}

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

const lq_kernels lq_kernels_avx512 = {
    "avx512", lq_gemv_tile_avx512, lq_dequant_f32_avx512, NULL, lq_micro_f32_avx512, NULL, NULL,
    lq_prepare_xi_avx512, lq_gemv_i8_avx512, 4, 1, lq_expand_tile_avx2, 1, lq_dequant_panel_f32_avx2,
    lq_micro_op_f32_avx512, NULL, NULL, 2, lq_gemv_x8_avx512, lq_prepare_xi8_avx512, lq_gemv_a8x8_avx512,
    lq_prepare_xa8_avx512, 4,
};

#endif /* LQ_X86 */
