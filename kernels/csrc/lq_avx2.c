/* AVX2 + FMA + F16C kernels (fp32): for x86 CPUs without AVX-512. Same layout and the same exact
 * dequantization as the AVX-512 kernels, with 8-lane vectors and a mask + int->float conversion in
 * place of the 16-entry permute (AVX2 has no 16-entry float permute): w = fma(q, s, -z*s), which is
 * exact because q*s and z*s fit in fp32's 24-bit significand.
 *
 * The GEMV of one row of x (decode) runs on integer dot products (the prepared x of lq_cpu.h), as the
 * AVX-512 VNNI one does, with vpmaddubsw + vpmaddwd in place of vpdpbusd: the FMA GEMV spends a
 * shift, a conversion and two FMAs per 8 weights and reached only 20-25% of the memory bandwidth on
 * two cores; the integer one needs about a third of the instructions per weight.
 *
 * Prefill (M > 32 in fp32, M >= 12 with dynamic INT8 activations) runs outer-product GEMMs: a panel of
 * 16 weight rows is dequantized (fp32) or unpacked to one byte per code (INT8) straight into the order
 * the micro-kernel reads, and each value of a few rows of x is broadcast against a whole panel row:
 * 6 x 16 fp32 accumulators, or 3 x 8 int32 ones per pass over a half panel. The dot-product GEMM it
 * replaced (micro_f32: 4 weight rows against 2 rows of x, horizontal sums) ran at 0.65x fp32 F.linear. */
#include "lq_cpu.h"

#if LQ_X86
#include <immintrin.h>
#include <string.h>

/* lq_avx2_vnni.c builds this file a second time with LQ_AVX2_VNNI: the table of CPUs with AVX-VNNI,
 * whose integer GEMVs take vpdpbusd on ymm instead of its vpmaddubsw + vpmaddwd emulation */
#if defined(__clang__) && defined(LQ_AVX2_VNNI)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avxvnni"))), apply_to = function)
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#ifdef LQ_AVX2_VNNI
#pragma GCC target("avx2,fma,f16c,avxvnni")
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#endif

#include "lq_x86_inl.h"
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

/* The FMA GEMV (8-bit codes, groups that are not multiples of 128, LLMQUANT_CPU_FP32_GEMV=fma): the
 * tile is read in storage order, the 4 rows of each superblock together, with the codes prefetched as
 * in the integer GEMVs. Reading it a row at a time (a stride of 4 rows between superblocks) left the
 * hardware prefetchers behind: 8-bit decode ran at 3 GB/s, 7.9x the 4-bit time. */
INLINE void gemv_k(const lq_layout *L, int64_t t, const float *x, int64_t ldx, const int MM, float out[4][4]) {
    __m256 acc[4][4][2];
    for (int i = 0; i < MM; i++)
        for (int r = 0; r < 4; r++) acc[i][r][0] = acc[i][r][1] = _mm256_setzero_ps();
    lq_gcur gc = lq_gcur_at(L, 0);
    __m256 vs[4], vnzs[4];
    for (int r = 0; r < 4; r++) row_scales(L, t, r, gc.g, &vs[r], &vnzs[r]);
    const int64_t nsb = lq_nsb(L), sbb = 4 * lq_row_sb_bytes(L);
    for (int64_t kb = 0; kb < L->Kp; kb += LQ_BLK) {
        if (lq_gcur_step(&gc, kb))
            for (int r = 0; r < 4; r++) row_scales(L, t, r, gc.g, &vs[r], &vnzs[r]);
        if (kb % LQ_SB == 0 && kb / LQ_SB < nsb) {
            const uint8_t *q = lq_sb_row(L, t, kb / LQ_SB, 0);
            for (int64_t j = 0; j < sbb; j += 64) {
                prefetch_line(q + j);
            }
        }
        for (int r = 0; r < 4; r++) {
            __m256 w[4];
            block_weights(L, t, r, kb, vs[r], vnzs[r], w);
            for (int i = 0; i < MM; i++) {
                const float *xb = x + i * ldx + kb;
                acc[i][r][0] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xb), acc[i][r][0]);
                acc[i][r][1] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), acc[i][r][1]);
                acc[i][r][0] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + 16), acc[i][r][0]);
                acc[i][r][1] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), acc[i][r][1]);
            }
        }
    }
    for (int i = 0; i < MM; i++)
        for (int r = 0; r < 4; r++) out[i][r] = hsum8(_mm256_add_ps(acc[i][r][0], acc[i][r][1]));
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

/* --- the outer-product fp32 GEMM (lq_cpu.h: dequant_panel_f32, micro_op_f32) ---------------------- */

