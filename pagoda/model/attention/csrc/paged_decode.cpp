// Paged decode attention for CPU: one query token per sequence, read straight from the block cache.
//
// PyTorch has no gather-free way to attend over a paged cache, and its gathers copy every key and value
// of every sequence once per layer; this kernel reads each key/value row once, in place, for all the
// query heads that share it (grouped-query attention), with fp32 accumulation whatever the cache dtype.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

#if defined(__AVX512F__)
// bf16 is the top half of an fp32: widen 16 lanes at a time.
template <>
inline void to_float<at::BFloat16>(const at::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + i)));
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
  }
  for (; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(bits[i]) << 16;
    std::memcpy(dst + i, &u, 4);
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  float total = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  const __m512 va = _mm512_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}
#else
template <>
inline void to_float<at::BFloat16>(const at::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(bits[i]) << 16;
    std::memcpy(dst + i, &u, 4);
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  float total = 0.f;
  for (int64_t i = 0; i < n; ++i) total += a[i] * b[i];
  return total;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}
#endif

template <typename T>
void decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
            const torch::Tensor& block_tables, const torch::Tensor& seq_lens, torch::Tensor& out, double scale) {
  const int64_t num_seqs = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t group = heads / kv_heads, max_blocks = block_tables.size(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const float fscale = static_cast<float>(scale);

  // One work item per sequence: its blocks are read front to back, all KV heads of a row together,
  // which keeps the hardware prefetcher streaming (per-head items strided through memory and stalled).
  const int64_t row_stride = kv_heads * dim;
  at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(heads * dim), row(row_stride), acc(heads * dim), scores, inv_sum(heads);
    for (int64_t s = begin; s < end; ++s) {
      const int64_t len = lens[s];
      const int64_t* table = tables + s * max_blocks;
      scores.resize(heads * len);
      to_float(qp + s * heads * dim, qf.data(), heads * dim);
      for (int64_t i = 0; i < heads * dim; ++i) qf[i] *= fscale;
      for (int64_t b = 0, t = 0; t < len; ++b) {
        const T* kb = kp + table[b] * block_size * row_stride;
        const int64_t stop = std::min(len, t + block_size);
        for (; t < stop; ++t, kb += row_stride) {
          to_float(kb, row.data(), row_stride);
          for (int64_t hq = 0; hq < heads; ++hq)
            scores[hq * len + t] = dot(&qf[hq * dim], &row[(hq / group) * dim], dim);
        }
      }
      for (int64_t hq = 0; hq < heads; ++hq) {
        float* sc = &scores[hq * len];
        const float mx = *std::max_element(sc, sc + len);
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) {
          sc[t] = std::exp(sc[t] - mx);
          sum += sc[t];
        }
        inv_sum[hq] = 1.f / sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t b = 0, t = 0; t < len; ++b) {
        const T* vb = vp + table[b] * block_size * row_stride;
        const int64_t stop = std::min(len, t + block_size);
        for (; t < stop; ++t, vb += row_stride) {
          to_float(vb, row.data(), row_stride);
          for (int64_t hq = 0; hq < heads; ++hq)
            axpy(scores[hq * len + t], &row[(hq / group) * dim], &acc[hq * dim], dim);
        }
      }
      T* o = op + s * heads * dim;
      for (int64_t hq = 0; hq < heads; ++hq)
        for (int64_t i = 0; i < dim; ++i) o[hq * dim + i] = static_cast<T>(acc[hq * dim + i] * inv_sum[hq]);
    }
  });
}

}  // namespace

// q: [num_seqs, heads, dim]; k_cache, v_cache: [num_blocks, block_size, kv_heads, dim];
// block_tables: [num_seqs, max_blocks] int64; seq_lens: [num_seqs] int64 (>= 1). Returns [num_seqs, heads, dim].
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q and cache dtypes differ");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "heads must be a multiple of kv_heads");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && seq_lens.scalar_type() == torch::kInt64, "int64 indices");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "cache must be contiguous");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  seq_lens = seq_lens.contiguous();
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    decode<scalar_t>(q, k_cache, v_cache, block_tables, seq_lens, out, scale);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU)");
}
