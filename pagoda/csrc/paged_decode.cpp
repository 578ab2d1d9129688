// Paged decode attention for CPU: one query token per sequence, read straight from the block cache.
//
// PyTorch has no gather-free way to attend over a paged cache, and its gathers copy every key and value
// of every sequence once per layer; this kernel reads each key/value row once, in place, for all the
// query heads that share it (grouped-query attention), with fp32 accumulation whatever the cache dtype.
//
// Quantized caches (pagoda/model/attention/kv_format.py) are read row by row into fp32: int8 rows are
// head_dim codes followed by their fp32 scale (4 bytes), fp8 rows float8 e4m3 values (their per-tensor scale
// is folded into the softmax scale and the output by the caller).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kv_rows.h"
#include "row_attention.h"
#include "simd_math.h"

namespace {

using namespace pagoda_kv;

// Scores of one key row against every query head: scores[hq * len + t] = scale * q[hq] . k[hq / group]
// (qf is already scaled).
template <typename T, typename C>
inline void score_row(const float* qf, const C* krow, const T* q_raw, float* row, float* scores, int64_t t,
                      int64_t len, int64_t heads, int64_t group, int64_t dim, int64_t kv_heads, float scale) {
#if defined(__AVX512BF16__)
  // bf16 keys: multiply bf16 pairs straight into fp32 sums (no widening of the key row).
  if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<C, at::BFloat16>) {
    if (dim % 32 == 0) {
      for (int64_t hq = 0; hq < heads; ++hq) {
        const at::BFloat16* k = krow + (hq / group) * dim;
        const at::BFloat16* q = q_raw + hq * dim;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < dim; i += 32) {
          acc = _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(_mm512_loadu_si512(q + i)),
                                 reinterpret_cast<__m512bh>(_mm512_loadu_si512(k + i)));
        }
        scores[hq * len + t] = _mm512_reduce_add_ps(acc) * scale;
      }
      return;
    }
  }
#endif
  load_row(krow, row, kv_heads, dim);
  for (int64_t hq = 0; hq < heads; ++hq) scores[hq * len + t] = dot(&qf[hq * dim], &row[(hq / group) * dim], dim);
}

#if defined(__AVX512BF16__)
// Scores of up to 16 consecutive tokens (one cache block) for every query head, stored as vectors.
inline void score_block_bf16(const at::BFloat16* q, const at::BFloat16* const* krows, int64_t n, float* scores,
                             int64_t t0, int64_t len, int64_t heads, int64_t group, int64_t dim, float scale) {
  const __mmask16 keep = n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t hq = 0; hq < heads; ++hq) {
    const int64_t kv_off = (hq / group) * dim;
    __m512 acc[16];
    for (int64_t j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < dim; i += 32) {
      const __m512bh qv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(q + hq * dim + i));
      for (int64_t j = 0; j < n; ++j)
        acc[j] = _mm512_dpbf16_ps(acc[j], qv, reinterpret_cast<__m512bh>(_mm512_loadu_si512(krows[j] + kv_off + i)));
    }
    _mm512_mask_storeu_ps(scores + hq * len + t0, keep, _mm512_mul_ps(sum16(acc), vscale));
  }
}

