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
#include <math.h>
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

/* One row of a q4 matrix against one x (m == 1): per run of 32 columns the 16 bytes are read as two 8-byte halves
 * (no cross-lane shuffles), the four products go to four accumulators, and each group's sum is scaled into a
 * row accumulator with one FMA; one horizontal sum per row (not per group). */
static inline float q4_row_dot(const float* x, const uint8_t* row, const float* scale, const float* offset,
                               const float* xsum, int64_t k, int64_t group) {
  const __m256i mask = _mm256_set1_epi32(0x0F);
  __m256 total = _mm256_setzero_ps();
  float off = 0.f;
  for (int64_t g = 0, c0 = 0; c0 < k; ++g, c0 += group) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int64_t c = c0; c < c0 + group; c += 32) {
      const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(row + c / 2)));      /* bytes 0-7 */
      const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(row + c / 2 + 8)));  /* bytes 8-15 */
      a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b0, mask)), _mm256_loadu_ps(x + c), a0);
      a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b1, mask)), _mm256_loadu_ps(x + c + 8), a1);
      a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4)), _mm256_loadu_ps(x + c + 16), a2);
      a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4)), _mm256_loadu_ps(x + c + 24), a3);
    }
    total = _mm256_fmadd_ps(_mm256_set1_ps(scale[g]), _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)), total);
    off += offset[g] * xsum[g];
  }
  return hsum(total) + off;
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
#if defined(__AVX2__) && defined(__FMA__)
    if (m == 1) {  /* decode of one sequence: q4_row_dot keeps the whole row in vector registers */
      out[j] = total[0] + q4_row_dot(x, row, scale + j * num_groups, offset + j * num_groups, xsum, k, group);
      continue;
    }
#endif
    for (int64_t g = 0; g < num_groups; ++g) {
      float dots[MAX_M];
#if defined(__AVX2__) && defined(__FMA__)
      const __m128i mask = _mm_set1_epi8(0x0F);
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

/* One row of x (m == 1) against a q4 matrix with the activations rounded to int8, as llama.cpp's Q4 x Q8 dot
 * products and onnxruntime's MatMulNBits at accuracy_level 4: x is cut into blocks of 32 columns, each stored as
 * int8 codes xq and one scale d (d = max |x| / 127 over the block), so the products of a block are u8 x s8
 * multiply-adds (vpmaddubsw: 15 * 127 * 2 fits int16) and int16 -> int32 pairwise adds, instead of int -> float
 * conversions and FMAs. y[j] = sum_g scale[j, g] * sum_{b in g} d[b] * (q . xq)_b + offset[j, g] * xsum[g]
 * (+ bias), xsum from the unrounded x. The error is the activation rounding: |x - d * xq| <= d / 2 per column.
 *
 * Two blocks per 256-bit step where the group holds an even number of blocks (group % 64 == 0): the 32 packed
 * bytes of blocks b and b + 1 give, masked, both blocks' low-nibble columns (0-15) in one register and, shifted,
 * their high-nibble columns (16-31) in another; xq is laid out once per call to match (xlo = columns 0-15 of b,
 * then of b + 1; xhi = columns 16-31 of each), so each step is two vpmaddubsw, one int16 add (2 * 3810 fits),
 * one vpmaddwd, one conversion and one FMA against dd = (d[b] x4, d[b + 1] x4), per 32 packed bytes. Group 32
 * (each block its own scale) pairs too, with the two scales in the halves of one vector, and an odd last block
 * alone; other odd numbers of blocks per group (a per-channel K of 96, say) take one block per step. */
static inline __attribute__((unused)) void q8act_quantize(const float* x, int64_t k, int8_t* xq, float* d) {
  for (int64_t b = 0; b < k / 32; ++b) {
    float amax = 0.f;
    for (int64_t c = b * 32; c < b * 32 + 32; ++c) amax = fmaxf(amax, fabsf(x[c]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    d[b] = amax / 127.f;
    for (int64_t c = b * 32; c < b * 32 + 32; ++c) xq[c] = (int8_t)lrintf(x[c] * inv);
  }
}

/* The offset term of row j's output: bias + sum_g offset[j, g] * xsum[g]. */
static inline float q4_row_offset(const float* of, const float* xsum, int64_t num_groups, const float* bias,
                                  int64_t j) {
  float off = bias ? bias[j] : 0.f;
  for (int64_t g = 0; g < num_groups; ++g) off += of[g] * xsum[g];
  return off;
}

#if defined(__AVX2__) && defined(__FMA__)
/* (q . xq) of blocks 2p and 2p + 1 as 8 float partial sums (lanes 0-3: block 2p, 4-7: block 2p + 1), from the
 * row's 32 packed bytes of the pair and the paired activation layout xp. */
static inline __m256 q8act_pair(const uint8_t* row, const int8_t* xp, int64_t p) {
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i bytes = _mm256_loadu_si256((const __m256i*)(row + p * 32));
  const __m256i lo = _mm256_and_si256(bytes, mask), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
  const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i*)(xp + p * 64))),
                                       _mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i*)(xp + p * 64 + 32))));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones));
}

