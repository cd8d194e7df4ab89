/* The decode kernels for AVX-512(F,BW,VL,DQ) (flags in setup.py's ISA_VARIANTS). */
#define GEB_KNAME avx512
#define GEB_VF 512
#define GEB_INT256 1
#define GEB_DPBUSD 0
#define GEB_BF16DP 0
#include "kernels.inc"
