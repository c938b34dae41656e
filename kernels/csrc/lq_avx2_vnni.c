/* The AVX2 table for CPUs with AVX-VNNI (vpdpbusd on ymm, VEX-encoded: Intel Alder Lake and later
 * cores, Sierra Forest, AMD Zen 5): lq_avx2.c built again with LQ_AVX2_VNNI (lq_cpu.h, LQ_ISA_AVX2_VNNI). */
#define LQ_AVX2_VNNI 1
#include "lq_avx2.c"