/* 8 x 8 transpose: v[i] = row i -> v[j] = column j */
INLINE void transpose8(__m256 v[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        v[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

/* Rows 8h .. 8h + 7 of a panel starting at tile t0 (rows past `rows`: zero), 4-bit superblock sb, as
 * uint32 code lanes: d0[l] holds lane l (bytes 4l .. 4l + 3) of each of the 8 rows, d1[l] lane 8 + l */
INLINE void sb_lanes(const lq_layout *L, int64_t t0, int rows, int h, int64_t sb, __m256 d0[8], __m256 d1[8]) {
    for (int i = 0; i < 8; i++) {
        const int j = 8 * h + i;
        if (j < rows) {
            const uint8_t *q = lq_sb_row(L, t0 + j / LQ_TILE, sb, j % LQ_TILE);
            d0[i] = _mm256_loadu_ps((const float *)q);
            d1[i] = _mm256_loadu_ps((const float *)(q + 32));
        } else {
            d0[i] = d1[i] = _mm256_setzero_ps();
        }
    }
    transpose8(d0);
    transpose8(d1);
}

/* scale and -zero*scale of rows 8h .. 8h + 7 of a panel starting at tile t0 (tiles t0 + 2h, t0 + 2h + 1;
 * a tile past the last one, nt, gets zeros) in group g */
INLINE void panel_scales(const lq_layout *L, int64_t t0, int nt, int h, int64_t g, __m256 *vs, __m256 *vnzs) {
    __m128i sh = _mm_setzero_si128(), zb = _mm_setzero_si128();
    for (int u = 0; u < 2; u++) {
        const int64_t t = t0 + 2 * h + u;
        if (t >= t0 + nt) break;
        const int64_t at = (t * L->NG + g) * LQ_TILE;
        int64_t s4, z4 = 0;
        memcpy(&s4, L->s + at, 8);
        if (L->z) {
            int32_t z;
            memcpy(&z, L->z + at, 4);
            z4 = (uint32_t)z;
        }
        sh = _mm_insert_epi64(sh, s4, u);
        zb = _mm_insert_epi32(zb, (int)z4, u);
    }
    *vs = _mm256_cvtph_ps(sh);
    const __m256 z = L->z ? _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(zb)) : _mm256_set1_ps((float)L->zc);
    *vnzs = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(z, *vs));
}

#ifndef LQ_AVX2_VNNI /* defined once, by the plain AVX2 build of this file */
/* Full 4-bit superblocks: the 64-byte rows of 8 weight rows are transposed as 8 x 8 uint32 (two per
 * superblock), which puts the same code lane of every row in one vector; each of the 8 nibbles of a
 * lane is then one column of the panel (shift, mask, convert, w = q s - z s with the rows' scales).
 * Elsewhere (tails, 8-bit codes): each row's block into a small buffer (block_weights), then an
 * 8 x 8 transpose per 8 rows and 8 columns. */
void lq_dequant_panel_f32_avx2(const lq_layout *L, int64_t t0, int ntl, int64_t k0, int64_t kc, float *P) {
    const int rows = ntl * LQ_TILE;
    const int64_t nsb = lq_nsb(L), kend = k0 + kc;
    const __m256i m15 = _mm256_set1_epi32(15);
    int64_t kb = k0;
    if (L->bits == 4) {
        for (int h = 0; h < LQ_NR / 8; h++) {
            lq_gcur gc = lq_gcur_at(L, k0);
            __m256 vs, vnzs;
            panel_scales(L, t0, ntl, h, gc.g, &vs, &vnzs);
            for (int64_t sb = k0 / LQ_SB; sb < nsb && (sb + 1) * LQ_SB <= kend; sb++) {
                __m256 d0[8], d1[8];
                sb_lanes(L, t0, rows, h, sb, d0, d1);
                for (int hb = 0; hb < 4; hb++) {
                    const int64_t k = sb * LQ_SB + hb * LQ_BLK;
                    if (lq_gcur_step(&gc, k)) panel_scales(L, t0, ntl, h, gc.g, &vs, &vnzs);
                    float *dst = P + (k - k0) * LQ_NR + 8 * h;
                    const __m128i se = _mm_cvtsi32_si128(4 * hb), so = _mm_cvtsi32_si128(4 * hb + 16);
                    for (int l = 0; l < 8; l++) {
                        const __m256i a = _mm256_castps_si256(d0[l]), b = _mm256_castps_si256(d1[l]);
                        const __m256i q0 = _mm256_and_si256(_mm256_srl_epi32(a, se), m15);
                        const __m256i q1 = _mm256_and_si256(_mm256_srl_epi32(b, se), m15);
                        const __m256i q2 = _mm256_and_si256(_mm256_srl_epi32(a, so), m15);
                        const __m256i q3 = _mm256_and_si256(_mm256_srl_epi32(b, so), m15);
                        _mm256_store_ps(dst + l * LQ_NR, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q0), vs, vnzs));
                        _mm256_store_ps(dst + (8 + l) * LQ_NR, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q1), vs, vnzs));
                        _mm256_store_ps(dst + (16 + l) * LQ_NR, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q2), vs, vnzs));
                        _mm256_store_ps(dst + (24 + l) * LQ_NR, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q3), vs, vnzs));
                    }
                }
            }
        }
        while (kb < kend && kb / LQ_SB < nsb && (kb / LQ_SB + 1) * LQ_SB <= kend) kb += LQ_SB;
    }
    if (kb >= kend) return;
    float tmp[LQ_NR][LQ_BLK] __attribute__((aligned(32)));
    memset(tmp, 0, sizeof tmp);
    lq_gcur gc = lq_gcur_at(L, kb);
    for (; kb < kend; kb += LQ_BLK) {
        lq_gcur_step(&gc, kb);
        for (int j = 0; j < rows; j++) {
            __m256 vs, vnzs, w[4];
            const int64_t t = t0 + j / LQ_TILE;
            const int r = j % LQ_TILE;
            row_scales(L, t, r, gc.g, &vs, &vnzs);
            block_weights(L, t, r, kb, vs, vnzs, w);
            for (int v = 0; v < 4; v++) _mm256_store_ps(tmp[j] + 8 * v, w[v]);
        }
        float *dst = P + (kb - k0) * LQ_NR;
        for (int v = 0; v < 4; v++)
            for (int h = 0; h < LQ_NR / 8; h++) {
                __m256 c[8];
                for (int i = 0; i < 8; i++) c[i] = _mm256_load_ps(tmp[8 * h + i] + 8 * v);
                transpose8(c);
                for (int e = 0; e < 8; e++) _mm256_store_ps(dst + (8 * v + e) * LQ_NR + 8 * h, c[e]);
            }
    }
}
#endif /* !LQ_AVX2_VNNI */

/* MR x 16 accumulators (at most 12 of the 16 registers), two panel loads and MR broadcasts a column.
 * Named variables, not an array: gcc keeps an array of accumulators in memory across the loop. */
#define OP_ROW(i)                                                  \
    if (MR > i) {                                                  \
        const __m256 a = _mm256_broadcast_ss(A + i * lda + k);     \
        c##i##a = _mm256_fmadd_ps(a, b0, c##i##a);                 \
        c##i##b = _mm256_fmadd_ps(a, b1, c##i##b);                 \
    }
#define OP_STORE(i)                                                           \
    if (MR > i) {                                                             \
        if (acc) {                                                            \
            c##i##a = _mm256_add_ps(c##i##a, _mm256_loadu_ps(C + i * ldc));     \
            c##i##b = _mm256_add_ps(c##i##b, _mm256_loadu_ps(C + i * ldc + 8)); \
        }                                                                     \
        _mm256_storeu_ps(C + i * ldc, c##i##a);                               \
        _mm256_storeu_ps(C + i * ldc + 8, c##i##b);                           \
    }
INLINE void micro_op_k(const float *A, int64_t lda, const float *P, int64_t kc, const int MR, float *C, int64_t ldc,
                       int acc) {
    __m256 c0a = _mm256_setzero_ps(), c0b = c0a, c1a = c0a, c1b = c0a, c2a = c0a, c2b = c0a, c3a = c0a, c3b = c0a,
           c4a = c0a, c4b = c0a, c5a = c0a, c5b = c0a;
    for (int64_t k = 0; k < kc; k++) {
        const __m256 b0 = _mm256_load_ps(P + k * LQ_NR), b1 = _mm256_load_ps(P + k * LQ_NR + 8);
        OP_ROW(0) OP_ROW(1) OP_ROW(2) OP_ROW(3) OP_ROW(4) OP_ROW(5)
    }
    OP_STORE(0) OP_STORE(1) OP_STORE(2) OP_STORE(3) OP_STORE(4) OP_STORE(5)
}
#undef OP_ROW
#undef OP_STORE

static void micro_op_f32_avx2(const float *A, int64_t lda, const float *P, int64_t kc, int mr, float *C, int64_t ldc,
                              int acc) {
    LQ_MICRO_OP_DISPATCH(micro_op_k)
}

/* --- x on integer dot products (lq_cpu.h: the prepared row) ------------------------------------- */

/* the low bytes of a, b, c, d as bytes 0..3 of each lane */
INLINE __m256i pack_bytes(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i lo8 = _mm256_set1_epi32(0xFF);
    const __m256i ab = _mm256_or_si256(_mm256_and_si256(a, lo8), _mm256_slli_epi32(_mm256_and_si256(b, lo8), 8));
    const __m256i abc = _mm256_or_si256(ab, _mm256_slli_epi32(_mm256_and_si256(c, lo8), 16));
    return _mm256_or_si256(abc, _mm256_slli_epi32(d, 24));
}

/* 2^k as floats, for integer k in [-126, 127] */
INLINE __m256 pow2(__m256i k) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23)); }

