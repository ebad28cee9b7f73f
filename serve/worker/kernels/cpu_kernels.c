/* lmforge's CPU kernels: plain C + OpenMP, built on first use by serve/worker/kernels/__init__.py and
 * called through ctypes with raw pointers (no torch headers: it compiles in about a second).
 *
 * Why they exist (measured in docs/BENCHMARKS.md): on a CPU, eager PyTorch pays twice where an engine need not.
 *  - Decode attention over a paged cache had to copy every sequence's blocks into one padded tensor
 *    (index_select) before scaled_dot_product_attention read them again: K/V crossed memory three times.
 *    `lmf_paged_attention_f32` reads each K and V row once, in place, through the block table
 *    (PagedAttention, Kwon et al. 2023, sec. 4.1; the CPU analogue of vLLM's paged_attention_v1).
 *    Scores of 8 keys come out of one reduction, the softmax exponent is vectorized (a scalar expf per
 *    score was ~20% of the kernel), and each head's output stays in registers across its values.
 *  - A linear layer over a handful of rows (single-stream decode, speculative verification) is a
 *    matrix-vector product bound by streaming the weights; `lmf_linear_small_m_f32` streams each weight
 *    row once for all rows of x, in 4-column x 3-row register tiles so that at 3-8 rows (verification of
 *    k drafts) the FMA units rather than the loads set the pace (+45-60% at 5 rows, 1 thread).
 * Everything is fp32, every tensor contiguous; the Python side checks that before calling.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

static inline float dot_f32(const float* a, const float* b, int64_t n) {
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
         acc3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  __m256 acc = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
  __m128 lo = _mm256_castps256_ps128(acc), hi = _mm256_extractf128_ps(acc, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  float s = _mm_cvtss_f32(lo);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
#else
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
#endif
}


#if defined(__AVX2__) && defined(__FMA__)
/* e^x for 8 lanes, x <= 0 (softmax after max subtraction): 2^n * e^r with n = round(x / ln 2), r = x - n ln 2
 * split in two constants (Cody-Waite), e^r by a degree-6 Taylor/minimax polynomial: relative error ~2 ulp.
 * Below -87 the result is clamped to e^-87 (~1.6e-38), which no softmax sum notices. */
static inline __m256 exp_neg_ps(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

/* sh[p] = exp(sh[p] - m) for p < n; returns the sum. */
static inline float exp_sub_sum_f32(float* sh, int64_t n, float m) {
  float sum = 0.f;
  int64_t p = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  for (; p + 8 <= n; p += 8) {
    const __m256 e = exp_neg_ps(_mm256_sub_ps(_mm256_loadu_ps(sh + p), mv));
    _mm256_storeu_ps(sh + p, e);
    acc = _mm256_add_ps(acc, e);
  }
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  sum = _mm_cvtss_f32(lo);
#endif
  for (; p < n; ++p) { sh[p] = expf(sh[p] - m); sum += sh[p]; }
  return sum;
}

/* out[d] += w * v[d] */
static inline void axpy_f32(float* out, float w, const float* v, int64_t n) {
#if defined(__AVX2__) && defined(__FMA__)
  __m256 wv = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(out + i)));
  for (; i < n; ++i) out[i] += w * v[i];
#else
  for (int64_t i = 0; i < n; ++i) out[i] += w * v[i];
#endif
}


#if defined(__AVX2__) && defined(__FMA__)
/* The 8 sums of 8 vectors, as one vector: lane j = sum of a[j]'s lanes. */
static inline __m256 hsum8_ps(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  /* u0 = [s0 s1 s2 s3 | s0' s1' s2' s3'] (low and high 128-bit halves' partial sums), u1 likewise for 4..7 */
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

/* scores[i] = dot(qh, krows + i * stride) * scale for i < n: one query head against n cached keys. */
static inline void qk_scores_f32(const float* qh, const float* krows, int64_t stride, int64_t n, int64_t head_dim,
                                 float scale, float* scores) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if (head_dim % 8 == 0) {
    const __m256 sv = _mm256_set1_ps(scale);
    for (; i + 8 <= n; i += 8) {  /* 8 keys at once: one q load feeds 8 FMAs, one reduction for all 8 */
      __m256 acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
      const float* k0 = krows + i * stride;
      for (int64_t d = 0; d < head_dim; d += 8) {
        const __m256 qv = _mm256_loadu_ps(qh + d);
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + j * stride + d), acc[j]);
      }
      _mm256_storeu_ps(scores + i, _mm256_mul_ps(hsum8_ps(acc), sv));
    }
  }
