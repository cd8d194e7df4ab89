/* The decode kernels for AVX2+FMA (flags in setup.py's ISA_VARIANTS). */
#define GEB_KNAME avx2
#define GEB_VF 256
#define GEB_INT256 1
#define GEB_DPBUSD 0
#define GEB_BF16DP 0
#include "kernels.inc"