static int prepare_xi_avx2(const float *xr, int64_t nsb, int nlimbs, uint8_t *xi) {
    const __m256i c128 = _mm256_set1_epi32(128), expmask = _mm256_set1_epi32(0x7F800000);
    const __m256i absmask = _mm256_set1_epi32(0x7FFFFFFF);
    const int S = LQ_XI_SHIFT(nlimbs);
    for (int64_t sb = 0; sb < nsb; sb++, xr += LQ_SB, xi += LQ_XI_SB_BYTES(nlimbs)) {
        /* amax per lane; lanes l and l + 8 share it (lq_cpu.h) */
        __m256i amax_h[2], bad = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            amax_h[h] = _mm256_setzero_si256();
            for (int c = 0; c < 8; c++) { /* E0 O0 E1 O1 E2 O2 E3 O3, lanes 8h .. 8h + 7 */
                const __m256i bits = _mm256_castps_si256(_mm256_loadu_ps(xr + 16 * c + 8 * h));
                bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(bits, expmask), expmask));
                amax_h[h] = _mm256_max_epi32(amax_h[h], _mm256_and_si256(bits, absmask)); /* |x| orders as its bits */
            }
        }
        if (!_mm256_testz_si256(bad, bad)) return 0; /* NaN or infinity */
        amax_h[0] = amax_h[1] = _mm256_max_epi32(amax_h[0], amax_h[1]);
        for (int h = 0; h < 2; h++) {
            __m256 v[8];
            for (int c = 0; c < 8; c++) v[c] = _mm256_loadu_ps(xr + 16 * c + 8 * h);
            const __m256i amax = amax_h[h];
            /* e = floor(log2 amax) from the exponent field, at least -100; 0 for an all-zero lane */
            __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(amax, 23), _mm256_set1_epi32(127));
            e = _mm256_max_epi32(e, _mm256_set1_epi32(-100));
            e = _mm256_andnot_si256(_mm256_cmpeq_epi32(amax, _mm256_setzero_si256()), e);
            const __m256 up = pow2(_mm256_sub_epi32(_mm256_set1_epi32(S), e));
            __m256i m[8], msum = _mm256_setzero_si256();
            for (int c = 0; c < 8; c++) {
                m[c] = _mm256_cvtps_epi32(_mm256_mul_ps(v[c], up)); /* exact scaling, nearest even */
                if (nlimbs == 1)
                    m[c] = _mm256_max_epi32(_mm256_min_epi32(m[c], _mm256_set1_epi32(127)), _mm256_set1_epi32(-127));
                msum = _mm256_add_epi32(msum, m[c]);
            }
            __m256i m1[8], m2[8];
            for (int c = 0; c < 8; c++) {
                m1[c] = _mm256_srai_epi32(_mm256_add_epi32(m[c], c128), 8);
                m2[c] = _mm256_srai_epi32(_mm256_add_epi32(m1[c], c128), 8);
            }
            const __m256i *limb[3] = {m, m1, m2};
            for (int p = 0; p < nlimbs; p++) {
                const __m256i *l = limb[p];
                /* lo: E0 E2 O0 O2; hi: E1 E3 O1 O3 (lq_cpu.h) */
                _mm256_store_si256((__m256i *)(xi + 64 * p + 32 * h), pack_bytes(l[0], l[4], l[1], l[5]));
                _mm256_store_si256((__m256i *)(xi + 64 * nlimbs + 64 * p + 32 * h), pack_bytes(l[2], l[6], l[3], l[7]));
            }
            _mm256_store_si256((__m256i *)(xi + 128 * nlimbs + 32 * h), msum);
            _mm256_store_ps((float *)(xi + 128 * nlimbs + 64 + 32 * h), pow2(_mm256_sub_epi32(e, _mm256_set1_epi32(S))));
        }
    }
    return 1;
}

/* scale and -zero of rows 4t..4t+3 in group g */

/* the 8 cache lines of an 8-bit superblock's 4 rows, ahead into L1 and further into L2 */
INLINE void prefetch_8bit_superblock(const uint8_t *q) {
    for (int j = 0; j < 8; j++) {
        prefetch_line(q + 64 * j);
    }
}

/* the fp32 GEMV over the tail columns (Kp % 128) of rows r of tile t, from group cursor gc on */
INLINE float tail_dot(const lq_layout *L, int64_t t, int r, lq_gcur gc, const float *xr) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), vs, vnzs, w[4];
    row_scales(L, t, r, gc.g, &vs, &vnzs);
    for (int64_t kb = lq_nsb(L) * LQ_SB; kb < L->Kp; kb += LQ_BLK) {
        if (lq_gcur_step(&gc, kb)) row_scales(L, t, r, gc.g, &vs, &vnzs);
        block_weights(L, t, r, kb, vs, vnzs, w);
        acc0 = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xr + kb), acc0);
        acc1 = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xr + kb + 8), acc1);
        acc0 = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xr + kb + 16), acc0);
        acc1 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xr + kb + 24), acc1);
    }
    return hsum8(_mm256_add_ps(acc0, acc1));
}

/* The fp32 tail columns (Kp % 128) of an 8-bit layout's tile t against mm rows of x: tails[i][r]. One
 * row of x: tail_dot; several: the tail dequantized once (in xr order), then a dot product per row. */
