/* AVX-512 VNNI: the GEMV of 4-bit layers on integer dot products, one row of x at a time: fp32
 * activations at M = 1 (three limbs) and dynamic INT8 activations (one limb; lq_cpu.h).
 *
 * Why: the fp32 GEMV (lq_avx512.c) spends a shift, a vpermps and an FMA on every 16 weights, and
 * on Zen 4 the shift and the permute share two pipes: about 27 weights/ns per core with the weights
 * in L1, against 68 for the bf16 GEMV (vdpbf16ps does 32 multiply-adds per instruction), so fp32
 * decode ran at 0.75x the bf16 speed from DRAM. vpdpbusd does 64 u8 x s8 multiply-adds per
 * instruction and the codes need only a mask (and one shift per 128) to become u8.
 *
 * x is carried exactly enough to stay an fp32 computation: the 16 columns of int32 lanes l and l + 8
 * of the dot products (below) get one power-of-two exponent e with max|x| < 2^(e+1), and each
 * x becomes m = round(x * 2^(21 - e)), |m| <= 2^22, split into three signed bytes
 * m = l0 + 2^8 l1 + 2^16 l2 (l0 and l1 in [-128, 127], "balanced"). So each x is represented to
 * within 2^(e - 22) <= 2^-22 max|x| of its 16 columns: the accuracy of an fp32 number when the
 * 16 values are of one magnitude, and never coarser than half an fp32 ulp of their largest; the
 * products (q - z) * m and their sums are exact integers (|sum| < 2^30 per lane and superblock),
 * and there are two roundings per lane and superblock (int32 -> fp32, and the scaled fp32
 * accumulation). In a loop-only test with the weights in L1 (one core) this ran 1.9x the fp32
 * GEMV's rate (51 against 27 weights/ns; the bf16 GEMV: 68).
 *
 * Lanes: the 64 bytes of a superblock row (lq_cpu.h: nibble s of 16-bit word w is column 32 s + w)
 * become two u8 vectors, lo = byte & 15 and hi = (word >> 4) & 15 per byte; byte j of lane l then
 * holds, for lo, the columns 2l, 64 + 2l, 2l + 1, 65 + 2l and, for hi, 32 + 2l, 96 + 2l, 33 + 2l,
 * 97 + 2l. In the fp32 kernels' xr order (evens then odds in every block of 32) those are lane l of
 * the 8 vectors E_c = xr[32 c .. 32 c + 15] and O_c = xr[32 c + 16 .. 32 c + 31], c = 0..3.
 *
 * Only layouts whose groups change at superblock boundaries (G % 128 == 0 or one group) take this
 * path, and only when every x is finite (lq_prepare_xi says so); the rest use the fp32 GEMV. The
 * tail columns (Kp % 128) are done in fp32 as there. */
#include "lq_cpu.h"

#if LQ_X86
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
#endif

#include "lq_avx512_inl.h"

/* the low bytes of a, b, c, d as bytes 0..3 of each lane */
INLINE __m512i pack_bytes(__m512i a, __m512i b, __m512i c, __m512i d) {
    const __m512i lo8 = _mm512_set1_epi32(0xFF);
    const __m512i ab = _mm512_ternarylogic_epi32(_mm512_and_si512(a, lo8), _mm512_slli_epi32(b, 8),
                                                 _mm512_set1_epi32(0xFF00), 0xF8); /* a | (b & m) */
    const __m512i abc = _mm512_ternarylogic_epi32(ab, _mm512_slli_epi32(c, 16), _mm512_set1_epi32(0xFF0000), 0xF8);
    return _mm512_or_si512(abc, _mm512_slli_epi32(d, 24));
}

