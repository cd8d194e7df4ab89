/* The decode kernels for AVX2+FMA+AVX-VNNI (flags in setup.py's ISA_VARIANTS). */
#define GEB_KNAME avxvnni
#define GEB_VF 256
#define GEB_INT256 1
#define GEB_DPBUSD 1
#define GEB_BF16DP 0
#include "kernels.inc"