INLINE void tails_8bit(const lq_layout *L, int64_t t, lq_gcur gc, const float *xr, int64_t ldx, int mm,
                       float tails[4][4]) {
    const int64_t tl = lq_tail(L), k0 = lq_nsb(L) * LQ_SB;
    float tw[4][LQ_SB];
    if (tl && mm > 1) dequant_f32_avx2(L, t, 1, k0, tl, &tw[0][0], LQ_SB);
    for (int i = 0; i < mm; i++)
        for (int r = 0; r < 4; r++) {
            float tail = 0.f;
            if (tl && mm == 1) {
                tail = tail_dot(L, t, r, gc, xr);
            } else if (tl) {
                __m256 a = _mm256_setzero_ps();
                for (int64_t k = 0; k < tl; k += 8)
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(tw[r] + k), _mm256_loadu_ps(xr + i * ldx + k0 + k), a);
                tail = hsum8(a);
            }
            tails[i][r] = tail;
        }
}

/* The code bytes of one row of a superblock (p: the row's first byte) at PB bits a code, as the
 * integer dot products take them: lo = nibbles 0 and 2 of each 4-bit word (byte positions 2w, 2w + 1),
 * hi = nibbles 1 and 3; lo0/hi0 are byte positions 0..31, lo1/hi1 32..63. A 2- or 3-bit row is laid
 * out for this (lq_cpu.h): a 2-bit row's vectors are bit pairs 0..3 of its 32 bytes; a 3-bit row's
 * bytes A hold lo0 (bits 0-2), lo1 (3-5) and hi0's low two bits (6-7), its 16 bytes C, put in both
 * 128-bit lanes, hi1 (bits 0-2 | 3-5 in lane 0 | 1) and hi0's third bits (bit 6 | 7). */
INLINE void row_codes(const uint8_t *p, const int PB, __m256i *lo0, __m256i *hi0, __m256i *lo1, __m256i *hi1) {
    if (PB == 4) {
        const __m256i nib = _mm256_set1_epi8(0x0F);
        const __m256i W0 = _mm256_loadu_si256((const __m256i *)p), W1 = _mm256_loadu_si256((const __m256i *)(p + 32));
        *lo0 = _mm256_and_si256(W0, nib);
        *hi0 = _mm256_and_si256(_mm256_srli_epi16(W0, 4), nib);
        *lo1 = _mm256_and_si256(W1, nib);
        *hi1 = _mm256_and_si256(_mm256_srli_epi16(W1, 4), nib);
        return;
    }
    const __m256i two = _mm256_set1_epi8(3), B = _mm256_loadu_si256((const __m256i *)p);
    if (PB == 3) {
        const __m256i three = _mm256_set1_epi8(7), bit2 = _mm256_set1_epi8(4);
        const __m256i C = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(p + 32)));
        *lo0 = _mm256_and_si256(B, three);
        *lo1 = _mm256_and_si256(_mm256_srli_epi16(B, 3), three);
        *hi1 = _mm256_and_si256(_mm256_srlv_epi32(C, _mm256_setr_epi32(0, 0, 0, 0, 3, 3, 3, 3)), three);
        *hi0 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(B, 6), two),
                               _mm256_and_si256(_mm256_srlv_epi32(C, _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5)), bit2));
        return;
    }
    *lo0 = _mm256_and_si256(B, two);
    *lo1 = _mm256_and_si256(_mm256_srli_epi16(B, 2), two);
    *hi0 = _mm256_and_si256(_mm256_srli_epi16(B, 4), two);
    *hi1 = _mm256_and_si256(_mm256_srli_epi16(B, 6), two);
}

/* The GEMV of one row of x in NL = 3 limbs (the exact fp32 decode, lq_cpu.h) or 2 (bf16-class x) against
 * tile t. Its speed is set by vpmaddubsw (2 NL per 64 codes: NL limbs x lo/hi nibbles); everything else is
 * kept below it. Lanes l and l + 8 share their scale, so per limb the four products of a row and
 * superblock (both halves, lo and hi) are summed in int16 (|sum| <= 4 x 2 x 15 x 128 < 2^15) and widened
 * once, by vpmaddwd against 1 (limbs 0 and 2, the latter then shifted by 16) or 256 (limb 1: the shift
 * for free). The lane sums, |m| <= 2^22 times 16 codes <= 15, and the zero-point term stay exact in int32.
 * Measured in a loop-only test with the codes in L1 (Zen 5, AVX2 code, three limbs): 4.1 against 5.5-8
 * TSC ticks per 64 codes for the per-half form it replaced; vpmaddubsw alone: 3.9. */
#define X3_LIMB(p)                                                                                  \
    _mm256_add_epi16(                                                                              \
        _mm256_add_epi16(_mm256_maddubs_epi16(lo0, _mm256_load_si256((const __m256i *)(xi + 64 * (p)))), \
                         _mm256_maddubs_epi16(hi0, _mm256_load_si256((const __m256i *)(xi + 64 * NL + 64 * (p))))), \
        _mm256_add_epi16(_mm256_maddubs_epi16(lo1, _mm256_load_si256((const __m256i *)(xi + 32 + 64 * (p)))), \
                         _mm256_maddubs_epi16(hi1, _mm256_load_si256((const __m256i *)(xi + 64 * NL + 32 + 64 * (p))))))

#define X3_DOT(acc, p)                                                                                        \
    acc = _mm256_dpbusd_avx_epi32(acc, lo0, _mm256_load_si256((const __m256i *)(xi + 64 * (p))));               \
    acc = _mm256_dpbusd_avx_epi32(acc, hi0, _mm256_load_si256((const __m256i *)(xi + 64 * NL + 64 * (p))));     \
    acc = _mm256_dpbusd_avx_epi32(acc, lo1, _mm256_load_si256((const __m256i *)(xi + 32 + 64 * (p))));          \
    acc = _mm256_dpbusd_avx_epi32(acc, hi1, _mm256_load_si256((const __m256i *)(xi + 64 * NL + 32 + 64 * (p))));

