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
#include <vector>

#include "kv_rows.h"
#include "row_attention.h"

namespace {

using namespace pagoda_kv;

// Scores of one key row against every query head: scores[hq * len + t] = scale * q[hq] . k[hq / group]
// (qf is already scaled).
template <typename C>
inline void score_row(const float* qf, const C* krow, float* row, float* scores, int64_t t, int64_t len,
                      int64_t heads, int64_t group, int64_t dim, int64_t kv_heads) {
  load_row(krow, row, kv_heads, dim);
  for (int64_t hq = 0; hq < heads; ++hq) scores[hq * len + t] = dot(&qf[hq * dim], &row[(hq / group) * dim], dim);
}

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

#if defined(__AVX512F__)
  // The one-call decode's attention (row_attention.h), so that a decode row computes alike on both paths, its
  // keys in chunks spread over the threads (for bf16 queries: a bf16 cache read as
  // it is, fp8 decoded to bf16, int8 as codes; the rest widened to fp32).
  if (dim % 16 == 0) {
    const pagoda_attention::StepRows rows{num_seqs, heads, kv_heads, dim, block_size, max_blocks, tables, lens};
    pagoda_attention::attend_rows<T, C>(rows, pagoda_attention::row_groups(rows), qp, heads * dim, kp, vp,
                                        k_cache.size(3), fscale, 1.f, 1.f, op);
    return;
  }
#endif
  // Without AVX-512 (or for head sizes not a multiple of 16): one work item per sequence, its blocks read front
  // to back, all KV heads of a row together, which keeps the hardware prefetcher streaming (per-head items
  // strided through memory and stalled).
  const int64_t row_stride = kv_heads * k_cache.size(3);  // cache elements per token
  // Sequences differ in length, so threads take them one at a time from a shared counter instead
  // of splitting the range evenly (an even split left one thread idle for much of the call).
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_seqs);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> qf(heads * dim), row(kv_heads * dim), acc(heads * dim), scores, inv_sum(heads);
    for (int64_t s = next.fetch_add(1); s < num_seqs; s = next.fetch_add(1)) {
      const int64_t len = lens[s];
      const int64_t* table = tables + s * max_blocks;
      scores.resize(heads * len);
      to_float(qp + s * heads * dim, qf.data(), heads * dim);
      for (int64_t i = 0; i < heads * dim; ++i) qf[i] *= fscale;
      for (int64_t b = 0, t = 0; t < len; ++b) {
        const C* kb = kp + table[b] * block_size * row_stride;
        const int64_t stop = std::min(len, t + block_size);
        for (; t < stop; ++t, kb += row_stride)
          score_row<C>(qf.data(), kb, row.data(), scores.data(), t, len, heads, group, dim, kv_heads);
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