int lq_prepare_xi_avx512(const float *xr, int64_t nsb, int nlimbs, uint8_t *xi) {
    const __m512i c128 = _mm512_set1_epi32(128);
    const float S = (float)LQ_XI_SHIFT(nlimbs);
    for (int64_t sb = 0; sb < nsb; sb++, xr += LQ_SB, xi += LQ_XI_SB_BYTES(nlimbs)) {
        __m512 v[8]; /* E0 O0 E1 O1 E2 O2 E3 O3 */
        __mmask16 bad = 0;
        __m512 amax = _mm512_setzero_ps();
        for (int c = 0; c < 8; c++) {
            v[c] = _mm512_loadu_ps(xr + 16 * c);
            const __m512i ex = _mm512_set1_epi32(0x7F800000); /* exponent all ones: NaN or infinity */
            bad |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v[c]), ex), ex);
            amax = _mm512_max_ps(amax, _mm512_abs_ps(v[c]));
        }
        if (bad) return 0;
        /* lanes l and l + 8 share their scale (lq_cpu.h) */
        amax = _mm512_max_ps(amax, _mm512_shuffle_f32x4(amax, amax, 0x4E));
        /* e = floor(log2 amax), at least -100 (so 2^(e - 21) stays normal); 0 for an all-zero lane */
        const __mmask16 zero = _mm512_cmp_ps_mask(amax, _mm512_setzero_ps(), _CMP_EQ_OQ);
        __m512 e = _mm512_max_ps(_mm512_getexp_ps(amax), _mm512_set1_ps(-100.f));
        e = _mm512_mask_blend_ps(zero, e, _mm512_setzero_ps());
        const __m512 up = _mm512_sub_ps(_mm512_set1_ps(S), e);
        __m512i m[8], msum = _mm512_setzero_si512();
        for (int c = 0; c < 8; c++) {
            m[c] = _mm512_cvtps_epi32(_mm512_scalef_ps(v[c], up)); /* round to nearest even */
            if (nlimbs == 1) /* int8: |m| <= 128 here; 128 -> 127 */
                m[c] = _mm512_max_epi32(_mm512_min_epi32(m[c], _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
            msum = _mm512_add_epi32(msum, m[c]);
        }
        /* balanced limbs: l0 = m mod 256 (as a signed byte), m1 = (m + 128) >> 8, l1 = m1 mod 256,
         * l2 = (m1 + 128) >> 8; only low bytes are packed, so the l's are just m, m1, m2 */
        __m512i m1[8], m2[8];
        for (int c = 0; c < 8; c++) {
            m1[c] = _mm512_srai_epi32(_mm512_add_epi32(m[c], c128), 8);
            m2[c] = _mm512_srai_epi32(_mm512_add_epi32(m1[c], c128), 8);
        }
        const __m512i *limb[3] = {m, m1, m2};
        for (int p = 0; p < nlimbs; p++) {
            const __m512i *l = limb[p];
            /* lo: E0 E2 O0 O2; hi: E1 E3 O1 O3 */
            _mm512_store_si512(xi + 64 * p, pack_bytes(l[0], l[4], l[1], l[5]));
            _mm512_store_si512(xi + 64 * nlimbs + 64 * p, pack_bytes(l[2], l[6], l[3], l[7]));
        }
        _mm512_store_si512(xi + 128 * nlimbs, msum);
        _mm512_store_ps(xi + 128 * nlimbs + 64, _mm512_scalef_ps(_mm512_set1_ps(1.f), _mm512_sub_ps(e, _mm512_set1_ps(S))));
    }
    return 1;
}

/* lq_prepare_xi8 (NL = 3) and lq_prepare_xa8 (NL = 1; lq_cpu.h) in AVX-512: the same bytes. Vector c
 * of xr (16 values, positions 16 c + i) has lane group 4 (c % 2) + i / 4, so each group's max is one
 * 128-bit lane of the max over even or over odd vectors; the limb lane sums come from vpdpbusd against
 * ones. */