INLINE void gemv_x3_k(const lq_layout *L, int64_t t, const uint8_t *xi, const int PB, const int ASYM, const int NL,
                      const float *xr, float out[4][4]) {
    const int64_t rowb = 16 * PB; /* bytes of a row of a superblock */
    const __m256i ones = _mm256_set1_epi16(1), c256 = _mm256_set1_epi16(256);
    __m256 tot[4];
    for (int r = 0; r < 4; r++) tot[r] = _mm256_setzero_ps();
    lq_igroups G;
    igroups_start(&G, L, t);
    const int64_t nsb = lq_nsb(L);
    const uint8_t *q = lq_tile(L, t);
    for (int64_t sb = 0; sb < nsb; sb++, q += 4 * rowb, xi += LQ_XI_SB_BYTES(NL)) {
        igroups_at(&G, L, t, sb);
        for (int r = 0; r < 4 * PB / 4; r++) prefetch_line(q + 64 * r);
        /* the zero-point term -z sum m over both halves: for a symmetric layer the same for every row */
        const __m256i msum = _mm256_add_epi32(_mm256_load_si256((const __m256i *)(xi + 128 * NL)),
                                              _mm256_load_si256((const __m256i *)(xi + 128 * NL + 32)));
        const __m256i zsym = ASYM ? msum : _mm256_mullo_epi32(msum, _mm256_set1_epi32(G.nz[0]));
        const __m256 ex = _mm256_load_ps((const float *)(xi + 128 * NL + 64)); /* = the other half's */
        for (int r = 0; r < 4; r++) {
            __m256i lo0, hi0, lo1, hi1;
            row_codes(q + rowb * r, PB, &lo0, &hi0, &lo1, &hi1);
#ifdef LQ_AVX2_VNNI /* each limb's products straight into int32 (|sum| <= 16 x 15 x 128 for limb 1) */
            (void)ones;
            (void)c256;
            __m256i a2 = _mm256_setzero_si256(), a1 = a2, T = a2;
            if (NL == 3) {
                X3_DOT(a2, 2)
            }
            X3_DOT(a1, 1)
            X3_DOT(T, 0)
            T = _mm256_add_epi32(T, _mm256_slli_epi32(_mm256_add_epi32(a1, _mm256_slli_epi32(a2, 8)), 8));
#else
            __m256i T = _mm256_madd_epi16(X3_LIMB(1), c256);
            if (NL == 3) T = _mm256_add_epi32(T, _mm256_slli_epi32(_mm256_madd_epi16(X3_LIMB(2), ones), 16));
            T = _mm256_add_epi32(T, _mm256_madd_epi16(X3_LIMB(0), ones));
#endif
            /* sum (q - z) m = sum q m - z sum m */
            T = _mm256_add_epi32(T, ASYM ? _mm256_mullo_epi32(zsym, _mm256_set1_epi32(G.nz[r])) : zsym);
            tot[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(T), _mm256_mul_ps(ex, _mm256_set1_ps(G.s[r])), tot[r]);
        }
    }
    for (int r = 0; r < 4; r++) out[0][r] = hsum8(tot[r]) + (lq_tail(L) ? tail_dot(L, t, r, G.gc, xr) : 0.f);
}
#undef X3_LIMB
#undef X3_DOT

/* fp32 decode of an 8-bit layout on integer dot products (lq_cpu.h: LQ_XI8_SB_BYTES): per row and
 * superblock, limb sums T_p = sum q l_p - z sum l_p in int32, combined in fp32. With AVX-VNNI, x in
 * three int8 limbs (lq_prepare_xi8) on vpdpbusd, 4 per limb. Without it, whose vpmaddubsw cannot take a
 * whole code (its int16 pair sums would overflow), x in two int16 limbs (lq_prepare_xw8) against the
 * codes widened to 16 bits on vpmaddwd, 8 per limb (|T_0| <= 2 x 16 x 255 x 2^15 < 2^31); a code's
 * two nibbles on vpmaddubsw apart took 24 multiplies and ran no faster than the FMA GEMV on one core. */
#ifdef LQ_AVX2_VNNI
#define X8_LIMBS 3
#define X8_RADIX 256.f
#define PREPARE_X8 lq_prepare_xi8
#else
#define X8_LIMBS 2
#define X8_RADIX 65536.f
#define PREPARE_X8 lq_prepare_xw8
#endif
static void gemv_x8_avx2(const lq_layout *L, int64_t t, const uint8_t *xi, const float *xr, float out[4][4]) {
    __m256 tot[4];
    for (int r = 0; r < 4; r++) tot[r] = _mm256_setzero_ps();
    lq_igroups G;
    igroups_start(&G, L, t);
    const int64_t nsb = lq_nsb(L);
    const uint8_t *q = lq_tile(L, t);
    for (int64_t sb = 0; sb < nsb; sb++, q += 4 * LQ_SB, xi += LQ_XI8_SB_BYTES) {
        igroups_at(&G, L, t, sb);
        prefetch_8bit_superblock(q);
        __m256i ms[X8_LIMBS], zs[X8_LIMBS]; /* lane sums of each limb; -zc times them (symmetric) */
        for (int p = 0; p < X8_LIMBS; p++) {
#ifdef LQ_AVX2_VNNI /* lanes L and L + 8 together */
            ms[p] = _mm256_add_epi32(_mm256_load_si256((const __m256i *)(xi + 384 + 64 * p)),
                                     _mm256_load_si256((const __m256i *)(xi + 416 + 64 * p)));
#else
            ms[p] = _mm256_load_si256((const __m256i *)(xi + 512 + 32 * p));
#endif
            zs[p] = _mm256_mullo_epi32(ms[p], _mm256_set1_epi32(G.nz[0]));
        }
        const __m256 ex = _mm256_load_ps((const float *)(xi + 576));
        for (int r = 0; r < 4; r++) {
            const uint8_t *qr = q + LQ_SB * r;
            __m256i T[X8_LIMBS];
            for (int p = 0; p < X8_LIMBS; p++) T[p] = L->z ? _mm256_mullo_epi32(ms[p], _mm256_set1_epi32(G.nz[r])) : zs[p];
#ifdef LQ_AVX2_VNNI
            for (int v = 0; v < 4; v++) {
                const __m256i c = _mm256_loadu_si256((const __m256i *)(qr + 32 * v));
                for (int p = 0; p < 3; p++)
                    T[p] = _mm256_dpbusd_avx_epi32(T[p], c, _mm256_load_si256((const __m256i *)(xi + 128 * p + 32 * v)));
            }
#else
            for (int i = 0; i < 8; i++) {
                const __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qr + 16 * i)));
                for (int p = 0; p < 2; p++)
                    T[p] = _mm256_add_epi32(T[p], _mm256_madd_epi16(c, _mm256_load_si256((const __m256i *)(xi + 256 * p + 32 * i))));
            }
#endif
            __m256 f = _mm256_cvtepi32_ps(T[X8_LIMBS - 1]);
            for (int p = X8_LIMBS - 2; p >= 0; p--) f = _mm256_fmadd_ps(f, _mm256_set1_ps(X8_RADIX), _mm256_cvtepi32_ps(T[p]));
            tot[r] = _mm256_fmadd_ps(f, _mm256_mul_ps(ex, _mm256_set1_ps(G.s[r])), tot[r]);
        }
    }
    for (int r = 0; r < 4; r++) out[0][r] = hsum8(tot[r]) + (lq_tail(L) ? tail_dot(L, t, r, G.gc, xr) : 0.f);
}
#undef X8_LIMBS
#undef X8_RADIX