/* (q . xq) of block b alone as 8 float partial sums, from its 16 packed bytes (two 128-bit halves). */
static inline __m256 q8act_block(const uint8_t* row, const int8_t* xq, int64_t b) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i bytes = _mm_loadu_si128((const __m128i*)(row + b * 16));
  const __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  const __m256i w = _mm256_set_m128i(hi, lo);  /* columns 0-15 (low nibbles), 16-31 (high nibbles) */
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w, _mm256_load_si256((const __m256i*)(xq + b * 32))),
                                              _mm256_set1_epi16(1)));
}
#endif

void lmfq_q4_linear_q8act_f32(const float* x, const uint8_t* qw, const float* scale, const float* offset,
                              const float* bias, float* out, int64_t n, int64_t k, int64_t group, int num_threads) {
  const int64_t num_groups = k / group, num_blocks = k / 32, per_group = group / 32;
  int8_t* xq = (int8_t*)aligned_alloc(32, (size_t)((k + 31) / 32 * 32));
  float* d = (float*)malloc(sizeof(float) * num_blocks);
  float* xsum = (float*)malloc(sizeof(float) * num_groups);
  for (int64_t g = 0; g < num_groups; ++g) {
    float s = 0.f;
    for (int64_t c = g * group; c < (g + 1) * group; ++c) s += x[c];
    xsum[g] = s;
  }
  q8act_quantize(x, k, xq, d);
#if defined(__AVX2__) && defined(__FMA__)
  if (per_group % 2 == 0 || per_group == 1) {
    const int64_t num_pairs = num_blocks / 2, pairs_per_group = per_group / 2;
    int8_t* xp = (int8_t*)aligned_alloc(32, (size_t)(num_pairs * 64 + 32));  /* per pair: xlo (32 bytes), xhi */
    float* dd = (float*)aligned_alloc(32, sizeof(float) * (size_t)(num_pairs * 8 + 8));
    for (int64_t p = 0; p < num_pairs; ++p) {
      for (int t = 0; t < 16; ++t) {
        xp[p * 64 + t] = xq[p * 64 + t];                /* block 2p, columns 0-15 */
        xp[p * 64 + 16 + t] = xq[p * 64 + 32 + t];      /* block 2p + 1, columns 0-15 */
        xp[p * 64 + 32 + t] = xq[p * 64 + 16 + t];      /* block 2p, columns 16-31 */
        xp[p * 64 + 48 + t] = xq[p * 64 + 48 + t];      /* block 2p + 1, columns 16-31 */
      }
      for (int t = 0; t < 4; ++t) { dd[p * 8 + t] = d[2 * p]; dd[p * 8 + 4 + t] = d[2 * p + 1]; }
    }
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t j = 0; j < n; ++j) {
      const uint8_t* row = qw + j * (k / 2);
      const float* sc = scale + j * num_groups;
      __m256 t0 = _mm256_setzero_ps(), t1 = t0;  /* two accumulators, alternating */
      if (per_group == 1) {  /* group 32: the two blocks of a pair have their own scales, (s[b] x4, s[b + 1] x4) */
        for (int64_t p = 0; p < num_pairs; ++p) {
          const __m256 sv = _mm256_set_m128(_mm_set1_ps(sc[2 * p + 1]), _mm_set1_ps(sc[2 * p]));
          const __m256 next = _mm256_fmadd_ps(q8act_pair(row, xp, p), _mm256_mul_ps(sv, _mm256_load_ps(dd + p * 8)), t0);
          t0 = t1; t1 = next;
        }
        if (num_blocks % 2) {  /* an odd last block (K = 1376 = 43 x 32): on its own */
          const int64_t b = num_blocks - 1;
          t0 = _mm256_fmadd_ps(q8act_block(row, xq, b), _mm256_set1_ps(sc[b] * d[b]), t0);
        }
      } else {  /* a group of pairs shares one scale: sum its pairs, then scale once */
        for (int64_t g = 0, p = 0; g < num_groups; ++g) {
          __m256 a0 = _mm256_setzero_ps(), a1 = a0;
          for (int64_t e = 0; e < pairs_per_group; ++e, ++p) {
            const __m256 next = _mm256_fmadd_ps(q8act_pair(row, xp, p), _mm256_load_ps(dd + p * 8), a0);
            a0 = a1; a1 = next;
          }
          const __m256 next = _mm256_fmadd_ps(_mm256_set1_ps(sc[g]), _mm256_add_ps(a0, a1), t0);
          t0 = t1; t1 = next;
        }
      }
      out[j] = hsum(_mm256_add_ps(t0, t1)) + q4_row_offset(offset + j * num_groups, xsum, num_groups, bias, j);
    }
    free(xp);
    free(dd);
    free(xq);
    free(d);
    free(xsum);
    return;
  }
