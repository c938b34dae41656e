/* The ISA-independent part of a call: preparing x, and the GEMV / GEMM loop nests that call the
 * per-ISA building blocks (lq_kernels). One call of lq_run_tiles computes every row of x against
 * the output rows of tiles [t_begin, t_end); threads split N by tiles. */
#include <stdlib.h>
#include <string.h>

#include "lq_cpu.h"

/* GEMM blocking: a block of LQ_NCB output rows is dequantized LQ_KC columns at a time into a buffer
 * that stays in L2 (32 rows x 1024 fp32 or 2048 bf16 = 128 KiB), then every block of LQ_MR rows
 * of x is multiplied against it, 4 output rows at a time. */
#ifndef LQ_NCB
#define LQ_NCB 32
#endif
#ifndef LQ_KC_F32
#define LQ_KC_F32 1024
#endif
#ifndef LQ_KC_BF16
#define LQ_KC_BF16 2048
#endif

static void *lq_alloc(size_t bytes) {
    void *p = NULL;
    bytes = (bytes + 63) & ~(size_t)63;
    if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) return NULL;
    return p;
}

void lq_prepare_x(const void *x, int x_dtype, int64_t m_begin, int64_t m_end, int64_t K, int64_t Kp, int mode,
                  void *xp, int64_t ldx) {
    for (int64_t m = m_begin; m < m_end; m++) {
        if (mode == LQ_BF16) {
            uint16_t *dst = (uint16_t *)xp + m * ldx;
            if (x_dtype == LQ_BF16) {
                memcpy(dst, (const uint16_t *)x + m * K, (size_t)K * 2);
            } else {
                const float *src = (const float *)x + m * K;
                for (int64_t k = 0; k < K; k++) dst[k] = lq_f32_to_bf16(src[k]);
            }
            memset(dst + K, 0, (size_t)(Kp - K) * 2);
        } else {
            float *dst = (float *)xp + m * ldx;
            int64_t kb0 = 0;
            if (x_dtype == LQ_F32) { /* whole blocks of fp32 x: a plain loop the compiler vectorizes */
                const float *src = (const float *)x + m * K;
                for (; kb0 + LQ_BLK <= K; kb0 += LQ_BLK)
                    for (int i = 0; i < LQ_BLK / 2; i++) {
                        dst[kb0 + i] = src[kb0 + 2 * i];
                        dst[kb0 + LQ_BLK / 2 + i] = src[kb0 + 2 * i + 1];
                    }
            }
            for (int64_t kb = kb0; kb < Kp; kb += LQ_BLK) {
                for (int i = 0; i < LQ_BLK; i++) {
                    const int64_t k = kb + i;
                    float v = 0.f;
                    if (k < K)
                        v = x_dtype == LQ_BF16 ? lq_bf16_to_f32(((const uint16_t *)x)[m * K + k])
                                               : ((const float *)x)[m * K + k];
                    dst[kb + lq_xr_pos(i)] = v;
                }
            }
        }
    }
}

/* y[m][n0 + r] = c[r] + bias[n0 + r] for r < nn (clipped to N). Branch-free, so that the compiler
 * vectorizes it: a GEMM stores M x N results. */
