/* Decode-time kernels that torch's CPU build lacks; compiled on first use by geb/infer/native.py with
 * the system C compiler (-O3 -march=native) and called through ctypes. Each call is single-threaded
 * over a range of output rows; the caller splits the rows between threads.
 *
 * bf16_matmul_rows: up to 8 BF16 activation rows times a row-major BF16 weight, FP32 accumulation
 * (AVX512-BF16 dot products, 32 per instruction), each weight row read once for all activation rows.
 * int4_matvec: one activation row, quantized to int8 per group of 32, times an int4 weight in geb's
 * VNNI layout (AVX512-VNNI byte products, 64 per instruction), as llama.cpp's Q4_0 x Q8_0.
 * Without AVX512-BF16 and AVX512-VNNI the file compiles to stubs and geb_native_ok() returns 0.
 */
#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512VNNI__)
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
/* int4_matvec: one activation row times an int4 weight, the activation quantized to int8 per group of
 * 32 inputs (scale dx, exact sum sx) and multiplied bytewise with VNNI (64 products per instruction).
 * Weight w = (q - 8) * scale + zero per group of 32 inputs, so per row
 *   y = sum_g scale_g * dx_g * sum(q * xq) + (zero_g - 8 * scale_g) * sx_g.
 * q [N, K/2]: per 64-input chunk c of a row, 32 bytes, byte i holding input 64c+i in its low nibble and
 * 64c+32+i in its high one. s, z [N, K/32] BF16. xq [K/128][2][64] int8: per 128 inputs the 64 that
 * low nibbles meet (64c+0..31 and 64(c+1)+0..31), then the 64 that high nibbles meet. K % 128 == 0. */
void int4_matvec(const uint8_t *q, const uint16_t *s, const uint16_t *z, const int8_t *xq, const float *dx,
                 const float *sx, float *y, int64_t k_len, int64_t r0, int64_t r1) {
  const int64_t G = k_len / 32;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const __m512 eight = _mm512_set1_ps(8.0f);
  /* lanes 0-7 of a product hold the first 32-input group of its 64 bytes, lanes 8-15 the second */
  const __m512i idx_lo = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i idx_hi = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1);
  float sdx[G + 16];
  for (int64_t r = r0; r < r1; r++) {
    const uint16_t *sr = s + r * G, *zr = z + r * G;
    __m512 zacc = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 16 <= G; g += 16) {
      __m512 sv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(sr + g))), 16));
      __m512 zv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(zr + g))), 16));
      _mm512_storeu_ps(sdx + g, _mm512_mul_ps(sv, _mm512_loadu_ps(dx + g)));
      zacc = _mm512_fmadd_ps(_mm512_fnmadd_ps(eight, sv, zv), _mm512_loadu_ps(sx + g), zacc);
    }
    float zsum = _mm512_reduce_add_ps(zacc);
    for (; g < G; g++) {
      float sg = bf16_to_f32(sr[g]), zg = bf16_to_f32(zr[g]);
      sdx[g] = sg * dx[g];
      zsum += (zg - 8.0f * sg) * sx[g];
    }
    const uint8_t *qr = q + r * (k_len / 2);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < k_len / 128; j++) { /* 128 inputs, groups 4j..4j+3 */
      __m512i v = _mm512_loadu_si512(qr + j * 64);
      __m512i lo = _mm512_and_si512(v, nib);
      __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
      __m512i dlo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xq + j * 128));
      __m512i dhi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, _mm512_loadu_si512(xq + j * 128 + 64));
      __m512 sc = _mm512_loadu_ps(sdx + 4 * j);
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dlo), _mm512_permutexvar_ps(idx_lo, sc), acc);
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dhi), _mm512_permutexvar_ps(idx_hi, sc), acc);
    }
    y[r] = _mm512_reduce_add_ps(acc) + zsum;
  }
}
/* The activation side of int4_matvec: x [K] FP32 → xq in its layout, dx (absmax / 127) and exact sums
 * sx per group of 32 inputs. */
void int4_quantize_x(const float *x, int8_t *xq, float *dx, float *sx, int64_t k_len) {
  for (int64_t g = 0; g < k_len / 32; g++) {
    const float *xg = x + g * 32;
    __m512 a = _mm512_loadu_ps(xg), b = _mm512_loadu_ps(xg + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    float d = amax > 1e-12f ? amax / 127.0f : 1e-12f / 127.0f;
    __m512 inv = _mm512_set1_ps(1.0f / d);
    dx[g] = d;
    sx[g] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    /* input i of group g: 128-block j = g / 4; g % 4 = 0, 2 meet low nibbles, 1, 3 high ones */
    int64_t j = g / 4, r = g % 4;
    int8_t *dst = xq + j * 128 + ((r & 1) ? 64 : 0) + ((r & 2) ? 32 : 0);
    __m512i qa = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(a, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m512i qb = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(b, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    _mm_storeu_si128((__m128i *)dst, _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128((__m128i *)(dst + 16), _mm512_cvtsepi32_epi8(qb));
  }
}
#else
int geb_native_ok(void) { return 0; }

void int4_quantize_x(const float *x, int8_t *xq, float *dx, float *sx, int64_t k_len) {
  (void)x; (void)xq; (void)dx; (void)sx; (void)k_len;
}

void int4_matvec(const uint8_t *q, const uint16_t *s, const uint16_t *z, const int8_t *xq, const float *dx,
                 const float *sx, float *y, int64_t k_len, int64_t r0, int64_t r1) {
  (void)q; (void)s; (void)z; (void)xq; (void)dx; (void)sx; (void)y; (void)k_len; (void)r0; (void)r1;
}

int bf16_matmul_rows(const uint16_t *w, const uint16_t *x, float *y, int64_t k_len, int64_t r0, int64_t r1,
                     int64_t n_rows, int64_t y_stride) {
  (void)w; (void)x; (void)y; (void)k_len; (void)r0; (void)r1; (void)n_rows; (void)y_stride;
  return -1;
} /* this CPU/compiler has no AVX512-BF16: torch's kernels serve */

void bf16_matvec(const uint16_t *w, const uint16_t *x, float *y, int64_t k_len, int64_t r0, int64_t r1) {
  (void)w; (void)x; (void)y; (void)k_len; (void)r0; (void)r1;
}
#endif