#endif
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    const uint8_t* row = qw + j * (k / 2);
    const float* sc = scale + j * num_groups;
    const float off = q4_row_offset(offset + j * num_groups, xsum, num_groups, bias, j);
#if defined(__AVX2__) && defined(__FMA__)
    /* Four accumulators in rotation, so consecutive blocks' FMAs do not wait on each other's latency. */
    __m256 t0 = _mm256_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;
    for (int64_t g = 0, b = 0; g < num_groups; ++g) {
      const float s = sc[g];
      for (int64_t e = 0; e < per_group; ++e, ++b) {
        const __m256 next = _mm256_fmadd_ps(q8act_block(row, xq, b), _mm256_set1_ps(s * d[b]), t0);
        t0 = t1; t1 = t2; t2 = t3; t3 = next;
      }
    }
    out[j] = hsum(_mm256_add_ps(_mm256_add_ps(t0, t1), _mm256_add_ps(t2, t3))) + off;
#else
    float total = 0.f;
    for (int64_t g = 0, b = 0; g < num_groups; ++g) {
      float acc = 0.f;
      for (int64_t e = 0; e < per_group; ++e, ++b) {
        int32_t dot = 0;
        for (int64_t t = 0; t < 16; ++t) {
          const uint8_t byte = row[b * 16 + t];
          dot += (int32_t)(byte & 0x0F) * xq[b * 32 + t] + (int32_t)(byte >> 4) * xq[b * 32 + t + 16];
        }
        acc += d[b] * (float)dot;
      }
      total += sc[g] * acc;
    }
    out[j] = total + off;
#endif
  }
  free(xq);
  free(d);
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
        /* 8-byte loads widened in place: no cross-lane shuffle per 8 weights */
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(row + c)))), _mm256_loadu_ps(x + c), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(row + c + 8)))), _mm256_loadu_ps(x + c + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(row + c + 16)))), _mm256_loadu_ps(x + c + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(row + c + 24)))), _mm256_loadu_ps(x + c + 24), a3);
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