static void store_rows(const lq_problem *p, int64_t m, int64_t n0, int64_t nn, const float *c) {
    const int64_t N = p->L.N;
    if (nn > N - n0) nn = N - n0;
    const float *b = p->bias ? p->bias + n0 : NULL;
    if (p->y_dtype == LQ_BF16) {
        uint16_t *y = (uint16_t *)p->y + m * N + n0;
        for (int64_t r = 0; r < nn; r++) {
            union { float f; uint32_t u; } v;
            v.f = c[r] + (b ? b[r] : 0.f);
            const uint32_t rounded = (v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16; /* nearest even */
            const uint32_t quiet_nan = (v.u >> 16) | 0x40u;
            y[r] = (uint16_t)((v.u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
        }
    } else {
        float *y = (float *)p->y + m * N + n0;
        if (b)
            for (int64_t r = 0; r < nn; r++) y[r] = c[r] + b[r];
        else
            for (int64_t r = 0; r < nn; r++) y[r] = c[r];
    }
}

/* tiles per block of the integer path: a block's codes (at most about this many bytes) stay in L2
 * while every row of x passes over it */
#ifndef LQ_I8_BLOCK_BYTES
#define LQ_I8_BLOCK_BYTES (256 << 10)
#endif

/* x on integer dot products (p->xi), any M: blocks of tiles, and within a block the rows of x a few
 * at a time against every tile (those rows stay in L1, the block in L2) */
static void run_gemv_i8(const lq_problem *p, int64_t t_begin, int64_t t_end) {
    const lq_layout *L = &p->L;
    float out[4][4];
    if (L->bits == 8 && p->nlimbs == 3) { /* gemv_x8: M = 1 */
        for (int64_t t = t_begin; t < t_end; t++) {
            p->kern->gemv_x8(L, t, p->xi, (const float *)p->xp, out);
            store_rows(p, 0, t * LQ_TILE, LQ_TILE, out[0]);
        }
        return;
    }
    const int64_t xi_row = lq_xi_row_bytes(L, p->nlimbs);
    const int a8x8 = L->bits == 8; /* one limb (W8A8) */
    const int R = a8x8 ? p->kern->a8x8_rows : (p->nlimbs == 1 ? p->kern->i8_rows : 1);
    int64_t tb = LQ_I8_BLOCK_BYTES / lq_tile_bytes(L);
    if (tb < 1) tb = 1;
    for (int64_t t0 = t_begin; t0 < t_end; t0 += tb) {
        const int64_t t1 = t0 + tb < t_end ? t0 + tb : t_end;
        for (int64_t m0 = 0; m0 < p->M; m0 += R) {
            const int mm = p->M - m0 < R ? (int)(p->M - m0) : R;
            for (int64_t t = t0; t < t1; t++) {
                if (a8x8)
                    p->kern->gemv_a8x8(L, t, p->xi + m0 * xi_row, xi_row, mm, (const float *)p->xp + m0 * p->ldx,
                                       p->ldx, out);
                else
                    p->kern->gemv_i8(L, t, p->xi + m0 * xi_row, xi_row, mm, p->nlimbs,
                                     (const float *)p->xp + m0 * p->ldx, p->ldx, out);
                for (int i = 0; i < mm; i++) store_rows(p, m0 + i, t * LQ_TILE, LQ_TILE, out[i]);
            }
        }
    }
}

static void run_gemv(const lq_problem *p, int64_t t_begin, int64_t t_end) {
    const lq_layout *L = &p->L;
    float out[4][4];
    for (int64_t t = t_begin; t < t_end; t++)
        for (int64_t m0 = 0; m0 < p->M; m0 += 4) {
            const int mm = p->M - m0 < 4 ? (int)(p->M - m0) : 4;
            if (p->mode == LQ_BF16)
                p->kern->gemv_tile_bf16(L, t, (const uint16_t *)p->xp + m0 * p->ldx, p->ldx, mm, out);
            else
                p->kern->gemv_tile(L, t, (const float *)p->xp + m0 * p->ldx, p->ldx, mm, out);
            for (int i = 0; i < mm; i++) store_rows(p, m0 + i, t * LQ_TILE, LQ_TILE, out[i]);
        }
}

static int run_gemm(const lq_problem *p, int64_t t_begin, int64_t t_end) {
    const lq_layout *L = &p->L;
    const int64_t M = p->M, Kp = L->Kp;
    const int bf16 = p->mode == LQ_BF16;
    const int64_t KC = bf16 ? LQ_KC_BF16 : LQ_KC_F32;
    /* row strides an odd number of cache lines past a multiple of 4 KiB: rows that alias in L1 evict each other */
    const int64_t ldb = (KC < Kp ? KC : Kp) + (bf16 ? 32 : 16);
    void *buf = lq_alloc((size_t)LQ_NCB * ldb * (bf16 ? 2 : 4));
    float *cblk = (float *)lq_alloc((size_t)M * LQ_NCB * sizeof(float));
    if (!buf || !cblk) {
        free(buf);
        free(cblk);
        return LQ_ENOMEM;
    }
    float out[LQ_MR][4];
    for (int64_t tb = t_begin; tb < t_end; tb += LQ_NCB / LQ_TILE) {
        const int64_t ntl = t_end - tb < LQ_NCB / LQ_TILE ? t_end - tb : LQ_NCB / LQ_TILE;
        for (int64_t k0 = 0; k0 < Kp; k0 += KC) {
            const int64_t kc = Kp - k0 < KC ? Kp - k0 : KC;
            if (bf16)
                p->kern->dequant_bf16(L, tb, ntl, k0, kc, (uint16_t *)buf, ldb);
            else
                p->kern->dequant_f32(L, tb, ntl, k0, kc, (float *)buf, ldb);
            /* rows of x in nmb near-equal blocks of at most LQ_MR (M = 8 runs as 4 + 4, not 6 + 2) */
            const int64_t nmb = (M + LQ_MR - 1) / LQ_MR;
            for (int64_t b = 0; b < nmb; b++) {
                const int64_t m0 = M * b / nmb;
                const int mr = (int)(M * (b + 1) / nmb - m0);
                for (int64_t j = 0; j < ntl; j++) {
                    if (bf16)
                        p->kern->micro_bf16((const uint16_t *)p->xp + m0 * p->ldx + k0, p->ldx,
                                            (const uint16_t *)buf + j * LQ_TILE * ldb, ldb, kc, mr, out);
                    else
                        p->kern->micro_f32((const float *)p->xp + m0 * p->ldx + k0, p->ldx,
                                           (const float *)buf + j * LQ_TILE * ldb, ldb, kc, mr, out);
                    for (int i = 0; i < mr; i++) {
                        float *c = cblk + (m0 + i) * LQ_NCB + j * LQ_TILE;
                        for (int r = 0; r < LQ_TILE; r++) c[r] = (k0 == 0 ? 0.f : c[r]) + out[i][r];
                    }
                }
            }
        }
        for (int64_t m = 0; m < M; m++) store_rows(p, m, tb * LQ_TILE, ntl * LQ_TILE, cblk + m * LQ_NCB);
    }
    free(buf);
    free(cblk);
    return LQ_OK;
}

/* The outer-product fp32 GEMM (kernels with dequant_panel_f32 / micro_op_f32): per block of LQ_NCB_OP
 * output rows and LQ_KC_OP columns, op_np panels of LQ_NR rows at a time are dequantized straight into
 * their packed form (LQ_KC_OP x LQ_NR fp32 = 32 KiB each, in L1/L2) and every block of LQ_MR rows of x
 * is multiplied against them with the register-blocked micro-kernel, accumulating into C
 * ([M][LQ_NCB_OP]). */
#ifndef LQ_KC_OP
#define LQ_KC_OP 512
#endif
#ifndef LQ_NCB_OP
#define LQ_NCB_OP 64
#endif

/* rows [mb, me) of x (fp32, columns [k0, k0 + kc)) times one packed panel P, into (acc) or over C's column
 * block ([me - mb][LQ_NCB_OP], row mb first; C points at the panel's first column); rows in near-equal
 * blocks of <= LQ_MR */
static void op_f32_panel_rows(const lq_problem *p, int64_t mb, int64_t me, const float *P, int64_t k0, int64_t kc,
                              float *C, int acc) {
    const int64_t M = me - mb, nmb = (M + LQ_MR - 1) / LQ_MR;
    for (int64_t b = 0; b < nmb; b++) {
        const int64_t m0 = M * b / nmb;
        const int mr = (int)(M * (b + 1) / nmb - m0);
        p->kern->micro_op_f32((const float *)p->xp + (mb + m0) * p->ldx + k0, p->ldx, P, kc, mr, C + m0 * LQ_NCB_OP,
                              LQ_NCB_OP, acc);
    }
}

static void op_f32_panel(const lq_problem *p, const float *P, int64_t k0, int64_t kc, float *C, int acc) {
    op_f32_panel_rows(p, 0, p->M, P, k0, kc, C, acc);
}

static int run_gemm_op(const lq_problem *p, int64_t t_begin, int64_t t_end) {
    const lq_layout *L = &p->L;
    const int64_t M = p->M, Kp = L->Kp;
    const int64_t KC = LQ_KC_OP < Kp ? LQ_KC_OP : Kp;
    const int np = p->kern->op_np > 1 ? p->kern->op_np : 1; /* panels per micro-kernel call */
    float *pk = (float *)lq_alloc((size_t)np * KC * LQ_NR * sizeof(float));
    float *cblk = (float *)lq_alloc((size_t)M * LQ_NCB_OP * sizeof(float));
    if (!pk || !cblk) {
        free(pk);
        free(cblk);
        return LQ_ENOMEM;
    }
    const int64_t tpp = LQ_NR / LQ_TILE; /* tiles per panel */
    for (int64_t tb = t_begin; tb < t_end; tb += LQ_NCB_OP / LQ_TILE) {
        const int64_t ntl = t_end - tb < LQ_NCB_OP / LQ_TILE ? t_end - tb : LQ_NCB_OP / LQ_TILE;
        for (int64_t k0 = 0; k0 < Kp; k0 += KC) {
            const int64_t kc = Kp - k0 < KC ? Kp - k0 : KC;
            for (int64_t j = 0; j * tpp < ntl; j += np) {
                for (int u = 0; u < np; u++) {
                    const int64_t left = ntl - (j + u) * tpp;
                    const int nt = left < 0 ? 0 : left < tpp ? (int)left : (int)tpp;
                    p->kern->dequant_panel_f32(L, tb + (j + u) * tpp, nt, k0, kc, pk + u * kc * LQ_NR);
                }
                op_f32_panel(p, pk, k0, kc, cblk + j * LQ_NR, k0 > 0);
            }
        }
        for (int64_t m = 0; m < M; m++) store_rows(p, m, tb * LQ_TILE, ntl * LQ_TILE, cblk + m * LQ_NCB_OP);
    }
    free(pk);
    free(cblk);
    return LQ_OK;
}

/* The outer-product GEMM of dynamic INT8 activations (kernels with pack_i8 / micro_op_i8; 4-bit codes
 * read as they are stored): per panel of LQ_NR output rows, LQ_I8_SBC superblocks at a time are packed
 * as bytes (pack_i8, 17 KiB, in L1) and every LQ_I8_MR rows of prepared x multiplied against them;
 * the tail columns (Kp % 128, kept in fp32 by the definition of the INT8 activations) go through the
 * fp32 outer-product kernels. */
#ifndef LQ_I8_SBC
#define LQ_I8_SBC 8
#endif
/* bytes of prepared rows of x one pass of the INT8 GEMM takes at most (they stay in L2 while every weight
 * panel of the thread goes by; each pass packs the panels again). Measured with AVX2 on a 2-core Xeon (2 MiB
 * L2), 4096 x 4096, M = 256 (2 MiB of prepared x): one pass 28.0 ms (each row 15% slower than at M = 128,
 * 1 MiB), passes of 1 MiB 24.7 ms, 512 KiB 26.0, 256 KiB 29.3 (packing again costs) */
#ifndef LQ_I8_X_BYTES
#define LQ_I8_X_BYTES (1 << 20)
#endif
/* rows of x a pass of the INT8 GEMM: M in near-equal passes of at most LQ_I8_X_BYTES, a multiple of LQ_I8_MR */
static int64_t i8_pass_rows(int64_t M, int64_t xi_row) {
    const int64_t npass = (M * xi_row + LQ_I8_X_BYTES - 1) / LQ_I8_X_BYTES;
    const int64_t mc = (M + npass - 1) / npass;
    return (mc + LQ_I8_MR - 1) / LQ_I8_MR * LQ_I8_MR;
}
#ifndef LQ_I8_OP_MIN_M
#define LQ_I8_OP_MIN_M 12 /* measured crossover against run_gemv_i8 (AVX2, 4096 x 4096): between 8 and 12 */
#endif

static int run_gemm_op_i8(const lq_problem *p, int64_t t_begin, int64_t t_end) {
    const lq_layout *L = &p->L;
    const int64_t M = p->M, nsb = lq_nsb(L), tail = lq_tail(L), xi_row = nsb * LQ_XI_SB_BYTES(1), ldzs = nsb * 8;
    const int64_t sbc = nsb < LQ_I8_SBC ? nsb : LQ_I8_SBC, tpp = LQ_NR / LQ_TILE;
    uint8_t *pk = (uint8_t *)lq_alloc((size_t)sbc * LQ_I8_PANEL_SB);
    float *pkf = tail ? (float *)lq_alloc((size_t)tail * LQ_NR * sizeof(float)) : NULL;
    const int64_t mc = i8_pass_rows(M, xi_row);
    float *cblk = (float *)lq_alloc((size_t)(M < mc ? M : mc) * LQ_NCB_OP * sizeof(float));
    int32_t *zs = (int32_t *)lq_alloc((size_t)M * ldzs * sizeof(int32_t));
    if (!pk || (tail && !pkf) || !cblk || !zs) {
        free(pk);
        free(pkf);
        free(cblk);
        free(zs);
        return LQ_ENOMEM;
    }
    /* per row and superblock, the sums of m over each scale lane (code lanes s and s + 8) */
    for (int64_t m = 0; m < M; m++)
        for (int64_t sb = 0; sb < nsb; sb++) {
            const int32_t *ms = (const int32_t *)(p->xi + m * xi_row + sb * LQ_XI_SB_BYTES(1) + 128);
            for (int s = 0; s < 8; s++) /* asymmetric: the sums; symmetric: the term -zc sum m itself */
                zs[m * ldzs + sb * 8 + s] = (ms[s] + ms[s + 8]) * (L->z ? 1 : -L->zc);
        }
    const int asym = L->z != NULL;
    /* rows of x a pass: their prepared rows stay in L2 while every weight panel goes by */
    for (int64_t mb = 0; mb < M; mb += mc) {
        const int64_t me = M - mb < mc ? M : mb + mc;
        for (int64_t tb = t_begin; tb < t_end; tb += LQ_NCB_OP / LQ_TILE) {
            const int64_t ntl = t_end - tb < LQ_NCB_OP / LQ_TILE ? t_end - tb : LQ_NCB_OP / LQ_TILE;
            memset(cblk, 0, (size_t)(me - mb) * LQ_NCB_OP * sizeof(float));
            for (int64_t j = 0; j * tpp < ntl; j++) {
                const int64_t t0 = tb + j * tpp;
                const int nt = ntl - j * tpp < tpp ? (int)(ntl - j * tpp) : (int)tpp;
                for (int64_t sb0 = 0; sb0 < nsb; sb0 += sbc) {
                    const int64_t n = nsb - sb0 < sbc ? nsb - sb0 : sbc;
                    p->kern->pack_i8(L, t0, nt, sb0, n, pk);
                    for (int64_t m0 = mb; m0 < me; m0 += LQ_I8_MR) {
                        const int mr = me - m0 < LQ_I8_MR ? (int)(me - m0) : LQ_I8_MR;
                        p->kern->micro_op_i8(p->xi + m0 * xi_row + sb0 * LQ_XI_SB_BYTES(1), xi_row,
                                             zs + m0 * ldzs + sb0 * 8, ldzs, pk, n, mr, asym,
                                             cblk + (m0 - mb) * LQ_NCB_OP + j * LQ_NR, LQ_NCB_OP);
                    }
                }
                if (tail) {
                    p->kern->dequant_panel_f32(L, t0, nt, nsb * LQ_SB, tail, pkf);
                    op_f32_panel_rows(p, mb, me, pkf, nsb * LQ_SB, tail, cblk + j * LQ_NR, 1);
                }
            }
            for (int64_t m = mb; m < me; m++)
                store_rows(p, m, tb * LQ_TILE, ntl * LQ_TILE, cblk + (m - mb) * LQ_NCB_OP);
        }
    }
    free(pk);
    free(pkf);
    free(cblk);
    free(zs);
    return LQ_OK;
}

/* whether the INT8-activation GEMM (pack_i8 + micro_op_i8) runs this call; it reads 4-bit layouts, so a
 * packed 2- or 3-bit layout is expanded for it even where gemv_i8 reads packed codes */
static int uses_op_i8(const lq_problem *p) {
    return p->xi && p->nlimbs == 1 && p->M >= LQ_I8_OP_MIN_M && p->kern->micro_op_i8 && p->kern->op_np <= 1 &&
           p->L.bits == 4;
}

static int run_direct(const lq_problem *p, int64_t t_begin, int64_t t_end) {
    if (uses_op_i8(p) && p->L.pbits == 4) /* (its tail columns take one fp32 panel a call) */
        return run_gemm_op_i8(p, t_begin, t_end);
    if (p->xi) {
        run_gemv_i8(p, t_begin, t_end);
        return LQ_OK;
    }
    if (p->M <= (p->mode == LQ_BF16 ? LQ_GEMV_MAX_M_BF16 : LQ_GEMV_MAX_M_F32)) {
        run_gemv(p, t_begin, t_end);
        return LQ_OK;
    }
    if (p->mode == LQ_F32 && p->kern->micro_op_f32) return run_gemm_op(p, t_begin, t_end);
    return run_gemm(p, t_begin, t_end);
}

/* 4-bit bytes of expanded tiles per pass over a packed (2- or 3-bit) layout: the GEMV paths read each
 * tile once, so a small buffer that stays in L1; the GEMM works on blocks of LQ_NCB rows */
#ifndef LQ_EXPAND_GEMV_BYTES
#define LQ_EXPAND_GEMV_BYTES (16 << 10)
#endif
#ifndef LQ_EXPAND_GEMM_BYTES
#define LQ_EXPAND_GEMM_BYTES (256 << 10)
#endif

int lq_run_tiles(const lq_problem *p, int64_t t_begin, int64_t t_end) {
    if (t_begin >= t_end) return LQ_OK;
    const int op_i8 = uses_op_i8(p);
    if (p->L.pbits == p->L.bits || (p->xi && p->kern->i8_reads_packed && !op_i8)) return run_direct(p, t_begin, t_end);
    /* a packed layout: expand a few tiles at a time into the 4-bit layout, run the 4-bit kernels on them */
    lq_problem q = *p;
    q.L.pbits = q.L.bits;
    const int64_t tile = lq_tile_bytes(&q.L); /* of an expanded tile */
    const int gemv = !op_i8 && (p->xi || p->M <= (p->mode == LQ_BF16 ? LQ_GEMV_MAX_M_BF16 : LQ_GEMV_MAX_M_F32));
    int64_t chunk = (gemv ? LQ_EXPAND_GEMV_BYTES : LQ_EXPAND_GEMM_BYTES) / tile;
    if (!gemv) chunk = chunk / (LQ_NCB / LQ_TILE) * (LQ_NCB / LQ_TILE);
    if (chunk < (gemv ? 1 : LQ_NCB / LQ_TILE)) chunk = gemv ? 1 : LQ_NCB / LQ_TILE;
    if (chunk > t_end - t_begin) chunk = t_end - t_begin;
    uint8_t *buf = (uint8_t *)lq_alloc((size_t)(chunk * tile));
    if (!buf) return LQ_ENOMEM;
    int rc = LQ_OK;
    for (int64_t t0 = t_begin; t0 < t_end && rc == LQ_OK; t0 += chunk) {
        const int64_t t1 = t0 + chunk < t_end ? t0 + chunk : t_end;
        for (int64_t t = t0; t < t1; t++) p->kern->expand_tile(&p->L, t, buf + (t - t0) * tile);
        q.L.q = buf;
        q.L.qt0 = t0;
        rc = run_direct(&q, t0, t1);
    }
    free(buf);
    return rc;
}
