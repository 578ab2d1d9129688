// Attention of a one-call decode step's rows (decode_layers.cpp) over the paged KV cache.
//
// Rows that read the same blocks (a decode token and the drafts after it, a short prompt chunk) form one
// group, and each key and value row is read and widened to fp32 once for all of them: a step verifying four
// drafts used to read the sequence's cache five times, which at a few hundred tokens of context cost as much
// as a row of the projections. Keys are split into chunks of kKeyChunk, each (group, chunk) a work item with
// its own softmax max and sum per query head, merged per row afterwards (as flash-decoding splits keys), so
// that one sequence's attention is spread over the threads too. An item takes every KV head of its tokens:
// a token's cache row holds the heads side by side, and reading it whole, in address order, cost a quarter to
// two fifths less at 160-400 tokens than reading one head's slice of each row per item (the cache is cold: the
// weights stream through every cache level between two steps). Chunk bounds are multiples of kKeyChunk counted
// from the sequence's start, so a row's result depends only on its own length and the cache, never on which
// rows share its step.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kv_rows.h"

#if defined(__AVX512F__)
#include <immintrin.h>

namespace pagoda_attention {

using namespace pagoda_kv;

constexpr int64_t kKeyChunk = 32;  // keys per work item (a multiple of 16: scores are computed 16 keys at once)

// The step's rows as attention sees them: each row's query heads in qkv, its block table and its length
// (keys up to and including its own token).
struct StepRows {
  int64_t rows, heads, kv_heads, dim, block_size, max_blocks;
  const int64_t* tables;
  const int64_t* lens;
};

// Consecutive rows whose block tables agree on every block the group reads.
struct RowGroup {
  int64_t first, count, max_len;
};

inline std::vector<RowGroup> row_groups(const StepRows& s) {
  std::vector<RowGroup> groups;
  for (int64_t r = 0; r < s.rows; ++r) {
    if (!groups.empty()) {
      RowGroup& g = groups.back();
      const int64_t len = std::max(g.max_len, s.lens[r]);
      const int64_t blocks = (len + s.block_size - 1) / s.block_size;
      const int64_t* first = s.tables + g.first * s.max_blocks;
      if (std::equal(first, first + blocks, s.tables + r * s.max_blocks)) {
        ++g.count;
        g.max_len = len;
        continue;
      }
    }
    groups.push_back({r, 1, s.lens[r]});
  }
  return groups;
}

inline int64_t chunks_of(int64_t len) { return (len + kKeyChunk - 1) / kKeyChunk; }

// Per (row, query head, chunk): the chunk's max score, its sum of exp(score - max), then dim values of
// sum exp(score - max) * v.
struct Partials {
  float* data;
  int64_t heads, chunks, dim;

  float* at(int64_t row, int64_t head, int64_t chunk) const {
    return data + ((row * heads + head) * chunks + chunk) * (dim + 2);
  }
};

// One work item: the rows of group g, every query head, the keys of chunk c.
template <typename T, typename C>
void attend_chunk(const StepRows& s, const RowGroup& g, int64_t c, const T* qkv, int64_t qkv_width,
                  const C* k_cache, const C* v_cache, int64_t row_width, float qk_scale, const Partials& partials,
                  std::vector<float>& scratch) {
  const int64_t dim = s.dim, group = s.heads / s.kv_heads;
  const int64_t t0 = c * kKeyChunk, t1 = std::min(t0 + kKeyChunk, g.max_len), n = t1 - t0;
  const int64_t padded = (n + 15) / 16 * 16, head_floats = padded * dim;  // a KV head's keys (or values)
  scratch.resize(2 * s.kv_heads * head_floats + padded + dim);
  float* all_keys = scratch.data();  // [kv_heads, padded, dim]
  float* all_values = all_keys + s.kv_heads * head_floats;
  float* scores = all_values + s.kv_heads * head_floats;
  float* qf = scores + padded;
  const int64_t* table = s.tables + g.first * s.max_blocks;
  const int64_t token_stride = s.kv_heads * row_width, block_stride = s.block_size * token_stride;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t at = table[t / s.block_size] * block_stride + (t % s.block_size) * token_stride;
    for (int64_t h = 0; h < s.kv_heads; ++h) {
      load_row(k_cache + at + h * row_width, all_keys + h * head_floats + (t - t0) * dim, 1, dim);
      load_row(v_cache + at + h * row_width, all_values + h * head_floats + (t - t0) * dim, 1, dim);
    }
  }
  for (int64_t h = 0; h < s.kv_heads; ++h)  // scored with the rest, never used
    std::fill(all_keys + h * head_floats + n * dim, all_keys + (h + 1) * head_floats, 0.f);
  for (int64_t r = g.first; r < g.first + g.count; ++r) {
    const int64_t limit = std::min(t1, s.lens[r]) - t0;
    if (limit <= 0) continue;  // the row ends before this chunk: merge reads only its own chunks
    for (int64_t hq = 0; hq < s.heads; ++hq) {
      const float* keys = all_keys + hq / group * head_floats;
      const float* values = all_values + hq / group * head_floats;
      const T* q = qkv + r * qkv_width + hq * dim;
      for (int64_t i = 0; i < dim; ++i) qf[i] = static_cast<float>(q[i]) * qk_scale;
      for (int64_t t = 0; t < limit; t += 16) {
        __m512 acc[16];
        for (auto& a : acc) a = _mm512_setzero_ps();
        for (int64_t d = 0; d < dim; d += 16) {
          const __m512 qv = _mm512_loadu_ps(qf + d);
          for (int k = 0; k < 16; ++k) acc[k] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(keys + (t + k) * dim + d), acc[k]);
        }
        _mm512_storeu_ps(scores + t, sum16(acc));
      }
      float* out = partials.at(r, hq, c);
      out[1] = softmax_numerators(scores, limit, &out[0]);
      // Four running sums a slice, so that consecutive multiply-adds do not wait on each other.
      for (int64_t d = 0; d < dim; d += 16) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t t = 0;
        for (; t + 4 <= limit; t += 4) {
          a0 = _mm512_fmadd_ps(_mm512_set1_ps(scores[t]), _mm512_loadu_ps(values + t * dim + d), a0);
          a1 = _mm512_fmadd_ps(_mm512_set1_ps(scores[t + 1]), _mm512_loadu_ps(values + (t + 1) * dim + d), a1);
          a2 = _mm512_fmadd_ps(_mm512_set1_ps(scores[t + 2]), _mm512_loadu_ps(values + (t + 2) * dim + d), a2);
          a3 = _mm512_fmadd_ps(_mm512_set1_ps(scores[t + 3]), _mm512_loadu_ps(values + (t + 3) * dim + d), a3);
        }
        for (; t < limit; ++t)
          a0 = _mm512_fmadd_ps(_mm512_set1_ps(scores[t]), _mm512_loadu_ps(values + t * dim + d), a0);
        _mm512_storeu_ps(out + 2 + d, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
      }
    }
  }
}

