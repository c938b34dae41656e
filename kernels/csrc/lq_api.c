/* The exported C ABI (loaded with ctypes by llmquant/kernels/cpu_native.py).
 *
 *   lq_abi_version()            bumped whenever an exported signature, struct or the layout changes
 *   lq_detect_isa()             best instruction set this CPU and OS support (LQ_ISA_*)
 *   lq_isa_name(isa)            "scalar", "avx2", "avx2_vnni", "avx512", "avx512_bf16", "neon", "neon_dotprod"
 *   lq_has_vnni()               1 when fp32 decode (M = 1) can use the VNNI GEMV (lq_avx512_vnni.c)
 *   lq_has_avx_vnni()           1 when the CPU has AVX-VNNI (the avx2_vnni table, lq_avx2_vnni.c)
 *   lq_set_openmp(...)          run parallel parts on torch's OpenMP threads (lq_pool.c)
 *   lq_set_prefetch(l1, l2)     the x86 GEMVs' software prefetch distances (lq_get_prefetch reads them)
 *   lq_linear(w, x, ...)        y = x @ W.T + bias, see below
 *   lq_dequantize(w, ...)       W in natural column order (tests and debugging)
 *   lq_hadamard128(x, d, ...)   a rotated layer's input rotation, in place (llmquant/formats/rotation.py)
 *   lq_last_error()             the calling thread's message for its last failed call
 *
 * A layer is described once by an lq_weights struct (Python keeps one per layer, so a call
 * marshals few arguments). Every function checks its scalar arguments and returns LQ_EINVAL with a
 * message naming the sizes; buffer sizes are the caller's promise (the Python wrapper checks them). */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lq_cpu.h"

#if LQ_X86
#include <cpuid.h>
#endif
#if LQ_ARM64 && defined(__linux__)
#include <sys/auxv.h>
#endif

#define LQ_ABI_VERSION 7

/* the least work (multiply-adds) worth a thread: below it, waking one costs more than it saves.
 * Measured on a 2-core VM with the library's own thread pool: in isolation a 640x2048 GEMV runs in
 * 60 us on one thread and 42 us on two, but inside a decode step our worker and torch's spinning
 * OpenMP threads took turns on the cores, and gemma3-270m decoded at 33-35 tok/s with 2**18 against
 * 42-44 tok/s with 2**21 (bench/decode.py, fp32, batch 1, 2 threads). On torch's own OpenMP threads
 * (lq_pool.c, the default since) 2**18 and 2**21 measured alike within the VM's noise. */
#ifndef LQ_MIN_WORK
#define LQ_MIN_WORK (1 << 21)
#endif

/* Software prefetch distances of the x86 GEMVs (AVX2 and AVX-512; lq_cpu.h), bytes. A decode step reads
 * each weight once, from DRAM, so a GEMV that computes at about the speed memory delivers (the exact fp32 decode on AVX2)
 * only reaches the bandwidth when the loads of the next lines are under way while it computes. Measured
 * cold (4096 x 4096 INT4, 2 threads): on AMD Zen 4, 1024-8192 into L1 alone (2048 best), then + 8192 or
 * 16384 into L2: INT8 activations 0.67 -> 0.48 ms, the exact fp32 decode 77 -> 78% of the read bandwidth.
 * On a 2-core Intel Xeon VM (bench/results/prefetch-xeon-2core-{avx2,avx512_bf16}.txt, fp32 / INT8
 * activations), capped at AVX2: no prefetch 798 / 564 us, 2048 into L1 alone 557 / 514, + 16384 into L2
 * 481 / 419, other distances within 3%; AVX-512, which prefetched 2048 into L1 alone until it took these
 * too: 618 / 469, 552 / 499, 396 / 393 us. Not measured on AMD's AVX-512 (bench/prefetch.py).
 * LLMQUANT_CPU_PREFETCH (lq_set_prefetch) tunes a CPU they were not measured on. */
#ifndef LQ_PF_DIST
#define LQ_PF_DIST 2048
#endif
#ifndef LQ_PF2_DIST
#define LQ_PF2_DIST 16384
#endif
int lq_pf_l1 = LQ_PF_DIST, lq_pf_l2 = LQ_PF2_DIST;
#define LQ_PF_MAX (1 << 20)