/* NF4 (bitsandbytes 4-bit NormalFloat): W[j, c] = table[q] * absmax[j, b] for blocks b of `block` columns (blocks lie
 * within a row when k % block == 0). The codes use the q4 run layout above (repacked at load). The 16-entry table
 * is looked up in registers: two 8-wide permutes (low 3 bits of the code) and a blend on bit 3. */
#if defined(__AVX2__) && defined(__FMA__)
static inline __m256 nf4_lookup(__m256i idx, __m256 tlo, __m256 thi) {
  const __m256 lo = _mm256_permutevar8x32_ps(tlo, idx), hi = _mm256_permutevar8x32_ps(thi, idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
#endif

void lmfq_nf4_linear_f32(const float* x, const uint8_t* qw, const float* absmax, const float* table,
                         const float* bias, float* out, int64_t m, int64_t n, int64_t k, int64_t block,
                         int num_threads) {
  const int64_t num_blocks = k / block;
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    const uint8_t* row = qw + j * (k / 2);
    const float* amax = absmax + j * num_blocks;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 tlo = _mm256_loadu_ps(table), thi = _mm256_loadu_ps(table + 8);
    const __m256i mask = _mm256_set1_epi32(0x0F);
    __m256 acc[MAX_M];
    for (int64_t i = 0; i < m; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0, c0 = 0; c0 < k; ++b, c0 += block) {
      __m256 part[MAX_M];
      for (int64_t i = 0; i < m; ++i) part[i] = _mm256_setzero_ps();
      for (int64_t c = c0; c < c0 + block; c += 32) {
        const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(row + c / 2)));
        const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(row + c / 2 + 8)));
        const __m256 w0 = nf4_lookup(_mm256_and_si256(b0, mask), tlo, thi);
        const __m256 w1 = nf4_lookup(_mm256_and_si256(b1, mask), tlo, thi);
        const __m256 w2 = nf4_lookup(_mm256_srli_epi32(b0, 4), tlo, thi);
        const __m256 w3 = nf4_lookup(_mm256_srli_epi32(b1, 4), tlo, thi);
        for (int64_t i = 0; i < m; ++i) {
          const float* xp = x + i * k + c;
          part[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), part[i]);
          part[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp + 8), part[i]);
          part[i] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp + 16), part[i]);
          part[i] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp + 24), part[i]);
        }
      }
      const __m256 s = _mm256_set1_ps(amax[b]);
      for (int64_t i = 0; i < m; ++i) acc[i] = _mm256_fmadd_ps(s, part[i], acc[i]);
    }
    for (int64_t i = 0; i < m; ++i) out[i * n + j] = hsum(acc[i]) + (bias ? bias[j] : 0.f);
#else
    for (int64_t i = 0; i < m; ++i) {
      float total = 0.f;
      for (int64_t b = 0, c0 = 0; c0 < k; ++b, c0 += block) {
        float d = 0.f;
        for (int64_t c = c0; c < c0 + block; c += 32)
          for (int64_t t = 0; t < 16; ++t) {
            const uint8_t byte = row[c / 2 + t];
            d += table[byte & 0x0F] * x[i * k + c + t] + table[byte >> 4] * x[i * k + c + t + 16];
          }
        total += amax[b] * d;
      }
      out[i * n + j] = total + (bias ? bias[j] : 0.f);
    }
#endif
  }
}

/* Dequantizers for steps of many rows (prefill, large batches): rows [r0, r1) of W into out ((r1 - r0, k) fp32,
 * row-major), which a GEMM then reads. Each computes exactly what quant/linear.py's torch dequantize() does (a
 * multiply, then an add: no FMA contraction under -std=c11), so both paths give bit-identical weights. The caller
 * dequantizes a tile of rows at a time (TILE_BYTES in quant/kernels) so it stays in cache for the GEMM. */