/* Dynamic INT8 activations on an 8-bit layout (W8A8; x prepared by lq_prepare_xa8, one limb): int32
 * lane j of code vector v (block v of the superblock row, bytes 4j .. 4j + 3) is group j of lq_cpu.h,
 * so every vector's products go into one int32 vector per row and superblock, whose lanes j take the
 * zero-point terms of prepared lanes j and j + 8. With AVX-VNNI the codes go to vpdpbusd as they are.
 * vpmaddubsw cannot take a whole code (its pair sums would overflow int16): each code is split into
 * its nibbles, q = lo + 16 hi, and each nibble's products are summed in int16 over the four vectors
 * (|sum| <= 4 x 2 x 15 x 127 < 2^15) and widened by vpmaddwd against 1 and 16: the same integers. */
INLINE void gemv_a8x8_k(const lq_layout *L, int64_t t, const uint8_t *xi, int64_t ldxi, const int MM,
                        const float *xr, int64_t ldx, float out[4][4]) {
    __m256 tot[2][4];
    for (int i = 0; i < MM; i++)
        for (int r = 0; r < 4; r++) tot[i][r] = _mm256_setzero_ps();
    lq_igroups G;
    igroups_start(&G, L, t);
    const int64_t nsb = lq_nsb(L);
    const uint8_t *q = lq_tile(L, t);
    for (int64_t sb = 0; sb < nsb; sb++, q += 4 * LQ_SB, xi += LQ_XI8_SB_BYTES) {
        igroups_at(&G, L, t, sb);
        prefetch_8bit_superblock(q);
        __m256i ms[2], zs[2]; /* the lane sums of m, lanes j and j + 8 together; -zc times them (symmetric) */
        for (int i = 0; i < MM; i++) {
            ms[i] = _mm256_add_epi32(_mm256_load_si256((const __m256i *)(xi + i * ldxi + 384)),
                                     _mm256_load_si256((const __m256i *)(xi + i * ldxi + 416)));
            zs[i] = _mm256_mullo_epi32(ms[i], _mm256_set1_epi32(G.nz[0]));
        }
        for (int r = 0; r < 4; r++) {
            const uint8_t *qr = q + LQ_SB * r;
            __m256i c[4];
            for (int v = 0; v < 4; v++) c[v] = _mm256_loadu_si256((const __m256i *)(qr + 32 * v));
#ifndef LQ_AVX2_VNNI
            const __m256i nib = _mm256_set1_epi8(0x0F);
            __m256i lo[4], hi[4];
            for (int v = 0; v < 4; v++) {
                lo[v] = _mm256_and_si256(c[v], nib);
                hi[v] = _mm256_and_si256(_mm256_srli_epi16(c[v], 4), nib);
            }
#endif
            for (int i = 0; i < MM; i++) {
                const uint8_t *xb = xi + i * ldxi;
                __m256i T = L->z ? _mm256_mullo_epi32(ms[i], _mm256_set1_epi32(G.nz[r])) : zs[i]; /* -z sum m */
#ifdef LQ_AVX2_VNNI
                for (int v = 0; v < 4; v++)
                    T = _mm256_dpbusd_avx_epi32(T, c[v], _mm256_load_si256((const __m256i *)(xb + 32 * v)));
#else
                __m256i sl = _mm256_maddubs_epi16(lo[0], _mm256_load_si256((const __m256i *)xb));
                __m256i sh = _mm256_maddubs_epi16(hi[0], _mm256_load_si256((const __m256i *)xb));
                for (int v = 1; v < 4; v++) {
                    const __m256i xv = _mm256_load_si256((const __m256i *)(xb + 32 * v));
                    sl = _mm256_add_epi16(sl, _mm256_maddubs_epi16(lo[v], xv));
                    sh = _mm256_add_epi16(sh, _mm256_maddubs_epi16(hi[v], xv));
                }
                T = _mm256_add_epi32(T, _mm256_add_epi32(_mm256_madd_epi16(sl, _mm256_set1_epi16(1)),
                                                         _mm256_madd_epi16(sh, _mm256_set1_epi16(16))));
#endif
                const __m256 ex = _mm256_load_ps((const float *)(xb + 576)); /* = lanes 8..15's */
                tot[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(T), _mm256_mul_ps(ex, _mm256_set1_ps(G.s[r])), tot[i][r]);
            }
        }
    }
    float tails[4][4];
    tails_8bit(L, t, G.gc, xr, ldx, MM, tails);
    for (int i = 0; i < MM; i++)
        for (int r = 0; r < 4; r++) out[i][r] = hsum8(tot[i][r]) + tails[i][r];
}

static void gemv_a8x8_avx2(const lq_layout *L, int64_t t, const uint8_t *xi, int64_t ldxi, int mm, const float *xr,
                           int64_t ldx, float out[4][4]) {
    if (mm == 1)
        gemv_a8x8_k(L, t, xi, ldxi, 1, xr, ldx, out);
    else
        gemv_a8x8_k(L, t, xi, ldxi, 2, xr, ldx, out);
}

#ifndef LQ_AVX2_VNNI /* defined once, by the plain AVX2 build of this file */
void lq_tails_8bit_avx2(const lq_layout *L, int64_t t, lq_gcur gc, const float *xr, int64_t ldx, int mm,
                        float tails[4][4]) {
    tails_8bit(L, t, gc, xr, ldx, mm, tails);
}
#endif

/* INT8 activations (one limb): lanes l and l + 8 share their scale, so each row's two halves are added
 * in int16 (4 x 2 x 15 x 127 < 2^15) and converted once */