#endif
  for (; i < n; ++i) scores[i] = dot_f32(qh, krows + i * stride, head_dim) * scale;
}

/* oh[d] += sum_i w[i] * vrows[i * stride + d]: one query head's weighted sum of n cached values. The output
 * stays in registers across all n rows (64 floats at a time). */
static inline void pv_accumulate_f32(float* oh, const float* w, const float* vrows, int64_t stride, int64_t n,
                                     int64_t head_dim) {
#if defined(__AVX2__) && defined(__FMA__)
  if (head_dim % 8 == 0) {
    for (int64_t d0 = 0; d0 < head_dim; d0 += 64) {
      const int64_t nv = (head_dim - d0 < 64 ? head_dim - d0 : 64) / 8;
      __m256 acc[8];
      for (int64_t c = 0; c < nv; ++c) acc[c] = _mm256_loadu_ps(oh + d0 + 8 * c);
      for (int64_t i = 0; i < n; ++i) {
        const __m256 wv = _mm256_set1_ps(w[i]);
        const float* v = vrows + i * stride + d0;
        for (int64_t c = 0; c < nv; ++c) acc[c] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + 8 * c), acc[c]);
      }
      for (int64_t c = 0; c < nv; ++c) _mm256_storeu_ps(oh + d0 + 8 * c, acc[c]);
    }
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) axpy_f32(oh, w[i], vrows + i * stride, head_dim);
}

/* Causal attention of the step's new tokens over their sequences' paged context.
 *   q:            (num_tokens, num_heads, head_dim), the step's queries, sequences one after another; rows
 *                 q_row_stride floats apart (the fused QKV output is read in place)
 *   k/v_cache:    (num_slots, num_kv_heads, head_dim); slot of position p of sequence i is
 *                 block_tables[i][p / block_size] * block_size + p % block_size
 *   block_tables: (num_seqs, max_blocks)
 *   query_starts, query_lens, seq_lens: (num_seqs,) — sequence i's new tokens are rows
 *                 query_starts[i] .. + query_lens[i] of q, at positions seq_lens[i] - query_lens[i] ..
 *   out:          (num_tokens, num_heads, head_dim); only the rows of the given sequences are written
 * Query head h reads kv head h / (num_heads / num_kv_heads), as transformers' repeat_kv.
 * The group of query heads of a kv head shares every K/V row it loads. */
void lmf_paged_attention_f32(const float* q, int64_t q_row_stride, const float* k_cache, const float* v_cache,
                             const int64_t* block_tables, const int64_t* query_starts, const int64_t* query_lens,
                             const int64_t* seq_lens, int64_t num_seqs, int64_t max_blocks, int64_t num_tokens,
                             int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                             float scale, float* out, int num_threads) {
  const int64_t group = num_heads / num_kv_heads;
  /* The rows of q this call owns: the caller may pass only some sequences (the short ones) and let
   * another path fill the other rows of `out`. */
  int64_t num_rows = 0, max_ctx = 1;
  for (int64_t s = 0; s < num_seqs; ++s) {
    num_rows += query_lens[s];
    if (seq_lens[s] > max_ctx) max_ctx = seq_lens[s];
  }
  int64_t* tok_row = (int64_t*)malloc(sizeof(int64_t) * (size_t)(num_rows + 1));
  int64_t* tok_seq = (int64_t*)malloc(sizeof(int64_t) * (size_t)(num_rows + 1));
  int64_t* tok_pos = (int64_t*)malloc(sizeof(int64_t) * (size_t)(num_rows + 1));
  int64_t n = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    for (int64_t j = 0; j < query_lens[s]; ++j, ++n) {
      tok_row[n] = query_starts[s] + j;
      tok_seq[n] = s;
      tok_pos[n] = seq_lens[s] - query_lens[s] + j;
    }
  }
  (void)num_tokens;
  /* A work item is (row, run of kv heads). With many rows each item takes every kv head, so it streams whole
   * cache rows (position p of a block holds all kv heads contiguously: block_size * kv_heads * head_dim floats
   * in one run) and the prefetcher sees one sequential read per block. With few rows (single-stream decode)
   * items split by kv head so every thread has work. */
  const int64_t heads_per_item = num_rows >= 2 * (int64_t)num_threads ? num_kv_heads : 1;
  const int64_t items_per_row = num_kv_heads / heads_per_item;
  const int64_t num_items = num_rows * items_per_row;
  const int64_t row_stride = num_kv_heads * head_dim;  /* floats between consecutive slots */