// acc[hq] += sum_t p[hq][t] * v[t] for bf16 values, two tokens per instruction: the rows of tokens t and
// t+1 are interleaved element-wise and multiplied with the pair (p_t, p_t+1) rounded to bf16, the way
// flash attention feeds P to its P.V product. Sizes are compile-time (kChunks = dim / 16, kGroup = query
// heads per KV head) so one KV head's accumulators stay in registers.
template <int kChunks, int kGroup>
void accumulate_values_fixed(const std::vector<const at::BFloat16*>& rows, const at::BFloat16* probs,
                             int64_t probs_stride, float* acc, int64_t len, int64_t kv_heads) {
  constexpr int64_t dim = kChunks * 16;
  alignas(64) static const int16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const int16_t hi_idx[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                 24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i vlo = _mm512_load_si512(lo_idx), vhi = _mm512_load_si512(hi_idx);
  for (int64_t h = 0; h < kv_heads; ++h) {
    __m512 sums[kGroup][kChunks];
    for (int g = 0; g < kGroup; ++g)
      for (int c = 0; c < kChunks; ++c) sums[g][c] = _mm512_setzero_ps();
    const at::BFloat16* p0 = probs + h * kGroup * probs_stride;
    for (int64_t t = 0; t < len; t += 2) {
      const bool pair = t + 1 < len;
      const at::BFloat16* r0 = rows[t] + h * dim;
      const at::BFloat16* r1 = pair ? rows[t + 1] + h * dim : r0;
      __m512bh weights[kGroup];
      for (int g = 0; g < kGroup; ++g) {
        int32_t packed;
        std::memcpy(&packed, p0 + g * probs_stride + t, sizeof(packed));
        weights[g] = reinterpret_cast<__m512bh>(_mm512_set1_epi32(packed));
      }
      for (int c = 0; c < kChunks; c += 2) {
        const __m512i v0 = _mm512_loadu_si512(r0 + c * 16);
        // An odd tail pairs the last row with itself under a zero weight.
        const __m512i v1 = _mm512_loadu_si512(r1 + c * 16);
        const __m512bh lo = reinterpret_cast<__m512bh>(_mm512_permutex2var_epi16(v0, vlo, v1));
        const __m512bh hi = reinterpret_cast<__m512bh>(_mm512_permutex2var_epi16(v0, vhi, v1));
        for (int g = 0; g < kGroup; ++g) {
          sums[g][c] = _mm512_dpbf16_ps(sums[g][c], lo, weights[g]);
          sums[g][c + 1] = _mm512_dpbf16_ps(sums[g][c + 1], hi, weights[g]);
        }
      }
    }
    for (int g = 0; g < kGroup; ++g)
      for (int c = 0; c < kChunks; ++c) _mm512_storeu_ps(acc + (h * kGroup + g) * dim + c * 16, sums[g][c]);
  }
}

using ValuesFn = void (*)(const std::vector<const at::BFloat16*>&, const at::BFloat16*, int64_t, float*, int64_t,
                         int64_t);

// The specialization for this head size and group, or nullptr (then the portable fp32 path runs).
inline ValuesFn values_kernel_for(int64_t dim, int64_t group) {
#define PAGODA_VALUES_CASE(D, G) \
  if (dim == D && group == G) return &accumulate_values_fixed<D / 16, G>;
  PAGODA_VALUES_CASE(64, 1)
  PAGODA_VALUES_CASE(64, 2)
  PAGODA_VALUES_CASE(64, 3)
  PAGODA_VALUES_CASE(64, 4)
  PAGODA_VALUES_CASE(64, 8)
  PAGODA_VALUES_CASE(128, 1)
  PAGODA_VALUES_CASE(128, 2)
  PAGODA_VALUES_CASE(128, 4)
#undef PAGODA_VALUES_CASE
  return nullptr;
}
#endif

template <typename T>
inline void write_output(const float* acc, const float* inv_sum, T* o, int64_t heads, int64_t dim) {
  for (int64_t hq = 0; hq < heads; ++hq)
    for (int64_t i = 0; i < dim; ++i) o[hq * dim + i] = static_cast<T>(acc[hq * dim + i] * inv_sum[hq]);
}

// T: q and out; C: the cache's elements (T itself, int8 rows, or fp8).
template <typename T, typename C>
void decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
            const torch::Tensor& block_tables, const torch::Tensor& seq_lens, torch::Tensor& out, double scale) {
  const int64_t num_seqs = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t group = heads / kv_heads, max_blocks = block_tables.size(1);
  const T* qp = q.data_ptr<T>();
  const C* kp = static_cast<const C*>(k_cache.data_ptr());
  const C* vp = static_cast<const C*>(v_cache.data_ptr());
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const float fscale = static_cast<float>(scale);

  // One work item per sequence: its blocks are read front to back, all KV heads of a row together,
  // which keeps the hardware prefetcher streaming (per-head items strided through memory and stalled).
  const int64_t row_stride = kv_heads * k_cache.size(3);  // cache elements per token
  // Sequences differ in length, so threads take them one at a time from a shared counter instead
  // of splitting the range evenly (an even split left one thread idle for much of the call).
  std::atomic<int64_t> next{0};
#if defined(__AVX512BF16__)
  const ValuesFn values_kernel =
      std::is_same_v<T, at::BFloat16> && std::is_same_v<C, T> ? values_kernel_for(dim, group) : nullptr;
#endif
#if defined(__AVX512F__)
  // Other than bf16's specialized path: the one-call decode's attention (row_attention.h), so that a decode
  // row computes alike on both paths, its keys in chunks spread over the threads.
#if defined(__AVX512BF16__)
  const bool specialized = values_kernel != nullptr;
#else
  const bool specialized = false;
#endif
  if (dim % 16 == 0 && !specialized) {
    const pagoda_attention::StepRows rows{num_seqs, heads, kv_heads, dim, block_size, max_blocks, tables, lens};
    pagoda_attention::attend_rows<T, C>(rows, pagoda_attention::row_groups(rows), qp, heads * dim, kp, vp,
                                        k_cache.size(3), fscale, 1.f, 1.f, op);
    return;
  }
#endif
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_seqs);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> qf(heads * dim), row(kv_heads * dim), acc(heads * dim), scores, inv_sum(heads);
    std::vector<const T*> value_rows;
    std::vector<at::BFloat16> probs_bf16;
    for (int64_t s = next.fetch_add(1); s < num_seqs; s = next.fetch_add(1)) {
      const int64_t len = lens[s];
      const int64_t* table = tables + s * max_blocks;
      scores.resize(heads * len);
      to_float(qp + s * heads * dim, qf.data(), heads * dim);
      for (int64_t i = 0; i < heads * dim; ++i) qf[i] *= fscale;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<C, T>) {
        if (values_kernel != nullptr) {
          const T* q_raw = qp + s * heads * dim;
          value_rows.resize(len);
          for (int64_t b = 0, t = 0; t < len; ++b) {
            const int64_t n = std::min(block_size, len - t);
            const T* kb = kp + table[b] * block_size * row_stride;
            const T* vb = vp + table[b] * block_size * row_stride;
            for (int64_t j0 = 0; j0 < n; j0 += 16) {
              const int64_t m = std::min<int64_t>(16, n - j0);
              const T* krows[16];
              for (int64_t j = 0; j < m; ++j) krows[j] = kb + (j0 + j) * row_stride;
              score_block_bf16(q_raw, krows, m, scores.data(), t + j0, len, heads, group, dim, fscale);
            }
            for (int64_t j = 0; j < n; ++j) value_rows[t + j] = vb + j * row_stride;
            t += n;
          }
          // Probabilities in bf16, each head's row padded to an even length with a zero.
          const int64_t stride = len + (len & 1);
          probs_bf16.assign(heads * stride, at::BFloat16(0.f));
          for (int64_t hq = 0; hq < heads; ++hq) {
            float* sc = &scores[hq * len];
            inv_sum[hq] = 1.f / softmax_numerators(sc, len);
            at::BFloat16* pb = &probs_bf16[hq * stride];
            int64_t i = 0;
            for (; i + 16 <= len; i += 16)
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + i),
                                  reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(sc + i))));
            for (; i < len; ++i) pb[i] = at::BFloat16(sc[i]);
          }
          values_kernel(value_rows, probs_bf16.data(), stride, acc.data(), len, kv_heads);
          write_output(acc.data(), inv_sum.data(), op + s * heads * dim, heads, dim);
          continue;
        }
      }