/* flags of lq_linear */
#define LQ_FLAG_F32_VIA_BF16 1 /* fp32 x may be rounded to bf16 for the GEMM (torch's "medium" precision) */
#define LQ_FLAG_F32_NO_INT 2   /* fp32 x at M = 1: FMA GEMV only, not the integer one (benchmarks, tests) */
#define LQ_FLAG_A8 4           /* dynamic INT8 activations where the layout allows (lq_cpu.h: n = 1, xa8) */

/* One quantized layer in the run-time layout (mirrored by a ctypes.Structure in cpu_native.py). */
typedef struct {
    const uint8_t *q;  /* tiles */
    const uint16_t *s; /* fp16 scales [ntiles][NG][4] */
    const uint8_t *z;  /* uint8 zero points [ntiles][NG][4], NULL when symmetric */
    int64_t N, K, G;   /* G = -1: one group per row */
    int32_t bits;      /* layout code width: 4 or 8 */
    int32_t zc;        /* implicit zero point of a symmetric layer */
} lq_weights;

static __thread char last_error[512];

LQ_API const char *lq_last_error(void) { return last_error; }

LQ_API int lq_abi_version(void) { return LQ_ABI_VERSION; }

#if LQ_X86
static uint64_t xgetbv0(void) {
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((uint64_t)edx << 32) | eax;
}
#endif

/* The CPU's features as LQ_ISA_* | LQ_FEAT_VNNI. cpuid traps to the hypervisor in a VM
 * (microseconds): detected once. */
#define LQ_FEAT_VNNI 0x100 /* AVX512-VNNI, with the AVX-512 of LQ_ISA_AVX512 */
#define LQ_FEAT_AVX_VNNI 0x200 /* AVX-VNNI (vpdpbusd on ymm, VEX), beside AVX2 */
static int detect_uncached(void) {
#if LQ_X86
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return LQ_ISA_SCALAR;
    const int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    if (!(fma && osxsave && avx && f16c)) return LQ_ISA_SCALAR;
    const uint64_t xcr0 = xgetbv0();
    if ((xcr0 & 0x6) != 0x6) return LQ_ISA_SCALAR; /* OS does not save ymm state */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return LQ_ISA_SCALAR;
    const int avx2 = (b >> 5) & 1, f = (b >> 16) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1;
    const int vnni = (c >> 11) & 1 ? LQ_FEAT_VNNI : 0;
    if (!avx2) return LQ_ISA_SCALAR;
    unsigned a1 = 0, b1, c1, d1;
    if (a >= 1) __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1);
    const int avx_vnni = (a1 >> 4) & 1 ? LQ_FEAT_AVX_VNNI : 0;
    if (!(f && bw && vl) || (xcr0 & 0xe6) != 0xe6) /* no AVX-512, or no zmm state */
        return avx_vnni ? LQ_ISA_AVX2_VNNI | avx_vnni : LQ_ISA_AVX2;
    return (((a1 >> 5) & 1) ? LQ_ISA_AVX512_BF16 : LQ_ISA_AVX512) | vnni | avx_vnni;
#elif LQ_ARM64
    /* Advanced SIMD is part of every ARMv8-A Linux ABI; SDOT is optional (HWCAP_ASIMDDP, bit 20) */
#if defined(__linux__)
    const unsigned long hw = getauxval(AT_HWCAP);
    return (hw & (1ul << 20)) ? LQ_ISA_NEON_DOTPROD : LQ_ISA_NEON;
#else
    return LQ_ISA_NEON;
#endif
#else
    return LQ_ISA_SCALAR;
#endif
}

static int cpu_features(void) {
    static _Atomic int cached = -1;
    int v = atomic_load_explicit(&cached, memory_order_relaxed);
    if (v < 0) {
        v = detect_uncached();
        atomic_store_explicit(&cached, v, memory_order_relaxed);
    }
    return v;
}

LQ_API int lq_detect_isa(void) { return cpu_features() & 0xff; }

LQ_API int lq_has_vnni(void) { return (cpu_features() & LQ_FEAT_VNNI) != 0; }