#pragma omp parallel num_threads(num_threads)
  {
    /* scores: (heads_per_item * group, ctx), one row per query head of the item */
    float* scores = (float*)malloc(sizeof(float) * (size_t)(max_ctx * group * heads_per_item));
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < num_items; ++item) {
      const int64_t r = item / items_per_row, kvh0 = (item % items_per_row) * heads_per_item, t = tok_row[r];
      const int64_t ctx = tok_pos[r] + 1;  /* causal: keys 0 .. own position */
      const int64_t* table = block_tables + tok_seq[r] * max_blocks;
      const int64_t num_q = heads_per_item * group;  /* query heads kvh0 * group .. + num_q, contiguous in q */
      const float* qh = q + t * q_row_stride + kvh0 * group * head_dim;  /* (num_q, head_dim) */
      float* oh = out + (t * num_heads + kvh0 * group) * head_dim;
      for (int64_t p0 = 0; p0 < ctx; p0 += block_size) {
        const float* kblock = k_cache + table[p0 / block_size] * block_size * row_stride;
        const int64_t n = ctx - p0 < block_size ? ctx - p0 : block_size;
        for (int64_t h = 0; h < num_q; ++h)  /* kblock rows: (heads_per_item, head_dim) each */
          qk_scores_f32(qh + h * head_dim, kblock + (kvh0 + h / group) * head_dim, row_stride, n, head_dim, scale,
                        scores + h * ctx + p0);
      }
      for (int64_t h = 0; h < num_q; ++h) {  /* softmax, max-subtracted as every fp32 implementation */
        float* sh = scores + h * ctx;
        float m = -INFINITY, sum = 0.f;
        for (int64_t p = 0; p < ctx; ++p) m = sh[p] > m ? sh[p] : m;
        sum = exp_sub_sum_f32(sh, ctx, m);
        const float inv = 1.f / sum;
        for (int64_t p = 0; p < ctx; ++p) sh[p] *= inv;
      }
      memset(oh, 0, sizeof(float) * (size_t)(num_q * head_dim));
      for (int64_t p0 = 0; p0 < ctx; p0 += block_size) {
        const float* vblock = v_cache + table[p0 / block_size] * block_size * row_stride;
        const int64_t n = ctx - p0 < block_size ? ctx - p0 : block_size;
        for (int64_t h = 0; h < num_q; ++h)
          pv_accumulate_f32(oh + h * head_dim, scores + h * ctx + p0, vblock + (kvh0 + h / group) * head_dim,
                            row_stride, n, head_dim);
      }
    }
    free(scores);
  }
  free(tok_row);
  free(tok_seq);
  free(tok_pos);
}

#if defined(__AVX2__) && defined(__FMA__)
/* The 4 sums of 4 vectors, in order: lane j = sum of a[j]'s 8 lanes. */
static inline __m128 hsum4_ps(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

/* 8 weights as fp32: stored fp32, or bf16 (the top 16 bits of an fp32, widened by a shift: exact). */
static inline __m256 load_w_f32(const float* w) { return _mm256_loadu_ps(w); }
static inline __m256 load_w_bf16(const uint16_t* w) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)w)), 16));
}

