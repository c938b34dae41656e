/* A command-line driver of the CPU kernel library's C ABI, for testing a build that Python cannot
 * load: the AArch64 library cross-compiled and run under qemu-user (test_aarch64_qemu.py). It is
 * linked statically with the library's sources.
 *
 *   lq_harness CASE...      prints "isa <detected name>", then runs every case file
 *
 * A case file is 16 little-endian int64 (magic, N, K, G, bits, zc, has_z, M, x_dtype, isa, flags,
 * nthreads, nq, ns, has_bias, 0), then the layout's bytes (q: nq bytes, scales: ns fp16, zero points:
 * ns bytes if has_z), x (M x K, fp32 or bf16, already gathered by any act-order perm) and bias
 * (N fp32, if has_bias). It writes CASE.out: int64 rc of lq_linear, y (M x N, x's dtype), int64 rc of
 * lq_dequantize, W (N x K fp32, as the same ISA dequantizes it). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAGIC 0x4C51484E

/* the ABI (kernels/csrc/lq_api.c) */
typedef struct {
    const uint8_t *q;
    const uint16_t *s;
    const uint8_t *z;
    int64_t N, K, G;
    int32_t bits;
    int32_t zc;
} lq_weights;
int lq_linear(const lq_weights *w, const void *x, int x_dtype, int64_t M, const float *bias, void *y, int nthreads,
              int isa, int flags);
int lq_dequantize(const lq_weights *w, int out_dtype, void *out, int isa);
int lq_detect_isa(void);
const char *lq_isa_name(int isa);
const char *lq_last_error(void);

static void *read_n(FILE *f, size_t n, const char *what, const char *path) {
    void *p = malloc(n ? n : 1);
    if (!p || fread(p, 1, n, f) != n) {
        fprintf(stderr, "%s: short read of %s (%zu bytes)\n", path, what, n);
        exit(2);
    }
    return p;
}

static int run_case(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        return 2;
    }
    int64_t h[16];
    if (fread(h, sizeof h, 1, f) != 1 || h[0] != MAGIC) {
        fprintf(stderr, "%s: not a case file\n", path);
        return 2;
    }
    const int64_t N = h[1], K = h[2], G = h[3], M = h[7], nq = h[12], ns = h[13];
    const int bits = (int)h[4], zc = (int)h[5], has_z = (int)h[6], x_dtype = (int)h[8], isa = (int)h[9];
    const int flags = (int)h[10], nthreads = (int)h[11], has_bias = (int)h[14];
    const size_t esize = x_dtype == 1 ? 2 : 4;
    uint8_t *q = read_n(f, (size_t)nq, "q", path);
    uint16_t *s = read_n(f, (size_t)ns * 2, "scales", path);
    uint8_t *z = has_z ? read_n(f, (size_t)ns, "zeros", path) : NULL;
    void *x = read_n(f, (size_t)(M * K) * esize, "x", path);
    float *bias = has_bias ? read_n(f, (size_t)N * 4, "bias", path) : NULL;
    fclose(f);

    lq_weights w = {q, s, z, N, K, G, bits, zc};
    void *y = calloc((size_t)(M * N) + 1, esize);
    float *wf = calloc((size_t)(N * K), sizeof(float));
    const int64_t rc1 = lq_linear(&w, x, x_dtype, M, bias, y, nthreads, isa, flags);
    if (rc1) fprintf(stderr, "%s: lq_linear: %s\n", path, lq_last_error());
    const int64_t rc2 = lq_dequantize(&w, 0, wf, isa);
    if (rc2) fprintf(stderr, "%s: lq_dequantize: %s\n", path, lq_last_error());

    char out[4096];
    snprintf(out, sizeof out, "%s.out", path);
    FILE *o = fopen(out, "wb");
    if (!o || fwrite(&rc1, 8, 1, o) != 1 || fwrite(y, esize, (size_t)(M * N), o) != (size_t)(M * N) ||
        fwrite(&rc2, 8, 1, o) != 1 || fwrite(wf, 4, (size_t)(N * K), o) != (size_t)(N * K) || fclose(o) != 0) {
        perror(out);
        return 2;
    }
    free(q), free(s), free(z), free(x), free(bias), free(y), free(wf);
    return 0;
}

int main(int argc, char **argv) {
    printf("isa %s\n", lq_isa_name(lq_detect_isa()));
    fflush(stdout);
    for (int i = 1; i < argc; i++)
        if (run_case(argv[i])) return 2;
    return 0;
}