LQ_API int lq_has_avx_vnni(void) { return (cpu_features() & LQ_FEAT_AVX_VNNI) != 0; }

/* The x86 GEMVs' prefetch distances (lq_cpu.h); LQ_EINVAL unless both are multiples of 64 bytes in
 * [0, 2^20]. Not while a call runs. */
LQ_API int lq_set_prefetch(int l1, int l2) {
    if (l1 < 0 || l1 > LQ_PF_MAX || l1 % 64 || l2 < 0 || l2 > LQ_PF_MAX || l2 % 64) {
        snprintf(last_error, sizeof last_error,
                 "L1 and L2 distances must be multiples of 64 bytes in [0, %d], got %d and %d", LQ_PF_MAX, l1, l2);
        return LQ_EINVAL;
    }
    lq_pf_l1 = l1;
    lq_pf_l2 = l2;
    return LQ_OK;
}

/* which = 1: the L1 distance, 2: the L2 one */
LQ_API int lq_get_prefetch(int which) {
    return which == 1 ? lq_pf_l1 : lq_pf_l2;
}

/* position in the family's order (lq_cpu.h) */
static int isa_rank(int isa) {
    switch (isa) {
    case LQ_ISA_AVX2: return 1;
    case LQ_ISA_AVX2_VNNI: return 2;
    case LQ_ISA_AVX512: return 3;
    case LQ_ISA_AVX512_BF16: return 4;
    case LQ_ISA_NEON: return 1;
    case LQ_ISA_NEON_DOTPROD: return 2;
    default: return 0;
    }
}

static const lq_kernels *kernels_for(int isa) {
#if LQ_X86
    switch (isa) {
    case LQ_ISA_AVX512_BF16: return &lq_kernels_avx512_bf16;
    case LQ_ISA_AVX512: return &lq_kernels_avx512;
    case LQ_ISA_AVX2_VNNI: return &lq_kernels_avx2_vnni;
    case LQ_ISA_AVX2: return &lq_kernels_avx2;
    default: break;
    }
#endif
#if LQ_ARM64
    switch (isa) {
    case LQ_ISA_NEON_DOTPROD: return &lq_kernels_neon_dotprod;
    case LQ_ISA_NEON: return &lq_kernels_neon;
    default: break;
    }
#endif
    (void)isa;
    return &lq_kernels_scalar;
}

/* whether isa belongs to this build's family (or is scalar) */
static int isa_here(int isa) {
    if (isa == LQ_ISA_SCALAR) return 1;
#if LQ_X86
    return (isa >= LQ_ISA_AVX2 && isa <= LQ_ISA_AVX512_BF16) || isa == LQ_ISA_AVX2_VNNI;
#elif LQ_ARM64
    return isa == LQ_ISA_NEON || isa == LQ_ISA_NEON_DOTPROD;
#else
    return 0;
#endif
}

LQ_API const char *lq_isa_name(int isa) {
    if (isa < LQ_ISA_SCALAR || isa > LQ_ISA_LAST || !isa_here(isa)) return "unknown";
    return kernels_for(isa)->name;
}

static int fail(const char *msg) {
    snprintf(last_error, sizeof last_error, "%s", msg);
    return LQ_EINVAL;
}

