/* Helpers shared by the x86 kernel files (AVX2 and AVX-512). Include it after the file's target
 * pragma: the functions are always inlined, so each file compiles them for its own instruction set. */
#ifndef LQ_X86_INL_H
#define LQ_X86_INL_H

#include <immintrin.h>
#include <string.h>

#include "lq_cpu.h"

#define INLINE static inline __attribute__((always_inline))

/* The cache line lq_pf_l1 bytes after p into L1 and, when lq_pf_l2 > 0, the one lq_pf_l2 bytes after it
 * into L2 (lq_cpu.h, lq_api.c); 0 means no such prefetch. The GEMVs (AVX2 and AVX-512) call it for every
 * line of codes they read. */
INLINE void prefetch_line(const uint8_t *p) {
    if (lq_pf_l1) _mm_prefetch((const char *)p + lq_pf_l1, _MM_HINT_T0);
    if (lq_pf_l2) _mm_prefetch((const char *)p + lq_pf_l2, _MM_HINT_T1);
}

/* The integer GEMVs' group parameters of rows 4t..4t+3 in group g: the scales as fp32 into s, and
 * (asymmetric layers) the zero points negated into nz; a symmetric layer's -zc is set once by the
 * caller. Vector loads: with groups of 128 columns this runs once per superblock, where converting
 * a row at a time took about 8% of the AVX2 decode time (codes in L2). */
INLINE void group_s_nz4(const lq_layout *L, int64_t t, int64_t g, float s[4], int32_t nz[4]) {
    const int64_t at = (t * L->NG + g) * LQ_TILE;
    _mm_storeu_ps(s, _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(L->s + at))));
    if (L->z) {
        int32_t zz;
        memcpy(&zz, L->z + at, 4);
        _mm_storeu_si128((__m128i *)nz, _mm_sub_epi32(_mm_setzero_si128(), _mm_cvtepu8_epi32(_mm_cvtsi32_si128(zz))));
    }
}

/* The integer GEMVs' walk over the groups of tile t: the current group's scales s and negated zero
 * points nz (a symmetric layer's -zc throughout), updated where a superblock starts a new group. */
typedef struct {
    lq_gcur gc;
    float s[4];
    int32_t nz[4];
} lq_igroups;

INLINE void igroups_start(lq_igroups *G, const lq_layout *L, int64_t t) {
    G->gc = lq_gcur_at(L, 0);
    for (int r = 0; r < 4; r++) G->nz[r] = -L->zc;
    group_s_nz4(L, t, G->gc.g, G->s, G->nz);
}

INLINE void igroups_at(lq_igroups *G, const lq_layout *L, int64_t t, int64_t sb) {
    if (lq_gcur_step(&G->gc, sb * LQ_SB)) group_s_nz4(L, t, G->gc.g, G->s, G->nz);
}

#endif
