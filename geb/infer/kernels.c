/* One-row (decode) matrix-vector kernels that torch's CPU build lacks; compiled on first use by
 * geb/infer/native.py with the system C compiler (-O3 -march=native) and called through ctypes.
 *
 * bf16_matvec: y[r] = sum_k W[r,k] * x[k] for rows r0..r1 of a row-major BF16 weight W [N, K] and a
 * BF16 activation x [K], accumulated in FP32 (AVX512-BF16 dot products, 32 products per
 * instruction). The caller splits the rows between threads; each call is single-threaded.
 */
#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

int geb_native_ok(void) { return 1; }

static inline float bf16_to_f32(uint16_t v) {
  union { uint32_t u; float f; } c = { (uint32_t)v << 16 };
  return c.f;
}

void bf16_matvec(const uint16_t *w, const uint16_t *x, float *y, int64_t k_len, int64_t r0, int64_t r1) {
  const int64_t k_vec = k_len - k_len % 32;
  for (int64_t r = r0; r < r1; r++) {
    const uint16_t *row = w + r * k_len;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t k = 0;
    /* two accumulators: consecutive dot products on one register would wait on each other */
    for (; k + 64 <= k_vec; k += 64) {
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(row + k), (__m512bh)_mm512_loadu_si512(x + k));
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(row + k + 32), (__m512bh)_mm512_loadu_si512(x + k + 32));
    }
    for (; k < k_vec; k += 32)
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(row + k), (__m512bh)_mm512_loadu_si512(x + k));
    float acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    for (; k < k_len; k++)
      acc += bf16_to_f32(row[k]) * bf16_to_f32(x[k]);
    y[r] = acc;
  }
}
/* Y[m, r] = sum_k W[r,k] * X[m,k] for m < n_rows (1..8) and rows r0..r1 of W, Y row stride y_stride:
 * each weight chunk is read once for all n_rows activations (batched decode). One function per
 * row count, so the accumulators stay in registers. */
#define GEB_ROWS_KERNEL(MR)                                                                           \
  static void rows_##MR(const uint16_t *w, const uint16_t *x, float *y, int64_t k_len, int64_t r0,    \
                        int64_t r1, int64_t y_stride) {                                               \
    const int64_t k_vec = k_len - k_len % 32;                                                         \
    for (int64_t r = r0; r < r1; r++) {                                                               \
      const uint16_t *row = w + r * k_len;                                                            \
      __m512 acc[MR];                                                                                 \
      for (int m = 0; m < MR; m++) acc[m] = _mm512_setzero_ps();                                      \
      for (int64_t k = 0; k < k_vec; k += 32) {                                                       \
        __m512bh wv = (__m512bh)_mm512_loadu_si512(row + k);                                          \
        for (int m = 0; m < MR; m++)                                                                  \
          acc[m] = _mm512_dpbf16_ps(acc[m], wv, (__m512bh)_mm512_loadu_si512(x + m * k_len + k));     \
      }                                                                                               \
      for (int m = 0; m < MR; m++) {                                                                  \
        float a = _mm512_reduce_add_ps(acc[m]);                                                       \
        for (int64_t k = k_vec; k < k_len; k++) a += bf16_to_f32(row[k]) * bf16_to_f32(x[m * k_len + k]); \
        y[m * y_stride + r] = a;                                                                      \
      }                                                                                               \
    }                                                                                                 \
  }
GEB_ROWS_KERNEL(1) GEB_ROWS_KERNEL(2) GEB_ROWS_KERNEL(3) GEB_ROWS_KERNEL(4)
GEB_ROWS_KERNEL(5) GEB_ROWS_KERNEL(6) GEB_ROWS_KERNEL(7) GEB_ROWS_KERNEL(8)

int bf16_matmul_rows(const uint16_t *w, const uint16_t *x, float *y, int64_t k_len, int64_t r0, int64_t r1,
                     int64_t n_rows, int64_t y_stride) {
  switch (n_rows) {
    case 1: rows_1(w, x, y, k_len, r0, r1, y_stride); return 0;
    case 2: rows_2(w, x, y, k_len, r0, r1, y_stride); return 0;
    case 3: rows_3(w, x, y, k_len, r0, r1, y_stride); return 0;
    case 4: rows_4(w, x, y, k_len, r0, r1, y_stride); return 0;
    case 5: rows_5(w, x, y, k_len, r0, r1, y_stride); return 0;
    case 6: rows_6(w, x, y, k_len, r0, r1, y_stride); return 0;
    case 7: rows_7(w, x, y, k_len, r0, r1, y_stride); return 0;
    case 8: rows_8(w, x, y, k_len, r0, r1, y_stride); return 0;
    default: return -1;
  }
}
#else
int geb_native_ok(void) { return 0; }

int bf16_matmul_rows(const uint16_t *w, const uint16_t *x, float *y, int64_t k_len, int64_t r0, int64_t r1,
                     int64_t n_rows, int64_t y_stride) {
  (void)w; (void)x; (void)y; (void)k_len; (void)r0; (void)r1; (void)n_rows; (void)y_stride;
  return -1;
} /* this CPU/compiler has no AVX512-BF16: torch's kernels serve */

void bf16_matvec(const uint16_t *w, const uint16_t *x, float *y, int64_t k_len, int64_t r0, int64_t r1) {
  (void)w; (void)x; (void)y; (void)k_len; (void)r0; (void)r1;
}
#endif
