/* Helpers shared by the AVX-512 kernel files (lq_avx512.c, lq_avx512_bf16.c). Include it after the
 * file's target pragma: the functions are always inlined, so each file compiles them for its own
 * instruction set. */
#ifndef LQ_AVX512_INL_H
#define LQ_AVX512_INL_H

#include "lq_x86_inl.h"

/* {sum a, sum b, sum c, sum d} */
INLINE __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* scale and zero point of rows 4t..4t+3 in group g */
INLINE void group_params(const lq_layout *L, int64_t t, int64_t g, float s[4], float z[4]) {
    const int64_t at = (t * L->NG + g) * LQ_TILE;
    for (int r = 0; r < 4; r++) {
        s[r] = _cvtsh_ss(L->s[at + r]);
        z[r] = L->z ? (float)L->z[at + r] : (float)L->zc;
    }
}

/* scale and -zero*scale of rows 4t..4t+3 in group g, as fp32 */
INLINE void group_s_nzs(const lq_layout *L, int64_t t, int64_t g, float s[4], float nzs[4]) {
    const int64_t at = (t * L->NG + g) * LQ_TILE;
    const __m128 s4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(L->s + at)));
    __m128 z4;
    if (L->z) {
        int32_t zz;
        __builtin_memcpy(&zz, L->z + at, 4);
        z4 = _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(zz)));
    } else {
        z4 = _mm_set1_ps((float)L->zc);
    }
    _mm_storeu_ps(s, s4);
    _mm_storeu_ps(nzs, _mm_sub_ps(_mm_setzero_ps(), _mm_mul_ps(z4, s4)));
}

/* tab[r][q] = (q - z) * s: the dequantized value of 4-bit code q in row r, as fma(q, s, -z*s),
 * which rounds once, like the reference (q*s and z*s are exact in fp32). The scalars go through
 * memory so that their broadcasts are loads rather than shuffles, which the lookups need. */
INLINE void tables16(const lq_layout *L, int64_t t, int64_t g, __m512 tab[4]) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    volatile float s[4], nzs[4];
    group_s_nzs(L, t, g, (float *)s, (float *)nzs);
    for (int r = 0; r < 4; r++) tab[r] = _mm512_fmadd_ps(iota, _mm512_set1_ps(s[r]), _mm512_set1_ps(nzs[r]));
}

/* 16 bytes -> 16 uint32 lanes */
INLINE __m512i load16_u8(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }

/* GEMV, the tail blocks (Kp % 128 columns) of tile t: acc[i][r] += x[i] . W[4t + r] over them, for
 * MM (<= 4) rows of x in xr order. gc and tab: the group cursor and its tables16 at the end of the
 * superblocks (both advanced here). */
INLINE void gemv4_tail_f32(const lq_layout *L, int64_t t, const float *x, int64_t ldx, const int MM, lq_gcur *gc,
                           __m512 tab[4], __m512 acc[4][4]) {
    const int64_t nsb = lq_nsb(L), nblk = lq_tail(L) / LQ_BLK;
    for (int64_t p = 0; p < nblk; p++) {
        const int64_t kb = nsb * LQ_SB + 32 * p;
        if (lq_gcur_step(gc, kb)) tables16(L, t, gc->g, tab);
        __m512i D[4];
        for (int r = 0; r < 4; r++) D[r] = load16_u8(lq_tail_row(L, t, r) + 16 * p);
        for (int par = 0; par < 2; par++) {
            __m512 xv[4];
            for (int i = 0; i < MM; i++) xv[i] = _mm512_loadu_ps(x + kb + 16 * par + i * ldx);
            for (int r = 0; r < 4; r++) {
                const __m512 w = _mm512_permutexvar_ps(par ? _mm512_srli_epi32(D[r], 4) : D[r], tab[r]);
                for (int i = 0; i < MM; i++) acc[i][r] = _mm512_fmadd_ps(w, xv[i], acc[i][r]);
            }
        }
    }
}

/* GEMV: prefetch the weight bytes of the 4 rows of a superblock being read lq_pf_l1 bytes ahead into L1
 * and, when lq_pf_l2 > 0, lq_pf_l2 bytes ahead into L2 (lq_api.c; a tile is contiguous, so this runs into
 * the thread's next tile; prefetches past the end of the buffer are harmless). The hardware prefetchers
 * alone left decode from DRAM at 50-60% of the bandwidth when the machine's memory was busy; 1-2 KiB
 * ahead into L1 gave 70-85% (bench/kernels.py, Zen 4). */
INLINE void prefetch_superblock(const uint8_t *q) {
    for (int r = 0; r < 4; r++) prefetch_line(q + 64 * r);
}

#endif
