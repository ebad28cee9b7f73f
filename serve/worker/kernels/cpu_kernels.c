/* lmforge's CPU kernels: plain C + OpenMP, built on first use by serve/worker/kernels/__init__.py and
 * called through ctypes with raw pointers (no torch headers: it compiles in about a second).
 *
 * Why they exist (measured in docs/BENCHMARKS.md): on a CPU, eager PyTorch pays twice where an engine need not.
 *  - Decode attention over a paged cache had to copy every sequence's blocks into one padded tensor
 *    (index_select) before scaled_dot_product_attention read them again: K/V crossed memory three times.
 *    `lmf_paged_attention_f32` reads each K and V row once, in place, through the block table
 *    (PagedAttention, Kwon et al. 2023, sec. 4.1; the CPU analogue of vLLM's paged_attention_v1).
 *  - A linear layer over a handful of rows (single-stream decode, speculative verification) is a
 *    matrix-vector product bound by streaming the weights; `lmf_linear_small_m_f32` streams each weight
 *    row once for all rows of x, with several accumulators so the FMA latency hides under the loads.
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
        for (int64_t i = 0; i < n; ++i) {
          const float* krow = kblock + i * row_stride + kvh0 * head_dim;  /* (heads_per_item, head_dim) */
          for (int64_t h = 0; h < num_q; ++h)
            scores[h * ctx + p0 + i] = dot_f32(qh + h * head_dim, krow + (h / group) * head_dim, head_dim) * scale;
        }
      }
      for (int64_t h = 0; h < num_q; ++h) {  /* softmax, max-subtracted as every fp32 implementation */
        float* sh = scores + h * ctx;
        float m = -INFINITY, sum = 0.f;
        for (int64_t p = 0; p < ctx; ++p) m = sh[p] > m ? sh[p] : m;
        for (int64_t p = 0; p < ctx; ++p) { sh[p] = expf(sh[p] - m); sum += sh[p]; }
        const float inv = 1.f / sum;
        for (int64_t p = 0; p < ctx; ++p) sh[p] *= inv;
      }
      memset(oh, 0, sizeof(float) * (size_t)(num_q * head_dim));
      for (int64_t p0 = 0; p0 < ctx; p0 += block_size) {
        const float* vblock = v_cache + table[p0 / block_size] * block_size * row_stride;
        const int64_t n = ctx - p0 < block_size ? ctx - p0 : block_size;
        for (int64_t i = 0; i < n; ++i) {
          const float* vrow = vblock + i * row_stride + kvh0 * head_dim;
          for (int64_t h = 0; h < num_q; ++h)
            axpy_f32(oh + h * head_dim, scores[h * ctx + p0 + i], vrow + (h / group) * head_dim, head_dim);
        }
      }
    }
    free(scores);
  }
  free(tok_row);
  free(tok_seq);
  free(tok_pos);
}

/* out (m, n) = x (m, k) @ w (n, k)^T [+ bias (n)] [+ out if accumulate: the residual add for free], for
 * small m (decode of one or a few sequences). Each weight row is read from memory once for all m rows of x. */
void lmf_linear_small_m_f32(const float* x, const float* w, const float* bias, float* out, int64_t m, int64_t n,
                            int64_t k, int accumulate, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    const float* wrow = w + j * k;
    const float b = bias ? bias[j] : 0.f;
    for (int64_t i = 0; i < m; ++i) {
      const float y = dot_f32(x + i * k, wrow, k) + b;
      out[i * n + j] = accumulate ? out[i * n + j] + y : y;
    }
  }
}

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

/* The whole decoder for a step of few rows (decode of one or a few sequences, speculative verification, a
 * draft model's passes) in one call: per token, eager PyTorch pays ~30 operator dispatches per layer and our
 * Python wrappers ~10, which is most of a small model's single-stream time on a CPU. Same math, same order as
 * LlamaDecoder._forward_kernels (serve/worker/llama.py), so both paths agree to the last bit.
 *   x:           (rows, hidden) the embeddings on entry, the residual stream after (updated in place)
 *   layer_ptrs:  (num_layers, 7) addresses of input_norm, qkv, qkv_bias (0: none), o, post_norm, gate_up, down
 *   kv_ptrs:     (num_layers, 2) addresses of each layer's k_cache and v_cache
 *   scratch:     rows * (hidden + qkv_width + num_heads * head_dim + 3 * inter) floats
 *   out:         (rows, hidden) the final RMSNorm of x
 * Attention arguments as lmf_paged_attention_f32, covering every row. */
void lmf_forward_few_rows_f32(float* x, int64_t rows, int64_t hidden, int64_t num_layers, const int64_t* layer_ptrs,
                              const int64_t* kv_ptrs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                              int64_t inter, float eps, const float* cos_table, const float* sin_table,
                              const int64_t* positions, const int64_t* slots, const int64_t* block_tables,
                              const int64_t* query_starts, const int64_t* query_lens, const int64_t* seq_lens,
                              int64_t num_seqs, int64_t max_blocks, int64_t block_size, float scale,
                              const float* final_norm, float* scratch, float* out, int num_threads) {
  const int64_t num_q = num_heads * head_dim, num_kv = num_kv_heads * head_dim, qkv_width = num_q + 2 * num_kv;
  float* h = scratch;                  /* (rows, hidden) */
  float* qkv = h + rows * hidden;      /* (rows, qkv_width) */
  float* attn = qkv + rows * qkv_width; /* (rows, num_q) */
  float* gate_up = attn + rows * num_q; /* (rows, 2 * inter) */
  float* act = gate_up + rows * 2 * inter; /* (rows, inter) */
  for (int64_t l = 0; l < num_layers; ++l) {
    const int64_t* p = layer_ptrs + 7 * l;
    float* k_cache = (float*)(intptr_t)kv_ptrs[2 * l];
    float* v_cache = (float*)(intptr_t)kv_ptrs[2 * l + 1];
    lmf_rms_norm_f32(x, (const float*)(intptr_t)p[0], h, rows, hidden, eps, num_threads);
    lmf_linear_small_m_f32(h, (const float*)(intptr_t)p[1], (const float*)(intptr_t)p[2], qkv, rows, qkv_width,
                           hidden, 0, num_threads);
    lmf_rope_inplace_f32(qkv, rows, qkv_width, num_heads + num_kv_heads, head_dim, cos_table, sin_table, positions,
                         num_threads);
    lmf_write_kv_f32(qkv, rows, qkv_width, num_q, num_q + num_kv, num_kv, k_cache, v_cache, slots);
    lmf_paged_attention_f32(qkv, qkv_width, k_cache, v_cache, block_tables, query_starts, query_lens, seq_lens,
                            num_seqs, max_blocks, rows, num_heads, num_kv_heads, head_dim, block_size, scale, attn,
                            num_threads);
    lmf_linear_small_m_f32(attn, (const float*)(intptr_t)p[3], NULL, x, rows, hidden, num_q, 1, num_threads);
    lmf_rms_norm_f32(x, (const float*)(intptr_t)p[4], h, rows, hidden, eps, num_threads);
    lmf_linear_small_m_f32(h, (const float*)(intptr_t)p[5], NULL, gate_up, rows, 2 * inter, hidden, 0, num_threads);
    lmf_silu_mul_f32(gate_up, act, rows, inter, num_threads);
    lmf_linear_small_m_f32(act, (const float*)(intptr_t)p[6], NULL, x, rows, hidden, inter, 1, num_threads);
  }
  lmf_rms_norm_f32(x, final_norm, out, rows, hidden, eps, num_threads);
}