INLINE int prepare_x8_k(const float *xr, int64_t nsb, uint8_t *xi, const int NL) {
    const __m512i c128 = _mm512_set1_epi32(128), ones = _mm512_set1_epi8(1);
    const __m512 S = _mm512_set1_ps(NL == 3 ? 21.f : 6.f);
    const __m512i ex_idx = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
    for (int64_t sb = 0; sb < nsb; sb++, xr += LQ_SB, xi += LQ_XI8_SB_BYTES) {
        __m512 v[8], a[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        __mmask16 bad = 0;
        for (int c = 0; c < 8; c++) {
            v[c] = _mm512_loadu_ps(xr + 16 * c);
            const __m512i ex = _mm512_set1_epi32(0x7F800000);
            bad |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v[c]), ex), ex);
            a[c & 1] = _mm512_max_ps(a[c & 1], _mm512_abs_ps(v[c]));
        }
        if (bad) return 0;
        __m512 e[2];
        for (int h = 0; h < 2; h++) { /* the max over each 128-bit lane, then its exponent (as lq_cpu.h) */
            a[h] = _mm512_max_ps(a[h], _mm512_permute_ps(a[h], 0xB1));
            a[h] = _mm512_max_ps(a[h], _mm512_permute_ps(a[h], 0x4E));
            const __mmask16 zero = _mm512_cmp_ps_mask(a[h], _mm512_setzero_ps(), _CMP_EQ_OQ);
            e[h] = _mm512_max_ps(_mm512_getexp_ps(a[h]), _mm512_set1_ps(-100.f));
            e[h] = _mm512_mask_blend_ps(zero, e[h], _mm512_setzero_ps());
        }
        __m512i l[3][8];
        for (int c = 0; c < 8; c++) {
            __m512i m = _mm512_cvtps_epi32(_mm512_scalef_ps(v[c], _mm512_sub_ps(S, e[c & 1])));
            if (NL == 1) /* int8: |m| <= 128 here; 128 -> 127 */
                m = _mm512_max_epi32(_mm512_min_epi32(m, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
            const __m512i m1 = _mm512_srai_epi32(_mm512_add_epi32(m, c128), 8);
            l[0][c] = m; /* only the low bytes are stored: m mod 256 is the balanced limb 0 */
            l[1][c] = m1;
            l[2][c] = _mm512_srai_epi32(_mm512_add_epi32(m1, c128), 8);
        }
        for (int p = 0; p < NL; p++) {
            for (int c = 0; c < 8; c++) _mm_store_si128((__m128i *)(xi + 128 * p + 16 * c), _mm512_cvtepi32_epi8(l[p][c]));
            const __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones,
                                                                       _mm512_load_si512(xi + 128 * p)),
                                                  ones, _mm512_load_si512(xi + 128 * p + 64));
            _mm512_store_si512(xi + 384 + 64 * p, s);
        }
        const __m512 eg = _mm512_permutex2var_ps(e[0], ex_idx, e[1]); /* lane L: group L % 8 */
        _mm512_store_ps(xi + 576, _mm512_scalef_ps(_mm512_set1_ps(1.f), _mm512_sub_ps(eg, S)));
    }
    return 1;
}

int lq_prepare_xi8_avx512(const float *xr, int64_t nsb, uint8_t *xi) { return prepare_x8_k(xr, nsb, xi, 3); }
int lq_prepare_xa8_avx512(const float *xr, int64_t nsb, uint8_t *xi) { return prepare_x8_k(xr, nsb, xi, 1); }

/* The code bytes of one row of a superblock (p: its first byte) at PB bits a code, as vpdpbusd takes
 * them: lo = nibbles 0 and 2 of each word, hi = nibbles 1 and 3 (as lq_avx2.c's row_codes: byte
 * positions 0..63). A 2-bit row's 32 bytes, put in both halves, need one variable shift (by 0 | 2 for
 * lo, 4 | 6 for hi) and a mask. A 3-bit row (lq_cpu.h): its 32 bytes A in both halves, shifted by
 * 0 | 3 and masked, are lo; hi's upper half is its 16 bytes C shifted by 0 | 3 per 128-bit lane and
 * masked, its lower half A's bits 6-7 and the third bits in C's bits 6 | 7. */
INLINE void row_codes(const uint8_t *p, const int PB, __m512i *lo, __m512i *hi) {
    if (PB == 4) {
        const __m512i nib = _mm512_set1_epi8(0x0F), W = _mm512_loadu_si512(p);
        *lo = _mm512_and_si512(W, nib);
        *hi = _mm512_and_si512(_mm512_srli_epi16(W, 4), nib);
        return;
    }
    const __m512i B = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)p));
    if (PB == 2) {
        const __m512i two = _mm512_set1_epi8(3);
        *lo = _mm512_and_si512(_mm512_srlv_epi32(B, _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2)), two);
        *hi = _mm512_and_si512(_mm512_srlv_epi32(B, _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6)), two);
        return;
    }
    const __m512i C = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(p + 32)));
    *lo = _mm512_and_si512(_mm512_srlv_epi32(B, _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 3, 3, 3, 3, 3, 3, 3, 3)),
                           _mm512_set1_epi8(7));
    const __m512i AC = _mm512_mask_blend_epi64(0xF0, B, C); /* A | C C */
    const __m512i low = _mm512_and_si512(
        _mm512_srlv_epi32(AC, _mm512_setr_epi32(6, 6, 6, 6, 6, 6, 6, 6, 0, 0, 0, 0, 3, 3, 3, 3)),
        _mm512_setr_epi32(0x03030303, 0x03030303, 0x03030303, 0x03030303, 0x03030303, 0x03030303, 0x03030303,
                          0x03030303, 0x07070707, 0x07070707, 0x07070707, 0x07070707, 0x07070707, 0x07070707,
                          0x07070707, 0x07070707));
    const __m512i third = _mm512_srlv_epi32(C, _mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 0, 0, 0, 0, 0, 0, 0, 0));
    *hi = _mm512_ternarylogic_epi32(low, third,
                                    _mm512_setr_epi32(0x04040404, 0x04040404, 0x04040404, 0x04040404, 0x04040404,
                                                      0x04040404, 0x04040404, 0x04040404, 0, 0, 0, 0, 0, 0, 0, 0),
                                    0xF8); /* low | (third & bit 2 in the lower half) */
}