#endif
      for (int64_t b = 0, t = 0; t < len; ++b) {
        const C* kb = kp + table[b] * block_size * row_stride;
        const int64_t stop = std::min(len, t + block_size);
        for (; t < stop; ++t, kb += row_stride)
          score_row<T, C>(qf.data(), kb, qp + s * heads * dim, row.data(), scores.data(), t, len, heads, group, dim,
                          kv_heads, fscale);
      }
      for (int64_t hq = 0; hq < heads; ++hq) inv_sum[hq] = 1.f / softmax_numerators(&scores[hq * len], len);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t b = 0, t = 0; t < len; ++b) {
        const C* vb = vp + table[b] * block_size * row_stride;
        const int64_t stop = std::min(len, t + block_size);
        for (; t < stop; ++t, vb += row_stride) {
          load_row(vb, row.data(), kv_heads, dim);
          for (int64_t hq = 0; hq < heads; ++hq)
            axpy(scores[hq * len + t], &row[(hq / group) * dim], &acc[hq * dim], dim);
        }
      }
      write_output(acc.data(), inv_sum.data(), op + s * heads * dim, heads, dim);
    }
  });
}

}  // namespace

// q: [num_seqs, heads, dim]; k_cache, v_cache: [num_blocks, block_size, kv_heads, dim] of q's dtype or fp8
// e4m3, or int8 [num_blocks, block_size, kv_heads, dim + 4] (codes, then the row's fp32 scale);
// block_tables: [num_seqs, max_blocks] int64; seq_lens: [num_seqs] int64 (>= 1). Returns [num_seqs, heads, dim].
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  const auto cache_type = k_cache.scalar_type();
  TORCH_CHECK(cache_type == q.scalar_type() || cache_type == at::kChar || cache_type == at::kFloat8_e4m3fn,
              "the cache must be q's dtype, int8 or float8_e4m3fn");
  TORCH_CHECK(k_cache.size(3) == q.size(2) + (cache_type == at::kChar ? kInt8ScaleBytes : 0),
              "cache rows must hold head_dim values (int8: and a 4-byte scale)");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "heads must be a multiple of kv_heads");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && seq_lens.scalar_type() == torch::kInt64, "int64 indices");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "cache must be contiguous");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  seq_lens = seq_lens.contiguous();
  TORCH_CHECK(seq_lens.size(0) == q.size(0), "one sequence length per query row");
  pagoda_kv::check_paged_indices(block_tables, seq_lens, k_cache.size(0), k_cache.size(1), "paged_decode_attention");
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    if (cache_type == at::kChar) {
      decode<scalar_t, int8_t>(q, k_cache, v_cache, block_tables, seq_lens, out, scale);
    } else if (cache_type == at::kFloat8_e4m3fn) {
      decode<scalar_t, c10::Float8_e4m3fn>(q, k_cache, v_cache, block_tables, seq_lens, out, scale);
    } else {
      decode<scalar_t, scalar_t>(q, k_cache, v_cache, block_tables, seq_lens, out, scale);
    }
  });
  return out;
}