/* y[i][0..3] = x_i . w_{j..j+3} for the ROWS rows of x starting at x: a ROWS x 4 register tile. Each 8-float chunk
 * of k loads 4 weight chunks and ROWS x chunks for 4 * ROWS FMAs, so up to 3 rows of x the FMA units, not the loads,
 * set the pace (the dot-product form loads two vectors per FMA). k % 8 == 0. */
#define LMF_TILE_4xR(ROWS, SUFFIX, WTYPE)                                                                    \
  static inline void tile4x##ROWS##SUFFIX(const float* x, int64_t k, const WTYPE* w, float* y) {             \
    __m256 acc[ROWS][4];                                                                                     \
    for (int i = 0; i < ROWS; ++i)                                                                           \
      for (int c = 0; c < 4; ++c) acc[i][c] = _mm256_setzero_ps();                                           \
    for (int64_t d = 0; d < k; d += 8) {                                                                     \
      const __m256 w0 = load_w##SUFFIX(w + d), w1 = load_w##SUFFIX(w + k + d),                               \
                   w2 = load_w##SUFFIX(w + 2 * k + d), w3 = load_w##SUFFIX(w + 3 * k + d);                   \
      for (int i = 0; i < ROWS; ++i) {                                                                       \
        const __m256 xv = _mm256_loadu_ps(x + i * k + d);                                                    \
        acc[i][0] = _mm256_fmadd_ps(xv, w0, acc[i][0]);                                                      \
        acc[i][1] = _mm256_fmadd_ps(xv, w1, acc[i][1]);                                                      \
        acc[i][2] = _mm256_fmadd_ps(xv, w2, acc[i][2]);                                                      \
        acc[i][3] = _mm256_fmadd_ps(xv, w3, acc[i][3]);                                                      \
      }                                                                                                      \
    }                                                                                                        \
    for (int i = 0; i < ROWS; ++i) _mm_storeu_ps(y + 4 * i, hsum4_ps(acc[i][0], acc[i][1], acc[i][2], acc[i][3])); \
  }
LMF_TILE_4xR(1, _f32, float)
LMF_TILE_4xR(2, _f32, float)
LMF_TILE_4xR(3, _f32, float)
LMF_TILE_4xR(1, _bf16, uint16_t)
LMF_TILE_4xR(2, _bf16, uint16_t)
LMF_TILE_4xR(3, _bf16, uint16_t)
#undef LMF_TILE_4xR
#endif

static inline float bf16_to_f32(uint16_t v) {
  union { uint32_t u; float f; } c = { .u = (uint32_t)v << 16 };
  return c.f;
}

/* out (m, n) = x (m, k) @ w (n, k)^T [+ bias (n)] [+ out if accumulate: the residual add for free], for
 * small m (decode of one or a few sequences). Each weight row is read from memory once for all m rows of x:
 * 4 weight rows at a time (16 KB at k = 1024, in L1) against up to 3 rows of x at a time.
 * `_f32`: fp32 weights. `_bf16w`: bf16 weights (half the bytes to stream; a draft model's compact copy),
 * fp32 activations and accumulation. */
#if defined(__AVX2__) && defined(__FMA__)
#define LMF_TILED_COLUMNS(SUFFIX)                                                                            \
  const int64_t n_tiled = k % 8 == 0 ? n - n % 4 : 0;                                                        \
  _Pragma("omp parallel for num_threads(num_threads) schedule(static)")                                      \
  for (int64_t j = 0; j < n_tiled; j += 4) {                                                                 \
    float y[3 * 4];                                                                                          \
    for (int64_t i0 = 0; i0 < m; i0 += 3) {                                                                  \
      const int64_t rows = m - i0 < 3 ? m - i0 : 3;                                                          \
      if (rows == 3) tile4x3##SUFFIX(x + i0 * k, k, w + j * k, y);                                           \
      else if (rows == 2) tile4x2##SUFFIX(x + i0 * k, k, w + j * k, y);                                      \
      else tile4x1##SUFFIX(x + i0 * k, k, w + j * k, y);                                                     \
      for (int64_t i = 0; i < rows; ++i)                                                                     \
        for (int64_t c = 0; c < 4; ++c) {                                                                    \
          float* o = out + (i0 + i) * n + j + c;                                                             \
          const float v = y[4 * i + c] + (bias ? bias[j + c] : 0.f);                                         \
          *o = accumulate ? *o + v : v;                                                                      \
        }                                                                                                    \
    }                                                                                                        \
  }