/* MM rows of x against tile t; each W row's codes are unpacked once for all MM rows */
INLINE void gemv_i8_k(const lq_layout *L, int64_t t, const uint8_t *xi, int64_t ldxi, const int MM, const int NL,
                      const int PB, const float *xr, int64_t ldx, float out[4][4]) {
    const int64_t rowb = 16 * PB; /* bytes of a row of a superblock */
    __m512 tot[4][4], acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int r = 0; r < 4; r++) tot[i][r] = acc[i][r] = _mm512_setzero_ps();
    lq_igroups G;
    igroups_start(&G, L, t);
    const int64_t nsb = lq_nsb(L);
    const uint8_t *q = lq_tile(L, t);
    for (int64_t sb = 0; sb < nsb; sb++, q += 4 * rowb, xi += LQ_XI_SB_BYTES(NL)) {
        igroups_at(&G, L, t, sb);
        prefetch_superblock(q);
        /* the zero-point term -z sum m: for a symmetric layer once per row of x, else per row of W */
        __m512i zsym[4];
        for (int i = 0; i < MM; i++) {
            const __m512i msum = _mm512_load_si512(xi + i * ldxi + 128 * NL);
            zsym[i] = L->z ? msum : _mm512_mullo_epi32(msum, _mm512_set1_epi32(G.nz[0]));
        }
        for (int r = 0; r < 4; r++) {
            __m512i lo, hi;
            row_codes(q + rowb * r, PB, &lo, &hi);
            for (int i = 0; i < MM; i++) {
                const uint8_t *xb = xi + i * ldxi;
                const __m512 ex = _mm512_load_ps(xb + 128 * NL + 64);
                /* sum (q - z) m = sum q m - z sum m, exact in int32 */
                __m512i T = L->z ? _mm512_mullo_epi32(zsym[i], _mm512_set1_epi32(G.nz[r])) : zsym[i];
                T = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(T, lo, _mm512_load_si512(xb)), hi,
                                        _mm512_load_si512(xb + 64 * NL));
                if (NL == 3) { /* + 2^8 (limb 1 + 2^8 limb 2); the three limbs' sums are independent chains */
                    const __m512i z = _mm512_setzero_si512();
                    const __m512i a2 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, lo, _mm512_load_si512(xb + 128)), hi,
                                                           _mm512_load_si512(xb + 64 * NL + 128));
                    const __m512i a1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, lo, _mm512_load_si512(xb + 64)), hi,
                                                           _mm512_load_si512(xb + 64 * NL + 64));
                    T = _mm512_add_epi32(T, _mm512_slli_epi32(_mm512_add_epi32(a1, _mm512_slli_epi32(a2, 8)), 8));
                }
                tot[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(T), _mm512_mul_ps(ex, _mm512_set1_ps(G.s[r])), tot[i][r]);
            }
        }
    }
    if (lq_tail(L)) { /* the tail, in fp32 as lq_avx512.c does it */
        __m512 tab[4];
        tables16(L, t, G.gc.g, tab);
        gemv4_tail_f32(L, t, xr, ldx, MM, &G.gc, tab, acc);
    }
    for (int i = 0; i < MM; i++) {
        for (int r = 0; r < 4; r++) tot[i][r] = _mm512_add_ps(tot[i][r], acc[i][r]);
        _mm_storeu_ps(out[i], hsum4(tot[i][0], tot[i][1], tot[i][2], tot[i][3]));
    }
}

/* 8-bit layouts on integer dot products: MM rows of x prepared by lq_prepare_xi8 (NL = 3 limbs: the fp32
 * decode, MM = 1) or by lq_prepare_xa8 (NL = 1: dynamic INT8 activations, W8A8; lq_cpu.h). Per row of W
 * and of x, superblock and limb, the exact int32 lane sums of 2 vpdpbusd on the 128 code bytes as they
 * are stored; the limbs are combined in fp32, (T_2 2^8 + T_1) 2^8 + T_0. */
