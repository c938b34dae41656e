/* Helpers shared by the x86 kernel files (AVX2 and AVX-512). Include it after the file's target
 * pragma: the functions are always inlined, so each file compiles them for its own instruction set. */
#ifndef LQ_X86_INL_H
#define LQ_X86_INL_H

#include <immintrin.h>
#include <string.h>

#include "lq_cpu.h"

#define INLINE static inline __attribute__((always_inline))

/* The integer GEMVs' group parameters of rows 4t..4t+3 in group g: the scales as fp32 into s, and
 * (asymmetric layers) the zero points negated into nz; a symmetric layer's -zc is set once by the
 * caller. Vector loads: with groups of 128 columns this runs once per superblock, and one scalar
 * conversion per row cost about a tenth of the decode time. */
INLINE void group_s_nz4(const lq_layout *L, int64_t t, int64_t g, float s[4], int32_t nz[4]) {
    const int64_t at = (t * L->NG + g) * LQ_TILE;
    _mm_storeu_ps(s, _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(L->s + at))));
    if (L->z) {
        int32_t zz;
        memcpy(&zz, L->z + at, 4);
        _mm_storeu_si128((__m128i *)nz, _mm_sub_epi32(_mm_setzero_si128(), _mm_cvtepu8_epi32(_mm_cvtsi32_si128(zz))));
    }
}

#endif