#else
#define LMF_TILED_COLUMNS(SUFFIX) const int64_t n_tiled = 0;
#endif

void lmf_linear_small_m_f32(const float* x, const float* w, const float* bias, float* out, int64_t m, int64_t n,
                            int64_t k, int accumulate, int num_threads) {
  LMF_TILED_COLUMNS(_f32)
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t j = n_tiled; j < n; ++j) {
    const float* wrow = w + j * k;
    const float b = bias ? bias[j] : 0.f;
    for (int64_t i = 0; i < m; ++i) {
      const float y = dot_f32(x + i * k, wrow, k) + b;
      out[i * n + j] = accumulate ? out[i * n + j] + y : y;
    }
  }
}

void lmf_linear_small_m_bf16w(const float* x, const uint16_t* w, const float* bias, float* out, int64_t m, int64_t n,
                              int64_t k, int accumulate, int num_threads) {
  LMF_TILED_COLUMNS(_bf16)
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t j = n_tiled; j < n; ++j) {
    const uint16_t* wrow = w + j * k;
    const float b = bias ? bias[j] : 0.f;
    for (int64_t i = 0; i < m; ++i) {
      float y = 0.f;
      for (int64_t d = 0; d < k; ++d) y += x[i * k + d] * bf16_to_f32(wrow[d]);
      y += b;
      out[i * n + j] = accumulate ? out[i * n + j] + y : y;
    }
  }
}
#undef LMF_TILED_COLUMNS

/* Llama's RMSNorm in fp32: out = w * x / sqrt(mean(x^2) + eps), per row of (rows, dim). */
void lmf_rms_norm_f32(const float* x, const float* w, float* out, int64_t rows, int64_t dim, float eps,
                      int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows > 8)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* o = out + r * dim;
    const float inv = 1.f / sqrtf(dot_f32(xr, xr, dim) / (float)dim + eps);
    for (int64_t d = 0; d < dim; ++d) o[d] = w[d] * (xr[d] * inv);
  }
}

/* Rotate-half RoPE in place on the first num_heads heads of each row (queries then keys of the fused QKV
 * output): x[i] <- x[i] cos[i] - x[i + half] sin[i], x[i + half] <- x[i + half] cos[i + half] + x[i] sin[i + half],
 * with cos/sin rows (max_positions, head_dim) taken at each token's position (transformers' apply_rotary_pos_emb). */
void lmf_rope_inplace_f32(float* x, int64_t rows, int64_t row_stride, int64_t num_heads, int64_t head_dim,
                          const float* cos_table, const float* sin_table, const int64_t* positions, int num_threads) {
  const int64_t half = head_dim / 2;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows > 8)
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = cos_table + positions[r] * head_dim;
    const float* s = sin_table + positions[r] * head_dim;
    for (int64_t h = 0; h < num_heads; ++h) {
      float* v = x + r * row_stride + h * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
  }
}

/* out (rows, inter) = silu(gate) * up, from the fused gate/up output (rows, 2 * inter). */
void lmf_silu_mul_f32(const float* gate_up, float* out, int64_t rows, int64_t inter, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows > 8)
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate_up + r * 2 * inter;
    const float* u = g + inter;
    float* o = out + r * inter;
    for (int64_t i = 0; i < inter; ++i) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
  }
}

/* Store each new token's K and V (kv_width floats each, at k_offset / v_offset within its row of the fused QKV
 * output) in the caches at its slot. */