INLINE void gemv_x8_k(const lq_layout *L, int64_t t, const uint8_t *xi, int64_t ldxi, const int MM, const int NL,
                      const float *xr, int64_t ldx, float out[4][4]) {
    const __m512 c256 = _mm512_set1_ps(256.f);
    __m512 tot[4][4];
    for (int i = 0; i < MM; i++)
        for (int r = 0; r < 4; r++) tot[i][r] = _mm512_setzero_ps();
    lq_igroups G;
    igroups_start(&G, L, t);
    const int64_t nsb = lq_nsb(L);
    const uint8_t *q = lq_tile(L, t);
    for (int64_t sb = 0; sb < nsb; sb++, q += 4 * LQ_SB, xi += LQ_XI8_SB_BYTES) {
        igroups_at(&G, L, t, sb);
        prefetch_superblock(q);
        prefetch_superblock(q + 4 * 64);
        __m512i zs[4][3]; /* -zc times each limb's lane sums (symmetric) */
        for (int i = 0; i < MM; i++)
            for (int p = 0; p < NL; p++)
                zs[i][p] = _mm512_mullo_epi32(_mm512_load_si512(xi + i * ldxi + 384 + 64 * p), _mm512_set1_epi32(G.nz[0]));
        for (int r = 0; r < 4; r++) {
            const __m512i c0 = _mm512_loadu_si512(q + LQ_SB * r), c1 = _mm512_loadu_si512(q + LQ_SB * r + 64);
            for (int i = 0; i < MM; i++) {
                const uint8_t *xb = xi + i * ldxi;
                __m512 f = _mm512_setzero_ps();
                for (int p = NL - 1; p >= 0; p--) {
                    __m512i T = L->z ? _mm512_mullo_epi32(_mm512_load_si512(xb + 384 + 64 * p), _mm512_set1_epi32(G.nz[r]))
                                     : zs[i][p];
                    T = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(T, c0, _mm512_load_si512(xb + 128 * p)), c1,
                                            _mm512_load_si512(xb + 128 * p + 64));
                    f = p == NL - 1 ? _mm512_cvtepi32_ps(T) : _mm512_fmadd_ps(f, c256, _mm512_cvtepi32_ps(T));
                }
                tot[i][r] = _mm512_fmadd_ps(f, _mm512_mul_ps(_mm512_load_ps(xb + 576), _mm512_set1_ps(G.s[r])), tot[i][r]);
            }
        }
    }
    float tails[4][4]; /* the tail columns (Kp % 128, in fp32), as the AVX2 kernel computes them */
    lq_tails_8bit_avx2(L, t, G.gc, xr, ldx, MM, tails);
    for (int i = 0; i < MM; i++)
        for (int r = 0; r < 4; r++) out[i][r] = _mm512_reduce_add_ps(tot[i][r]) + tails[i][r];
}

void lq_gemv_x8_avx512(const lq_layout *L, int64_t t, const uint8_t *xi, const float *xr, float out[4][4]) {
    gemv_x8_k(L, t, xi, 0, 1, 3, xr, 0, out);
}

void lq_gemv_a8x8_avx512(const lq_layout *L, int64_t t, const uint8_t *xi, int64_t ldxi, int mm, const float *xr,
                         int64_t ldx, float out[4][4]) {
    switch (mm) {
    case 1: gemv_x8_k(L, t, xi, ldxi, 1, 1, xr, ldx, out); return;
    case 2: gemv_x8_k(L, t, xi, ldxi, 2, 1, xr, ldx, out); return;
    case 3: gemv_x8_k(L, t, xi, ldxi, 3, 1, xr, ldx, out); return;
    default: gemv_x8_k(L, t, xi, ldxi, 4, 1, xr, ldx, out); return;
    }
}

void lq_gemv_i8_avx512(const lq_layout *L, int64_t t, const uint8_t *xi, int64_t ldxi, int mm, int nlimbs,
                       const float *xr, int64_t ldx, float out[4][4]) {
#define GEMV_I8_PB(PB)                                                         \
    do {                                                                       \
        if (nlimbs == 3) {                                                     \
            gemv_i8_k(L, t, xi, ldxi, 1, 3, PB, xr, ldx, out);                 \
            return;                                                            \
        }                                                                      \
        switch (mm) {                                                          \
        case 1: gemv_i8_k(L, t, xi, ldxi, 1, 1, PB, xr, ldx, out); return;     \
        case 2: gemv_i8_k(L, t, xi, ldxi, 2, 1, PB, xr, ldx, out); return;     \
        case 3: gemv_i8_k(L, t, xi, ldxi, 3, 1, PB, xr, ldx, out); return;     \
        default: gemv_i8_k(L, t, xi, ldxi, 4, 1, PB, xr, ldx, out); return;    \
        }                                                                      \
    } while (0)
    switch (L->pbits) {
    case 2: GEMV_I8_PB(2);
    case 3: GEMV_I8_PB(3);
    default: GEMV_I8_PB(4);
    }
#undef GEMV_I8_PB
}

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#endif /* LQ_X86 */
