/* geb's native CPU decode core: shared declarations.
 *
 * One decode step (all layers, the final norm and the head, for B sequences) is one call,
 * geb_decode(). Its work is split between a pool of persistent threads (core.c) that meet at a
 * spin-then-yield barrier between ops. The arithmetic lives in kernel tables, one per instruction set
 * (kernels.inc compiled once per ISA: isa_*.c), chosen at run time from cpuid.
 *
 * Every output element is computed by one thread in a fixed order whatever the batch size and the
 * thread count, so a sequence's logits do not depend on which other sequences share its step
 * (batch invariance) nor on --threads.
 */
#ifndef GEB_NATIVE_H
#define GEB_NATIVE_H

#include <stdint.h>

#define GEB_ABI_VERSION 3

/* weight kinds (GebMat.kind) */
enum { GEB_F32 = 0, GEB_BF16 = 1, GEB_Q8 = 2, GEB_Q4 = 3 };

/* A weight matrix y = W x, W [n, k]:
 *   F32:  w float [n, k]           BF16: w uint16 (bf16) [n, k]
 *   Q8:   w int8 [n, k], scale float [n]          (w ~ q * scale[row], symmetric)
 *   Q4:   w uint8 [n, kp/2] in the native layout, s and z bf16 [n, kp/32], kp % 64 == 0:
 *         per 64 inputs of a row 32 bytes, byte i = input i (low nibble) | input 32 + i (high);
 *         w ~ (q - 8) * s + z per group of 32 inputs.
 * bias (optional, float [n]) is added to every output row. */
typedef struct {
  int32_t kind, _pad;
  int64_t n, k, kp;
  const void *w;
  const float *scale;
  const uint16_t *s, *z;
  const float *bias;
} GebMat;

/* Activations of up to m rows prepared for the weight kinds that read them:
 * f (float, row stride ldf), b (bf16, stride ldb; only for ISAs with native BF16 products),
 * q (int8, stride ldq: per group of 32 inputs symmetric absmax/127), d (group scales) and
 * sx (exact float group sums), both stride ldg. */
typedef struct {
  const float *f;
  const uint16_t *b;
  const int8_t *q;
  const float *d, *sx;
  int64_t ldf, ldb, ldq, ldg;
} GebAct;

/* One instruction set's kernels. mm(): y[m, r] (+)= W[r] . x[m] for rows r0..r1 of W and all m rows
 * of x, each weight row read once for all m rows; acc != 0 adds to y (residual). */
typedef struct {
  const char *name;
  int bf16_act;  /* 1: BF16 weights multiply BF16-rounded activations (native BF16 dot products) */
  void (*mm)(const GebMat *w, const GebAct *x, int m, float *y, int64_t ldy, int acc, int64_t r0, int64_t r1);
  void (*quant_q8)(const float *x, int64_t k, int64_t kp, int8_t *q, float *d, float *sx);
  float (*dot)(const float *a, const float *b, int64_t n);
  void (*attn)(const float *q, int grp, const float *kc, const float *vc, int64_t t, int64_t dim,
               float scale, float *scores, float *y);
  void (*dequant)(const GebMat *w, int64_t r0, int64_t r1, float *out); /* rows r0..r1 → float [r1-r0, k] */
  /* MinHash (the data pipeline): best[j] = min(best[j], min over i of r((h[i] * a[j] + b[j]) mod 2^64) & mask),
   * r = mod 2^61 - 1, as datatrove's get_signature computes it */
  void (*minhash)(const uint64_t *h, int64_t n, const uint64_t *a, const uint64_t *b, int64_t k, uint64_t mask,
                  uint64_t *best);
} GebKernels;

void geb_kernels_generic(GebKernels *k);
#if defined(__x86_64__) || defined(_M_X64)
void geb_kernels_avx2(GebKernels *k);
void geb_kernels_avxvnni(GebKernels *k);
void geb_kernels_avx512(GebKernels *k);
void geb_kernels_avx512vnni(GebKernels *k);
void geb_kernels_avx512bf16(GebKernels *k);
#endif

static inline float geb_bf16_to_f32(uint16_t v) {
  union { uint32_t u; float f; } c;
  c.u = (uint32_t)v << 16;
  return c.f;
}

static inline uint16_t geb_f32_to_bf16(float f) { /* round to nearest even, as torch does */
  union { uint32_t u; float f; } c;
  c.f = f;
  if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40); /* NaN stays NaN */
  return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

#endif