/* Fill a layout from the exported arguments; isa < 0 means "best available". */
static int setup(lq_layout *L, const lq_kernels **kern, const lq_weights *w, int isa) {
    char msg[256];
    if (!w) return fail("the weights struct must not be NULL");
    const int bits = w->bits, zc = w->zc;
    const int64_t N = w->N, K = w->K, G = w->G;
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8) {
        snprintf(msg, sizeof msg, "layout bits must be 2, 3, 4 or 8, got %d", bits);
        return fail(msg);
    }
    if (N < 1 || K < 1) {
        snprintf(msg, sizeof msg, "N=%lld and K=%lld must both be >= 1", (long long)N, (long long)K);
        return fail(msg);
    }
    if (G != -1 && G < 1) {
        snprintf(msg, sizeof msg, "group size G=%lld must be -1 or >= 1", (long long)G);
        return fail(msg);
    }
    if (zc < 0 || zc > 255) {
        snprintf(msg, sizeof msg, "implicit zero point %d is out of [0, 255]", zc);
        return fail(msg);
    }
    if (!w->q || !w->s) return fail("qweight and scales must not be NULL");
    L->q = w->q;
    L->s = w->s;
    L->z = w->z;
    L->N = N;
    L->K = K;
    L->Kp = (K + LQ_BLK - 1) / LQ_BLK * LQ_BLK;
    L->G = (G == -1 || G > K) ? K : G;
    L->NG = (K + L->G - 1) / L->G;
    L->ntiles = (N + LQ_TILE - 1) / LQ_TILE;
    L->bits = bits == 8 ? 8 : 4;
    L->pbits = bits;
    L->qt0 = 0;
    L->zc = zc;
    const int best = lq_detect_isa();
    if (isa >= 0 && !isa_here(isa))
        isa = LQ_ISA_SCALAR; /* a cap from the other family */
    else if (isa < 0 || isa_rank(isa) > isa_rank(best))
        isa = best;
    if (isa == LQ_ISA_AVX2_VNNI && !lq_has_avx_vnni()) isa = LQ_ISA_AVX2; /* an AVX-512 CPU without AVX-VNNI */
    /* the vector kernels switch groups at block (32-column) boundaries only */
    if (L->G % LQ_BLK != 0 && L->NG > 1) isa = LQ_ISA_SCALAR;
    *kern = kernels_for(isa);
    return LQ_OK;
}

typedef struct {
    const lq_problem *p;
    const void *x;
    int x_dtype;
    void *xp;
    _Atomic int status;
    uint8_t *xi;         /* rows for the integer path, or NULL */
    int nlimbs;
    _Atomic int xi_bad;  /* some x was NaN or infinite: the integer path is off for this call */
} lq_job;

static void prep_part(void *arg, int part, int nparts) {
    lq_job *j = (lq_job *)arg;
    const int64_t M = j->p->M, m0 = M * part / nparts, m1 = M * (part + 1) / nparts;
    lq_prepare_x(j->x, j->x_dtype, m0, m1, j->p->L.K, j->p->L.Kp, j->p->mode, j->xp, j->p->ldx);
    if (!j->xi) return;
    const lq_layout *L = &j->p->L;
    const int64_t nsb = lq_nsb(L), row = lq_xi_row_bytes(L, j->nlimbs);
    for (int64_t m = m0; m < m1 && !atomic_load_explicit(&j->xi_bad, memory_order_relaxed); m++) {
        const float *xr = (const float *)j->xp + m * j->p->ldx;
        uint8_t *xi = j->xi + m * row;
        if (!(L->bits != 8       ? j->p->kern->prepare_xi(xr, nsb, j->nlimbs, xi)
              : j->nlimbs == 1 ? j->p->kern->prepare_xa8(xr, nsb, xi)
                               : j->p->kern->prepare_x8(xr, nsb, xi)))
            atomic_store(&j->xi_bad, 1);
    }
}

static void run_part(void *arg, int part, int nparts) {
    lq_job *j = (lq_job *)arg;
    const int64_t nt = j->p->L.ntiles;
    const int rc = lq_run_tiles(j->p, nt * part / nparts, nt * (part + 1) / nparts);
    if (rc != LQ_OK) atomic_store(&j->status, rc);
}

/* y[M][N] = x[M][K] @ W.T + bias.
 * x: fp32 or bf16 (x_dtype LQ_F32 / LQ_BF16), row-major, already gathered by the act-order perm.
 * bias: fp32 [N] or NULL. y: same dtype as x. nthreads: most threads to use (the calling thread is
 * one of them); small problems use fewer. isa: cap (LQ_ISA_*), -1 for the best available.
 * Accumulation is fp32. fp32 x uses exactly dequantized fp32 weights (the reference's); bf16 x on
 * AVX512-BF16 CPUs uses the weights rounded once to bf16 (vdpbf16ps: twice the multiply rate),
 * except an 8-bit layer with M <= 4, and so does fp32 x when flags has LQ_FLAG_F32_VIA_BF16 (x is
 * then rounded to bf16 too), up to M = LQ_GEMV_MAX_M_F32 when the kernels have the outer-product fp32
 * GEMM (faster above). Elsewhere bf16 x is widened to fp32 and computed exactly; at M = 1,
 * exactly enough by integer dot products (gemv_i8 for 2- to 4-bit codes, gemv_x8 for 8-bit ones;
 * lq_avx512_vnni.c, lq_avx2.c; not with LQ_FLAG_F32_NO_INT). */