void lmf_write_kv_f32(const float* qkv, int64_t rows, int64_t row_stride, int64_t k_offset, int64_t v_offset,
                      int64_t kv_width, float* k_cache, float* v_cache, const int64_t* slots) {
  for (int64_t r = 0; r < rows; ++r) {
    memcpy(k_cache + slots[r] * kv_width, qkv + r * row_stride + k_offset, sizeof(float) * (size_t)kv_width);
    memcpy(v_cache + slots[r] * kv_width, qkv + r * row_stride + v_offset, sizeof(float) * (size_t)kv_width);
  }
}

/* A projection of the one-call forward given by a descriptor instead of a bare fp32 address: 7 int64s
 *   {kind, fn, fn_one_row, weight, a, b, group}
 * kind 0: fp32 weight (n, k) at `weight`; 1: bf16 weight; 2: a grouped low-bit kernel with the signature of
 * quant/kernels/lowbit.c's lmfq_q4_linear_f32 / lmfq_nf4_linear_f32 (weight codes, a = scales, b = offsets or the
 * NF4 table, group), and `fn_one_row` (0: none) with lmfq_q4_linear_q8act_f32's for steps of one row; 4: int8
 * per channel as lmfq_q8_linear_f32 (a = scales, b = zero correction or 0). The low-bit kernels live in the
 * quant package's library: their addresses come in, so this file does not link against it. They write
 * their output; where the caller accumulates (o, down) they write into `tmp`, added to `out` after, which is
 * what the per-op path does (x += linear(attn)), so both agree to the last bit. */
typedef void (*lmf_grouped_fn)(const float*, const void*, const float*, const float*, const float*, float*, int64_t,
                               int64_t, int64_t, int64_t, int);
typedef void (*lmf_grouped_one_row_fn)(const float*, const void*, const float*, const float*, const float*, float*,
                                       int64_t, int64_t, int64_t, int);
typedef void (*lmf_q8_fn)(const float*, const void*, const float*, const float*, const float*, float*, int64_t,
                          int64_t, int64_t, int);

static void lmf_projection(const int64_t* d, const float* x, const float* bias, float* out, float* tmp, int64_t m,
                           int64_t n, int64_t k, int acc, int num_threads) {
  const void* w = (const void*)(intptr_t)d[3];
  if (d[0] == 0) { lmf_linear_small_m_f32(x, (const float*)w, bias, out, m, n, k, acc, num_threads); return; }
  if (d[0] == 1) { lmf_linear_small_m_bf16w(x, (const uint16_t*)w, bias, out, m, n, k, acc, num_threads); return; }
  float* dst = acc ? tmp : out;
  const float* a = (const float*)(intptr_t)d[4];
  const float* b = (const float*)(intptr_t)d[5];
  if (d[0] == 2 && m == 1 && d[2])
    ((lmf_grouped_one_row_fn)(intptr_t)d[2])(x, w, a, b, bias, dst, n, k, d[6], num_threads);
  else if (d[0] == 2)
    ((lmf_grouped_fn)(intptr_t)d[1])(x, w, a, b, bias, dst, m, n, k, d[6], num_threads);
  else
    ((lmf_q8_fn)(intptr_t)d[1])(x, w, a, b, bias, dst, m, n, k, num_threads);
  if (acc)
    for (int64_t i = 0; i < m * n; ++i) out[i] += tmp[i];
}

/* The whole decoder for a step of few rows (decode of one or a few sequences, speculative verification, a
 * draft model's passes) in one call: per token, eager PyTorch pays ~30 operator dispatches per layer and our
 * Python wrappers ~10, which is most of a small model's single-stream time on a CPU. Same math, same order as
 * LlamaDecoder._forward_kernels (serve/worker/llama.py), so both paths agree to the last bit.
 *   x:           (rows, hidden) the embeddings on entry, the residual stream after (updated in place)
 *   layer_ptrs:  (num_layers, 7) addresses of input_norm, qkv, qkv_bias (0: none), o, post_norm, gate_up, down;
 *                with weights_bf16 the four projections (qkv, o, gate_up, down) are bf16, the rest fp32
 *   kv_ptrs:     (num_layers, 2) addresses of each layer's k_cache and v_cache
 *   scratch:     rows * (2 * hidden + qkv_width + num_heads * head_dim + 3 * inter) floats
 *   out:         (rows, hidden) the final RMSNorm of x
 *   proj_descs:  NULL, or (num_layers, 4, 7) descriptors of qkv, o, gate_up, down (lmf_projection: quantized
 *                models), which then replace the projection addresses of layer_ptrs and weights_bf16
 * Attention arguments as lmf_paged_attention_f32, covering every row. */
