/* Weight-only low-bit linears for decode on CPU: y = x W^T with W stored as 4-bit or 8-bit integers.
 *
 * Why our own: on AVX2 CPUs torch 2.13's `_weight_int4pack_mm_for_cpu` and `_weight_int8pack_mm` take
 * 10-20x longer than the fp32 GEMV they replace (measured in quant/README of the report). Decode is a
 * matrix-vector product bound by streaming the weights, so reading 4 or 8 bits per weight instead of 32
 * should win; these kernels stream each packed weight row once for all (few) rows of x.
 *
 * q4 layout: row j of W is k/2 bytes; in each run of 32 columns, byte b (0..15) holds column b in its low
 * nibble and column b + 16 in its high nibble. Each group of `group` columns (a multiple of 32) has a scale
 * and an offset: W[j, c] = q * scale[j, g] + offset[j, g]. So y[i, j] = sum_g scale[j, g] * (q . x)_g +
 * offset[j, g] * (sum of x over g), with the per-group sums of x computed once per call.
 * q8: W[j, c] = q * scale[j] (q signed), minus corr[j] * sum(x) when given (an asymmetric zero).
 */
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
static inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
#endif

#define MAX_M 8

void lmfq_q4_linear_f32(const float* x, const uint8_t* qw, const float* scale, const float* offset,
                        const float* bias, float* out, int64_t m, int64_t n, int64_t k, int64_t group,
                        int num_threads) {
  const int64_t num_groups = k / group;
  float* xsum = (float*)malloc(sizeof(float) * m * num_groups);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t g = 0; g < num_groups; ++g) {
      float s = 0.f;
      for (int64_t c = 0; c < group; ++c) s += x[i * k + g * group + c];
      xsum[i * num_groups + g] = s;
    }
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    const uint8_t* row = qw + j * (k / 2);
    float total[MAX_M];
    for (int64_t i = 0; i < m; ++i) total[i] = bias ? bias[j] : 0.f;
    for (int64_t g = 0; g < num_groups; ++g) {
      float dots[MAX_M];
#if defined(__AVX2__) && defined(__FMA__)
      const __m128i mask = _mm_set1_epi8(0x0F);
      if (m == 1) {  /* decode of one sequence: four independent accumulators kept in registers */
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (int64_t c = g * group; c < (g + 1) * group; c += 32) {
          const __m128i bytes = _mm_loadu_si128((const __m128i*)(row + c / 2));
          const __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
          a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), _mm256_loadu_ps(x + c), a0);
          a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), _mm256_loadu_ps(x + c + 8), a1);
          a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), _mm256_loadu_ps(x + c + 16), a2);
          a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), _mm256_loadu_ps(x + c + 24), a3);
        }
        const float s = scale[j * num_groups + g], o = offset[j * num_groups + g];
        total[0] += s * hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) + o * xsum[g];
        continue;
      }
      __m256 acc[MAX_M];
      for (int64_t i = 0; i < m; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t c = g * group; c < (g + 1) * group; c += 32) {
        const __m128i bytes = _mm_loadu_si128((const __m128i*)(row + c / 2));
        const __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        for (int64_t i = 0; i < m; ++i) {
          const float* xp = x + i * k + c;
          acc[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), acc[i]);
          acc[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp + 8), acc[i]);
          acc[i] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp + 16), acc[i]);
          acc[i] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp + 24), acc[i]);
        }
      }
      for (int64_t i = 0; i < m; ++i) dots[i] = hsum(acc[i]);
#else
      for (int64_t i = 0; i < m; ++i) dots[i] = 0.f;
      for (int64_t c = g * group; c < (g + 1) * group; c += 32)
        for (int64_t b = 0; b < 16; ++b) {
          const uint8_t byte = row[c / 2 + b];
          for (int64_t i = 0; i < m; ++i)
            dots[i] += (float)(byte & 0x0F) * x[i * k + c + b] + (float)(byte >> 4) * x[i * k + c + b + 16];
        }
#endif
      const float s = scale[j * num_groups + g], o = offset[j * num_groups + g];
      for (int64_t i = 0; i < m; ++i) total[i] += s * dots[i] + o * xsum[i * num_groups + g];
    }
    for (int64_t i = 0; i < m; ++i) out[i * n + j] = total[i];
  }
  free(xsum);
}

void lmfq_q8_linear_f32(const float* x, const int8_t* qw, const float* scale, const float* corr,
                        const float* bias, float* out, int64_t m, int64_t n, int64_t k, int num_threads) {
  float xsum[MAX_M];
  for (int64_t i = 0; i < m; ++i) {
    float s = 0.f;
    for (int64_t c = 0; c < k; ++c) s += x[i * k + c];
    xsum[i] = s;
  }
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    const int8_t* row = qw + j * k;
    float dots[MAX_M];
    int64_t c = 0;
#if defined(__AVX2__) && defined(__FMA__)
    if (m == 1) {  /* one sequence: independent accumulators in registers */
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
      for (; c + 32 <= k; c += 32) {
        const __m128i b0 = _mm_loadu_si128((const __m128i*)(row + c));
        const __m128i b1 = _mm_loadu_si128((const __m128i*)(row + c + 16));
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b0)), _mm256_loadu_ps(x + c), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b0, 8))), _mm256_loadu_ps(x + c + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b1)), _mm256_loadu_ps(x + c + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b1, 8))), _mm256_loadu_ps(x + c + 24), a3);
      }
      float d = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      for (; c < k; ++c) d += (float)row[c] * x[c];
      out[j] = scale[j] * d - (corr ? corr[j] * xsum[0] : 0.f) + (bias ? bias[j] : 0.f);
      continue;
    }
    __m256 acc[MAX_M];
    for (int64_t i = 0; i < m; ++i) acc[i] = _mm256_setzero_ps();
    for (; c + 16 <= k; c += 16) {
      const __m128i bytes = _mm_loadu_si128((const __m128i*)(row + c));
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)));
      for (int64_t i = 0; i < m; ++i) {
        acc[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i * k + c), acc[i]);
        acc[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i * k + c + 8), acc[i]);
      }
    }
    for (int64_t i = 0; i < m; ++i) dots[i] = hsum(acc[i]);
#else
    for (int64_t i = 0; i < m; ++i) dots[i] = 0.f;
#endif
    for (; c < k; ++c)
      for (int64_t i = 0; i < m; ++i) dots[i] += (float)row[c] * x[i * k + c];
    for (int64_t i = 0; i < m; ++i)
      out[i * n + j] = scale[j] * dots[i] - (corr ? corr[j] * xsum[i] : 0.f) + (bias ? bias[j] : 0.f);
  }
}
