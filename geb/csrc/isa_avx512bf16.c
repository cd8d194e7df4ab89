/* The decode kernels for AVX-512+VNNI+BF16 (flags in setup.py's ISA_VARIANTS). */
#define GEB_KNAME avx512bf16
#define GEB_VF 512
#define GEB_INT256 1
#define GEB_DPBUSD 2
#define GEB_BF16DP 1
#include "kernels.inc"