void lmf_forward_few_rows_f32(float* x, int64_t rows, int64_t hidden, int64_t num_layers, const int64_t* layer_ptrs,
                              const int64_t* kv_ptrs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                              int64_t inter, float eps, const float* cos_table, const float* sin_table,
                              const int64_t* positions, const int64_t* slots, const int64_t* block_tables,
                              const int64_t* query_starts, const int64_t* query_lens, const int64_t* seq_lens,
                              int64_t num_seqs, int64_t max_blocks, int64_t block_size, float scale,
                              const float* final_norm, float* scratch, float* out, int weights_bf16, int num_threads,
                              const int64_t* proj_descs) {
  const int64_t num_q = num_heads * head_dim, num_kv = num_kv_heads * head_dim, qkv_width = num_q + 2 * num_kv;
  float* h = scratch;                  /* (rows, hidden) */
  float* qkv = h + rows * hidden;      /* (rows, qkv_width) */
  float* attn = qkv + rows * qkv_width; /* (rows, num_q) */
  float* gate_up = attn + rows * num_q; /* (rows, 2 * inter) */
  float* act = gate_up + rows * 2 * inter; /* (rows, inter) */
  float* tmp = act + rows * inter;         /* (rows, hidden): quantized o / down before the residual add */
  int64_t plain[4][7];                     /* descriptors of this layer's projections when none are given */
  for (int i = 0; i < 4; ++i) {
    plain[i][0] = weights_bf16 ? 1 : 0;
    for (int j = 1; j < 7; ++j) plain[i][j] = 0;
  }
#define LINEAR(X, IDX, B, OUT, M, N, K, ACC) lmf_projection(desc + 7 * (IDX), X, B, OUT, tmp, M, N, K, ACC, num_threads)
  for (int64_t l = 0; l < num_layers; ++l) {
    const int64_t* p = layer_ptrs + 7 * l;
    const int64_t* desc = proj_descs ? proj_descs + 28 * l : &plain[0][0];
    if (!proj_descs) { plain[0][3] = p[1]; plain[1][3] = p[3]; plain[2][3] = p[5]; plain[3][3] = p[6]; }
    float* k_cache = (float*)(intptr_t)kv_ptrs[2 * l];
    float* v_cache = (float*)(intptr_t)kv_ptrs[2 * l + 1];
    lmf_rms_norm_f32(x, (const float*)(intptr_t)p[0], h, rows, hidden, eps, num_threads);
    LINEAR(h, 0, (const float*)(intptr_t)p[2], qkv, rows, qkv_width, hidden, 0);
    lmf_rope_inplace_f32(qkv, rows, qkv_width, num_heads + num_kv_heads, head_dim, cos_table, sin_table, positions,
                         num_threads);
    lmf_write_kv_f32(qkv, rows, qkv_width, num_q, num_q + num_kv, num_kv, k_cache, v_cache, slots);
    lmf_paged_attention_f32(qkv, qkv_width, k_cache, v_cache, block_tables, query_starts, query_lens, seq_lens,
                            num_seqs, max_blocks, rows, num_heads, num_kv_heads, head_dim, block_size, scale, attn,
                            num_threads);
    LINEAR(attn, 1, NULL, x, rows, hidden, num_q, 1);
    lmf_rms_norm_f32(x, (const float*)(intptr_t)p[4], h, rows, hidden, eps, num_threads);
    LINEAR(h, 2, NULL, gate_up, rows, 2 * inter, hidden, 0);
    lmf_silu_mul_f32(gate_up, act, rows, inter, num_threads);
    LINEAR(act, 3, NULL, x, rows, hidden, inter, 1);
  }
#undef LINEAR
  lmf_rms_norm_f32(x, final_norm, out, rows, hidden, eps, num_threads);
}