LQ_API int lq_linear(const lq_weights *w, const void *x, int x_dtype, int64_t M, const float *bias, void *y,
                     int nthreads, int isa, int flags) {
    char msg[256];
    lq_problem p;
    memset(&p, 0, sizeof p);
    const int rc = setup(&p.L, &p.kern, w, isa);
    if (rc != LQ_OK) return rc;
    if (x_dtype != LQ_F32 && x_dtype != LQ_BF16) {
        snprintf(msg, sizeof msg, "x dtype code %d is neither fp32 (0) nor bf16 (1)", x_dtype);
        return fail(msg);
    }
    if (M < 0) {
        snprintf(msg, sizeof msg, "M=%lld must be >= 0", (long long)M);
        return fail(msg);
    }
    if (M == 0) return LQ_OK;
    if (!x || !y) return fail("x and y must not be NULL");
    p.M = M;
    /* bf16 math (weights rounded to bf16, vdpbf16ps) for bf16 x where the CPU has it, except that
     * the bf16 GEMV reads 4-bit layouts only (8-bit ones then take the exact fp32 GEMV) */
    /* ... except past the fp32 GEMV's sizes where the outer-product fp32 GEMM exists: it is faster than
     * the bf16 dot-product GEMM (AVX-512 BF16, 4096 x 4096, M = 128: 17 vs 24 ms) and exact */
    const int op_f32 = p.kern->micro_op_f32 && M > LQ_GEMV_MAX_M_F32;
    const int want_bf16 = (x_dtype == LQ_BF16 || (flags & LQ_FLAG_F32_VIA_BF16)) && p.kern->micro_bf16 && !op_f32;
    const int gemv = M <= LQ_GEMV_MAX_M_BF16;
    p.mode = want_bf16 && (!gemv || (p.kern->gemv_tile_bf16 && p.L.bits == 4)) ? LQ_BF16 : LQ_F32;
    /* x on integer dot products (lq_cpu.h) where the layout allows: 2- to 4-bit codes (read as 4-bit) and
     * 8-bit codes whose groups change at superblock boundaries. Dynamic INT8 activations (LQ_FLAG_A8) at
     * every M; else
     * decode (M = 1) in 24-bit block floating point (fp32 x), or 16-bit (bf16 x, and fp32 x under
     * LQ_FLAG_F32_VIA_BF16, where the kernels take two limbs: lq_cpu.h; at M = 1 faster than the bf16
     * GEMV where measured), unless LQ_FLAG_F32_NO_INT. */
    const int i8_groups = (p.L.NG == 1 || p.L.G % LQ_SB == 0) && lq_nsb(&p.L) > 0 &&
                          (!p.kern->i8_needs_vnni || lq_has_vnni());
    const int a8 = (flags & LQ_FLAG_A8) != 0;
    const int int_path = p.L.bits == 4 && i8_groups && p.kern->gemv_i8 &&
                         (a8 || (M == 1 && !(flags & LQ_FLAG_F32_NO_INT)));
    /* 8-bit layouts: dynamic INT8 activations (W8A8) at every M where the kernels have them; else the
     * exact fp32 decode at M = 1 */
    const int a8x8_path = p.L.bits == 8 && i8_groups && a8 && p.kern->gemv_a8x8 && p.kern->prepare_xa8;
    const int x8_path = !a8x8_path && p.L.bits == 8 && i8_groups && p.kern->gemv_x8 && p.kern->prepare_x8 &&
                        M == 1 && !(flags & LQ_FLAG_F32_NO_INT);
    if (int_path || x8_path || a8x8_path) p.mode = LQ_F32;
    p.bias = bias;
    p.y = y;
    p.y_dtype = x_dtype;
    /* one extra cache line per row: row strides that are multiples of 4 KiB alias in L1 */
    p.ldx = p.L.Kp + (p.mode == LQ_BF16 ? 32 : 16);
    const size_t xbytes = (size_t)M * (size_t)p.ldx * (p.mode == LQ_BF16 ? 2 : 4);
    void *xp = NULL;
    if (posix_memalign(&xp, 64, (xbytes + 63) & ~(size_t)63) != 0) {
        snprintf(last_error, sizeof last_error, "out of memory allocating %zu bytes for x", xbytes);
        return LQ_ENOMEM;
    }
    p.xp = xp;
    /* NaN or infinite x keep the fp32 paths */
    uint8_t *xi = NULL;
    if (int_path || x8_path || a8x8_path) {
        /* bf16 x, or fp32 x whose user allowed bf16 math, needs two limbs, not three (lq_cpu.h) */
        const int bf16_class = x_dtype == LQ_BF16 || (flags & LQ_FLAG_F32_VIA_BF16);
        p.nlimbs = (a8 && int_path) || a8x8_path ? 1 : (int_path && bf16_class && p.kern->i8_limbs2 ? 2 : 3);
        const size_t row = (size_t)lq_xi_row_bytes(&p.L, p.nlimbs);
        if (posix_memalign((void **)&xi, 64, row * (size_t)M) != 0) {
            free(xp);
            snprintf(last_error, sizeof last_error, "out of memory allocating %zu bytes for x", row * (size_t)M);
            return LQ_ENOMEM;
        }
    }
    lq_job job = {&p, x, x_dtype, xp, LQ_OK, xi, p.nlimbs, 0};
    if (nthreads < 1) nthreads = 1;
    /* preparing x is O(M K): worth threads only when it is large */
    const int64_t prep_parts = M * p.L.K >= (1 << 18) ? (nthreads < M ? nthreads : M) : 1;
    lq_parallel((int)prep_parts, prep_part, &job);
    if (xi && !atomic_load(&job.xi_bad)) p.xi = xi;
    /* a thread's share must be worth waking it for: at least LQ_MIN_WORK multiply-adds */
    int64_t parts = (M * p.L.N * p.L.Kp) / LQ_MIN_WORK;
    if (parts > nthreads) parts = nthreads;
    if (parts > p.L.ntiles) parts = p.L.ntiles;
    if (parts < 1) parts = 1;
    lq_parallel((int)parts, run_part, &job);
    free(xi);
    free(xp);
    if (atomic_load(&job.status) != LQ_OK) {
        snprintf(last_error, sizeof last_error, "out of memory for GEMM buffers");
        return LQ_ENOMEM;
    }
    return LQ_OK;
}