// out[r, hq * dim ...] (T, rows out_width apart) = each row's chunks merged, times v_scale.
template <typename T>
void merge_chunks(const StepRows& s, const Partials& partials, float v_scale, T* out, int64_t out_width) {
  std::vector<float> acc(s.dim);
  for (int64_t r = 0; r < s.rows; ++r) {
    const int64_t chunks = chunks_of(s.lens[r]);
    for (int64_t hq = 0; hq < s.heads; ++hq) {
      float max = -INFINITY;
      for (int64_t c = 0; c < chunks; ++c) max = std::max(max, partials.at(r, hq, c)[0]);
      float total = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t c = 0; c < chunks; ++c) {
        const float* part = partials.at(r, hq, c);
        const float weight = std::exp(part[0] - max);
        total += weight * part[1];
        for (int64_t i = 0; i < s.dim; ++i) acc[i] += weight * part[2 + i];
      }
      const float inv = v_scale / total;
      T* o = out + r * out_width + hq * s.dim;
      for (int64_t i = 0; i < s.dim; ++i) o[i] = static_cast<T>(acc[i] * inv);
    }
  }
}

// Every row's attention into out (T, [rows, heads * dim]); k_scale / v_scale: an fp8 cache's scales (else 1).
template <typename T, typename C>
void attend_rows(const StepRows& s, const std::vector<RowGroup>& groups, const T* qkv, int64_t qkv_width,
                 const C* k_cache, const C* v_cache, int64_t row_width, float scale, float k_scale, float v_scale,
                 T* out) {
  struct Item {
    int64_t group, chunk;
  };
  std::vector<Item> items;
  int64_t max_chunks = 0;
  for (int64_t gi = 0; gi < static_cast<int64_t>(groups.size()); ++gi) {
    const int64_t chunks = chunks_of(groups[gi].max_len);
    max_chunks = std::max(max_chunks, chunks);
    for (int64_t c = 0; c < chunks; ++c) items.push_back({gi, c});
  }
  // Kept from call to call: a large batch's partials run to megabytes, which a fresh allocation would fault in
  // page by page in every layer.
  static thread_local std::vector<float> buffer;
  buffer.resize(std::max<size_t>(buffer.size(), s.rows * s.heads * max_chunks * (s.dim + 2)));
  const Partials partials{buffer.data(), s.heads, max_chunks, s.dim};
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    // Kept too: a fresh one (48 kB for 32 keys of 3 KV heads of 64 dims) allocated and zeroed in every layer
    // cost ~30% of a one-row step's attention with the cache in L2.
    static thread_local std::vector<float> scratch;
    for (int64_t i = begin; i < end; ++i)
      attend_chunk<T, C>(s, groups[items[i].group], items[i].chunk, qkv, qkv_width, k_cache, v_cache, row_width,
                         scale * k_scale, partials, scratch);
  });
  merge_chunks(s, partials, v_scale, out, s.heads * s.dim);
}

}  // namespace pagoda_attention
#endif  // __AVX512F__