INLINE void gemv_a8_k(const lq_layout *L, int64_t t, const uint8_t *xi, int64_t ldxi, const int MM, const int PB,
                      const float *xr, int64_t ldx, float out[4][4]) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t rowb = 16 * PB;
    __m256 tot[2][4];
    for (int i = 0; i < MM; i++)
        for (int r = 0; r < 4; r++) tot[i][r] = _mm256_setzero_ps();
    lq_igroups G;
    igroups_start(&G, L, t);
    const int64_t nsb = lq_nsb(L);
    const uint8_t *q = lq_tile(L, t);
    for (int64_t sb = 0; sb < nsb; sb++, q += 4 * rowb, xi += LQ_XI_SB_BYTES(1)) {
        igroups_at(&G, L, t, sb);
        for (int r = 0; r < 4 * PB / 4; r++) {
            prefetch_line(q + 64 * r);
        }
        __m256i zt[2];
        for (int i = 0; i < MM; i++) { /* sum m over both halves; -z sum m once per row when symmetric */
            const uint8_t *xb = xi + i * ldxi;
            const __m256i msum = _mm256_add_epi32(_mm256_load_si256((const __m256i *)(xb + 128)),
                                                  _mm256_load_si256((const __m256i *)(xb + 160)));
            zt[i] = L->z ? msum : _mm256_mullo_epi32(msum, _mm256_set1_epi32(G.nz[0]));
        }
        for (int r = 0; r < 4; r++) {
            __m256i lo0, hi0, lo1, hi1;
            row_codes(q + rowb * r, PB, &lo0, &hi0, &lo1, &hi1);
            for (int i = 0; i < MM; i++) {
                const uint8_t *xb = xi + i * ldxi;
#ifdef LQ_AVX2_VNNI
                (void)ones;
                __m256i T = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo0, _mm256_load_si256((const __m256i *)xb));
                T = _mm256_dpbusd_avx_epi32(T, hi0, _mm256_load_si256((const __m256i *)(xb + 64)));
                T = _mm256_dpbusd_avx_epi32(T, lo1, _mm256_load_si256((const __m256i *)(xb + 32)));
                T = _mm256_dpbusd_avx_epi32(T, hi1, _mm256_load_si256((const __m256i *)(xb + 96)));
#else
                __m256i s16 = _mm256_maddubs_epi16(lo0, _mm256_load_si256((const __m256i *)xb));
                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi0, _mm256_load_si256((const __m256i *)(xb + 64))));
                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(lo1, _mm256_load_si256((const __m256i *)(xb + 32))));
                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi1, _mm256_load_si256((const __m256i *)(xb + 96))));
                __m256i T = _mm256_madd_epi16(s16, ones);
#endif
                T = _mm256_add_epi32(T, L->z ? _mm256_mullo_epi32(zt[i], _mm256_set1_epi32(G.nz[r])) : zt[i]);
                const __m256 ex = _mm256_load_ps((const float *)(xb + 192)); /* = the other half's */
                tot[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(T), _mm256_mul_ps(ex, _mm256_set1_ps(G.s[r])), tot[i][r]);
            }
        }
    }
    for (int i = 0; i < MM; i++)
        for (int r = 0; r < 4; r++) out[i][r] = hsum8(tot[i][r]) + (lq_tail(L) ? tail_dot(L, t, r, G.gc, xr + i * ldx) : 0.f);
}

/* --- the outer-product GEMM of dynamic INT8 activations (lq_cpu.h: pack_i8, micro_op_i8) ---------- */

static void pack_i8_avx2(const lq_layout *L, int64_t t0, int ntl, int64_t sb0, int64_t nsbc, uint8_t *P) {
    const int rows = ntl * LQ_TILE;
    const __m256i nib = _mm256_set1_epi8(0x0F);
    for (int64_t sb = sb0; sb < sb0 + nsbc; sb++, P += LQ_I8_PANEL_SB) {
        for (int h = 0; h < LQ_NR / 8; h++) {
            __m256 d0[8], d1[8];
            sb_lanes(L, t0, rows, h, sb, d0, d1);
            for (int s = 0; s < 8; s++) {
                const __m256i a = _mm256_castps_si256(d0[s]), b = _mm256_castps_si256(d1[s]);
                uint8_t *st = P + 4 * s * (4 * LQ_NR) + 32 * h;
                _mm256_storeu_si256((__m256i *)st, _mm256_and_si256(a, nib));
                _mm256_storeu_si256((__m256i *)(st + 4 * LQ_NR), _mm256_and_si256(_mm256_srli_epi16(a, 4), nib));
                _mm256_storeu_si256((__m256i *)(st + 8 * LQ_NR), _mm256_and_si256(b, nib));
                _mm256_storeu_si256((__m256i *)(st + 12 * LQ_NR), _mm256_and_si256(_mm256_srli_epi16(b, 4), nib));
            }
        }
        float *sc = (float *)(P + LQ_SB * LQ_NR);
        int32_t *zp = (int32_t *)(sc + LQ_NR);
        lq_gcur gc = lq_gcur_at(L, sb * LQ_SB);
        for (int j = 0; j < LQ_NR; j++) {
            if (j < rows) {
                const int64_t at = ((t0 + j / LQ_TILE) * L->NG + gc.g) * LQ_TILE + j % LQ_TILE;
                sc[j] = _cvtsh_ss(L->s[at]);
                zp[j] = L->z ? L->z[at] : L->zc;
            } else {
                sc[j] = 0.f;
                zp[j] = 0;
            }
        }
    }
}

/* MR rows of x x 8 panel rows (one half of the panel at a time, so that everything stays in registers):
 * per scale lane, 4 steps of vpmaddubsw summed in int16 (4 x 2 x 15 x 127 < 2^15), one vpmaddwd to
 * int32, the zero-point term added exactly, then converted and accumulated with the lane's x scale;
 * at the end of the superblock (its group) times the rows' weight scales. */
#ifdef LQ_AVX2_VNNI /* vpdpbusd sums the four products of a lane straight into int32 */
#define I8_DOT(acc, b, xv) _mm256_dpbusd_avx_epi32(acc, b, xv)
#define I8_WIDEN(a) (a)
#else
#define I8_DOT(acc, b, xv) _mm256_add_epi16(acc, _mm256_maddubs_epi16(b, xv))
#define I8_WIDEN(a) _mm256_madd_epi16(a, ones)
#endif
#define I8_STEP(i)                                                                   \
    if (MR > i) {                                                                    \
        const __m256i xv = _mm256_castps_si256(_mm256_broadcast_ss((const float *)(xi + i * ldxi + off))); \
        a##i = I8_DOT(a##i, b, xv);                                                  \
    }