/* out[N][K] = the dequantized weight in natural column order, fp32 (out_dtype LQ_F32) or bf16
 * (LQ_BF16, the bf16 kernels' rounding), computed by the given ISA's dequantization kernel. */
LQ_API int lq_dequantize(const lq_weights *w, int out_dtype, void *out, int isa) {
    lq_layout L;
    const lq_kernels *kern;
    const int rc = setup(&L, &kern, w, isa);
    if (rc != LQ_OK) return rc;
    if (!out) return fail("out must not be NULL");
    if (out_dtype == LQ_BF16 && !kern->dequant_bf16) kern = &lq_kernels_scalar;
    const size_t esize = out_dtype == LQ_BF16 ? 2 : 4;
    void *buf = NULL;
    uint8_t *tile = NULL; /* a packed layout's tile, expanded to 4 bits */
    const int packed = L.pbits != L.bits;
    if (posix_memalign(&buf, 64, LQ_TILE * (size_t)L.Kp * esize) != 0 ||
        (packed && posix_memalign((void **)&tile, 64, (size_t)LQ_TILE * L.Kp / 2) != 0)) {
        free(buf);
        snprintf(last_error, sizeof last_error, "out of memory");
        return LQ_ENOMEM;
    }
    const int64_t N = L.N, K = L.K;
    lq_layout E = L; /* what the dequantization kernels read */
    E.pbits = E.bits;
    for (int64_t t = 0; t < L.ntiles; t++) {
        if (packed) {
            kern->expand_tile(&L, t, tile);
            E.q = tile;
            E.qt0 = t;
        }
        for (int64_t k0 = 0; k0 < L.Kp; k0 += LQ_SB) {
            const int64_t kc = L.Kp - k0 < LQ_SB ? L.Kp - k0 : LQ_SB;
            if (out_dtype == LQ_BF16)
                kern->dequant_bf16(&E, t, 1, k0, kc, (uint16_t *)buf + k0, L.Kp);
            else
                kern->dequant_f32(&E, t, 1, k0, kc, (float *)buf + k0, L.Kp);
        }
        for (int r = 0; r < LQ_TILE && t * LQ_TILE + r < N; r++) {
            const int64_t n = t * LQ_TILE + r;
            for (int64_t k = 0; k < K; k++) {
                if (out_dtype == LQ_BF16) {
                    ((uint16_t *)out)[n * K + k] = ((uint16_t *)buf)[r * L.Kp + k];
                } else {
                    const int64_t pos = (k / LQ_BLK) * LQ_BLK + lq_xr_pos((int)(k % LQ_BLK));
                    ((float *)out)[n * K + k] = ((float *)buf)[r * L.Kp + pos];
                }
            }
        }
    }
    free(buf);
    free(tile);
    return LQ_OK;
}

