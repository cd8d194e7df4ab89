/* The decode kernels for portable_C (flags in setup.py's ISA_VARIANTS). */
#define GEB_KNAME generic
#define GEB_VF 0
#define GEB_INT256 0
#define GEB_DPBUSD 0
#define GEB_BF16DP 0
#include "kernels.inc"