#define I8_ROW(i)                                                                                   \
    if (MR > i) {                                                                                   \
        const __m256i zt = _mm256_set1_epi32(zs[i * ldzs + s]);                                     \
        __m256i t = I8_WIDEN(a##i);                                                                 \
        t = ASYM ? _mm256_sub_epi32(t, _mm256_mullo_epi32(zv, zt)) : _mm256_add_epi32(t, zt);       \
        const __m256 xs = _mm256_broadcast_ss((const float *)(xi + i * ldxi + 192 + 4 * s));       \
        f##i = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), xs, f##i);                                    \
    }
#define I8_SCALE(i) if (MR > i) c##i = _mm256_fmadd_ps(f##i, ws, c##i);
#define I8_LOAD(i) if (MR > i) c##i = _mm256_loadu_ps(C + i * ldc + 8 * h);
#define I8_STORE(i) if (MR > i) _mm256_storeu_ps(C + i * ldc + 8 * h, c##i);

INLINE void micro_op_i8_k(const uint8_t *xi0, int64_t ldxi, const int32_t *zs0, int64_t ldzs, const uint8_t *P0,
                          int64_t nsbc, const int MR, const int ASYM, float *C, int64_t ldc) {
    const __m256i ones = _mm256_set1_epi16(1);
    (void)ones;
    for (int h = 0; h < LQ_NR / 8; h++) {
        __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0;
        I8_LOAD(0) I8_LOAD(1) I8_LOAD(2)
        const uint8_t *P = P0, *xi = xi0;
        const int32_t *zs = zs0;
        for (int64_t sb = 0; sb < nsbc; sb++, P += LQ_I8_PANEL_SB, xi += LQ_XI_SB_BYTES(1), zs += 8) {
            const float *sc = (const float *)(P + LQ_SB * LQ_NR);
            const __m256i zv = ASYM ? _mm256_loadu_si256((const __m256i *)(sc + LQ_NR + 8 * h)) : ones;
            __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0; /* the superblock's sums, x-scaled */
#pragma GCC unroll 1
            for (int s = 0; s < 8; s++) {
                const uint8_t *st = P + 4 * s * (4 * LQ_NR) + 32 * h;
                __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0;
                for (int u = 0; u < 4; u++) { /* lo[s], hi[s], lo[s + 8], hi[s + 8] */
                    const int off = (u & 1) * 64 + (u >> 1) * 32 + 4 * s;
                    const __m256i b = _mm256_loadu_si256((const __m256i *)(st + u * 4 * LQ_NR));
                    I8_STEP(0) I8_STEP(1) I8_STEP(2)
                }
                I8_ROW(0) I8_ROW(1) I8_ROW(2)
            }
            const __m256 ws = _mm256_loadu_ps(sc + 8 * h); /* times the rows' weight scales */
            I8_SCALE(0) I8_SCALE(1) I8_SCALE(2)
        }
        I8_STORE(0) I8_STORE(1) I8_STORE(2)
    }
}
#undef I8_DOT
#undef I8_WIDEN
#undef I8_STEP
#undef I8_ROW
#undef I8_SCALE
#undef I8_LOAD
#undef I8_STORE

static void micro_op_i8_avx2(const uint8_t *xi, int64_t ldxi, const int32_t *zs, int64_t ldzs, const uint8_t *P,
                             int64_t nsbc, int mr, int asym, float *C, int64_t ldc) {
#define I8_CASE(MR)                                                        \
    case MR:                                                               \
        if (asym) micro_op_i8_k(xi, ldxi, zs, ldzs, P, nsbc, MR, 1, C, ldc); \
        else micro_op_i8_k(xi, ldxi, zs, ldzs, P, nsbc, MR, 0, C, ldc);      \
        break;
    switch (mr) {
    I8_CASE(1)
    I8_CASE(2)
    default: I8_CASE(3)
    }
#undef I8_CASE
}

#define GEMV_I8_PB(PB)                                                \
    do {                                                              \
        if (nlimbs == 3)                                              \
            L->z ? gemv_x3_k(L, t, xi, PB, 1, 3, xr, out)             \
                 : gemv_x3_k(L, t, xi, PB, 0, 3, xr, out);            \
        else if (nlimbs == 2)                                         \
            L->z ? gemv_x3_k(L, t, xi, PB, 1, 2, xr, out)             \
                 : gemv_x3_k(L, t, xi, PB, 0, 2, xr, out);            \
        else if (mm == 2)                                             \
            gemv_a8_k(L, t, xi, ldxi, 2, PB, xr, ldx, out);           \
        else                                                          \
            gemv_a8_k(L, t, xi, ldxi, 1, PB, xr, ldx, out);           \
    } while (0)

static void gemv_i8_avx2(const lq_layout *L, int64_t t, const uint8_t *xi, int64_t ldxi, int mm, int nlimbs,
                         const float *xr, int64_t ldx, float out[4][4]) {
    switch (L->pbits) {
    case 2: GEMV_I8_PB(2); break;
    case 3: GEMV_I8_PB(3); break;
    default: GEMV_I8_PB(4); break;
    }
}
#undef GEMV_I8_PB


#ifndef LQ_AVX2_VNNI /* defined once, by the plain AVX2 build of this file */
/* Packed 2- or 3-bit tile -> 4-bit tile (lq_cpu.h): byte position j of a 4-bit row is lo[j] | hi[j] << 4
 * (row_codes). Also used by the AVX-512 tables (every AVX-512 CPU has AVX2). */
void lq_expand_tile_avx2(const lq_layout *L, int64_t t, uint8_t *out) {
    const int64_t rows = lq_nsb(L) * LQ_TILE, row_bytes = lq_prow_sb_bytes(L);
    const uint8_t *src = lq_tile(L, t);
    for (int64_t i = 0; i < rows; i++) {
        __m256i lo0, hi0, lo1, hi1;
        if (L->pbits == 3)
            row_codes(src + i * row_bytes, 3, &lo0, &hi0, &lo1, &hi1);
        else
            row_codes(src + i * row_bytes, 2, &lo0, &hi0, &lo1, &hi1);
        _mm256_storeu_si256((__m256i *)(out + i * 64), _mm256_or_si256(lo0, _mm256_slli_epi16(hi0, 4)));
        _mm256_storeu_si256((__m256i *)(out + i * 64 + 32), _mm256_or_si256(lo1, _mm256_slli_epi16(hi1, 4)));
    }
    memcpy(out + rows * 64, src + rows * row_bytes, (size_t)(LQ_TILE * lq_tail(L) / 2));
}
#endif /* !LQ_AVX2_VNNI */

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#ifdef LQ_AVX2_VNNI
const lq_kernels lq_kernels_avx2_vnni = {
    "avx2_vnni",
#else
const lq_kernels lq_kernels_avx2 = {
    "avx2",
#endif
    gemv_tile_avx2, dequant_f32_avx2, NULL, micro_f32_avx2, NULL, NULL, prepare_xi_avx2, gemv_i8_avx2, 2, 0,
    lq_expand_tile_avx2, 1, lq_dequant_panel_f32_avx2, micro_op_f32_avx2, pack_i8_avx2, micro_op_i8_avx2, 1,
    gemv_x8_avx2, PREPARE_X8, gemv_a8x8_avx2, lq_prepare_xa8, 2, 1,
};

#endif /* LQ_X86 */