/* one butterfly stage of stride H over a 128-column block (H a constant, so the j loop vectorizes) */
#define LQ_FWHT_STAGE(v, H)                                 \
    for (int i = 0; i < 128; i += 2 * (H))                  \
        for (int j = i; j < i + (H); j++) {                 \
            const float a_ = (v)[j], c_ = (v)[j + (H)];     \
            (v)[j] = a_ + c_;                               \
            (v)[j + (H)] = a_ - c_;                         \
        }

/* v[0..127] <- (v diag(s)) H / sqrt(128): strides 1 and 2 together with the signs (one pass over
 * groups of 4), then strides 4 to 64, then the scale (the additions in the order of the plain loop) */
#if LQ_X86 && defined(__GNUC__) && !defined(__clang__)
/* the same code, compiled for 8 and 16 lanes too; the loader picks by the CPU's features (ifunc) */
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static void fwht128(float *v, const float *s) {
    for (int i = 0; i < 128; i += 4) {
        const float a = v[i] * s[i], b = v[i + 1] * s[i + 1], c = v[i + 2] * s[i + 2], e = v[i + 3] * s[i + 3];
        const float t0 = a + b, t1 = a - b, t2 = c + e, t3 = c - e;
        v[i] = t0 + t2;
        v[i + 1] = t1 + t3;
        v[i + 2] = t0 - t2;
        v[i + 3] = t1 - t3;
    }
    LQ_FWHT_STAGE(v, 4)
    LQ_FWHT_STAGE(v, 8)
    LQ_FWHT_STAGE(v, 16)
    LQ_FWHT_STAGE(v, 32)
    LQ_FWHT_STAGE(v, 64)
    const float scale = 0.088388347648318440f; /* 1/sqrt(128) */
    for (int i = 0; i < 128; i++) v[i] *= scale;
}

/* x[rows][k] <- x diag(d) B in place, B block diagonal with the normalized 128 x 128 Sylvester
 * Hadamard matrix (llmquant/formats/rotation.py): per block of 128, the signs, the fast Walsh-Hadamard
 * butterflies (stride h pairs j, j + h: Sylvester order, and the matrix is symmetric, so x H = (H x^T)^T),
 * then 1/sqrt(128). 7 x 128 additions a block instead of torch's small GEMM, whose call overhead was
 * 15-45 us for one decode row (2-core VM). k a multiple of 128; fp32, rows contiguous. */
LQ_API int lq_hadamard128(float *x, const float *d, int64_t rows, int64_t k) {
    if (!x || !d || rows < 0 || k <= 0 || k % 128 != 0) {
        char msg[160];
        snprintf(msg, sizeof msg, "lq_hadamard128: x and d must not be NULL, rows >= 0 and k a positive multiple "
                 "of 128 (rows %lld, k %lld)", (long long)rows, (long long)k);
        return fail(msg);
    }
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < k; b += 128) fwht128(x + r * k + b, d + b);
    return LQ_OK;
}