#if defined(__AVX2__) && defined(__FMA__)
/* The 32 4-bit codes of one run (16 bytes) as four 8-lane vectors: columns 0-7, 8-15, 16-23, 24-31. */
static inline void q4_run_codes(const uint8_t* run, __m256i codes[4]) {
  const __m256i mask = _mm256_set1_epi32(0x0F);
  const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)run));
  const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(run + 8)));
  codes[0] = _mm256_and_si256(b0, mask);
  codes[1] = _mm256_and_si256(b1, mask);
  codes[2] = _mm256_srli_epi32(b0, 4);
  codes[3] = _mm256_srli_epi32(b1, 4);
}
#endif

void lmfq_q4_dequant_f32(const uint8_t* qw, const float* scale, const float* offset, float* out, int64_t r0,
                         int64_t r1, int64_t k, int64_t group, int num_threads) {
  const int64_t num_groups = k / group;
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t j = r0; j < r1; ++j) {
    const uint8_t* row = qw + j * (k / 2);
    float* w = out + (j - r0) * k;
    for (int64_t c = 0; c < k; c += 32) {
      const int64_t g = j * num_groups + c / group;
#if defined(__AVX2__) && defined(__FMA__)
      const __m256 s = _mm256_set1_ps(scale[g]), o = _mm256_set1_ps(offset[g]);
      __m256i codes[4];
      q4_run_codes(row + c / 2, codes);
      for (int t = 0; t < 4; ++t)
        _mm256_storeu_ps(w + c + 8 * t, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(codes[t]), s), o));
#else
      for (int64_t t = 0; t < 16; ++t) {
        const uint8_t byte = row[c / 2 + t];
        w[c + t] = (float)(byte & 0x0F) * scale[g] + offset[g];
        w[c + t + 16] = (float)(byte >> 4) * scale[g] + offset[g];
      }
#endif
    }
  }
}

void lmfq_q8_dequant_f32(const int8_t* qw, const float* scale, const float* corr, float* out, int64_t r0,
                         int64_t r1, int64_t k, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t j = r0; j < r1; ++j) {
    const int8_t* row = qw + j * k;
    float* w = out + (j - r0) * k;
    const float s = scale[j], z = corr ? corr[j] : 0.f;
    int64_t c = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
    for (; c + 8 <= k; c += 8) {
      __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(row + c)))), vs);
      _mm256_storeu_ps(w + c, corr ? _mm256_sub_ps(v, vz) : v);
    }
#endif
    for (; c < k; ++c) w[c] = corr ? (float)row[c] * s - z : (float)row[c] * s;
  }
}

void lmfq_nf4_dequant_f32(const uint8_t* qw, const float* absmax, const float* table, float* out, int64_t r0,
                          int64_t r1, int64_t k, int64_t block, int num_threads) {
  const int64_t num_blocks = k / block;
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t j = r0; j < r1; ++j) {
    const uint8_t* row = qw + j * (k / 2);
    float* w = out + (j - r0) * k;
    for (int64_t c = 0; c < k; c += 32) {
      const float a = absmax[j * num_blocks + c / block];
#if defined(__AVX2__) && defined(__FMA__)
      const __m256 tlo = _mm256_loadu_ps(table), thi = _mm256_loadu_ps(table + 8), s = _mm256_set1_ps(a);
      __m256i codes[4];
      q4_run_codes(row + c / 2, codes);
      for (int t = 0; t < 4; ++t) _mm256_storeu_ps(w + c + 8 * t, _mm256_mul_ps(nf4_lookup(codes[t], tlo, thi), s));
#else
      for (int64_t t = 0; t < 16; ++t) {
        const uint8_t byte = row[c / 2 + t];
        w[c + t] = table[byte & 0x0F] * a;
        w[c + t + 16] = table[byte >> 4] * a;
      }
#endif
    }
  }
}
