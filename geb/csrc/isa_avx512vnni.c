/* The decode kernels for AVX-512+VNNI (flags in setup.py's ISA_VARIANTS). */
#define GEB_KNAME avx512vnni
#define GEB_VF 512
#define GEB_INT256 1
#define GEB_DPBUSD 2
#define GEB_BF16DP 0
#include "kernels.inc"
