// Attention of a one-call decode step's rows (decode_layers.cpp) over the paged KV cache.
//
// Rows that read the same blocks (a decode token and the drafts after it, a short prompt chunk) form one
// group, and each key and value row is read (and widened or decoded) once for all of them: a step verifying four
// drafts used to read the sequence's cache five times, which at a few hundred tokens of context cost as much
// as a row of the projections. Keys are split into chunks of kKeyChunk, each (group, chunk) a work item with
// its own softmax max and sum per query head, merged per row afterwards (as flash-decoding splits keys), so
// that one sequence's attention is spread over the threads too. An item takes every KV head of its tokens, head
// by head, each head's rows requested into L2 while the one before is worked on (the cache is cold: the weights
// stream through every cache level between two steps; items of one head each, unrequested, cost a quarter to
// two fifths more than whole rows in address order). Chunk bounds are multiples of kKeyChunk counted from the
// sequence's start, so a row's result depends only on its own length and the cache, never on which rows share
// its step.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
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

// offsets[t] = the cache row of token t0 + t for t < n, then the last one's again (one division a block: two
// a key cost ~10% of the item).
inline void token_offsets(const StepRows& s, const int64_t* table, int64_t t0, int64_t n, int64_t token_stride,
                          int64_t* offsets) {
  for (int64_t t = 0; t < n;) {
    const int64_t token = t0 + t, slot = token % s.block_size, count = std::min(s.block_size - slot, n - t);
    const int64_t at = (table[token / s.block_size] * s.block_size + slot) * token_stride;
    for (int64_t i = 0; i < count; ++i) offsets[t + i] = at + i * token_stride;
    t += count;
  }
  std::fill(offsets + n, offsets + kKeyChunk, offsets[n - 1]);
}

// Requests KV head h's K rows, then its V rows, of n tokens into L2: in the order the work reads them, one head
// ahead of it. At batch 1 the cache comes from DRAM (the weights stream through every level between two steps)
// and these requests queue behind each other: the whole chunk requested at its start, K before V, took ~1.3x
// as long; the next chunk's rows in address order (for the hardware prefetcher) ~1.2x; two heads ahead the same.
template <typename C>
inline void prefetch_head(const C* k_cache, const C* v_cache, const int64_t* offsets, int64_t n, int64_t h,
                          int64_t head_bytes) {
  for (const C* cache : {k_cache, v_cache})
    for (int64_t t = 0; t < n; ++t) {
      const char* row = reinterpret_cast<const char*>(cache + offsets[t]) + h * head_bytes;
      for (int64_t b = 0; b < head_bytes; b += 64) _mm_prefetch(row + b, _MM_HINT_T1);
    }
}

// One work item: the rows of group g, every query head, the keys of chunk c, KV head by KV head (its keys and
// values widened to fp32 once for its query heads of every row). fp32 queries, and head sizes other than 64 and
// 128 (bf16 queries take attend_chunk_bf16 below). first_head_requested: whether the thread's
// previous item requested this chunk's first head (it was the group's chunk before this one).
template <typename T, typename C>
void attend_chunk(const StepRows& s, const RowGroup& g, int64_t c, const T* qkv, int64_t qkv_width,
                  const C* k_cache, const C* v_cache, int64_t row_width, float qk_scale, const Partials& partials,
                  std::vector<float>& scratch, bool first_head_requested) {
  const int64_t dim = s.dim, group = s.heads / s.kv_heads;
  const int64_t t0 = c * kKeyChunk, t1 = std::min(t0 + kKeyChunk, g.max_len), n = t1 - t0;
  const int64_t padded = (n + 15) / 16 * 16, head_floats = padded * dim;  // a KV head's keys (or values)
  scratch.resize(2 * head_floats + padded + dim);
  float* keys = scratch.data();  // [padded, dim]
  float* values = keys + head_floats;
  float* scores = values + head_floats;
  float* qf = scores + padded;
  std::fill(keys + n * dim, keys + head_floats, 0.f);  // scored with the rest, never used
  const int64_t* table = s.tables + g.first * s.max_blocks;
  const int64_t token_stride = s.kv_heads * row_width;
  int64_t offsets[kKeyChunk], next[kKeyChunk];  // this chunk's key rows, the next one's
  token_offsets(s, table, t0, n, token_stride, offsets);
  const int64_t next_n = std::min(t1 + kKeyChunk, g.max_len) - t1;
  if (next_n > 0) token_offsets(s, table, t1, next_n, token_stride, next);
  const int64_t head_bytes = row_width * static_cast<int64_t>(sizeof(C));
  if (!first_head_requested) prefetch_head(k_cache, v_cache, offsets, n, 0, head_bytes);
  for (int64_t h = 0; h < s.kv_heads; ++h) {
    if (h + 1 < s.kv_heads) prefetch_head(k_cache, v_cache, offsets, n, h + 1, head_bytes);
    else if (next_n > 0) prefetch_head(k_cache, v_cache, next, next_n, 0, head_bytes);
    for (int64_t t = 0; t < n; ++t) {
      load_row(k_cache + offsets[t] + h * row_width, keys + t * dim, 1, dim);
      load_row(v_cache + offsets[t] + h * row_width, values + t * dim, 1, dim);
    }
    for (int64_t r = g.first; r < g.first + g.count; ++r) {
      const int64_t limit = std::min(t1, s.lens[r]) - t0;
      if (limit <= 0) continue;  // the row ends before this chunk: merge reads only its own chunks
      for (int64_t hq = h * group; hq < (h + 1) * group; ++hq) {
        const T* q = qkv + r * qkv_width + hq * dim;
        for (int64_t i = 0; i < dim; ++i) qf[i] = static_cast<float>(q[i]) * qk_scale;
        for (int64_t t = 0; t < limit; t += 16) {
          __m512 acc[16];
          for (auto& a : acc) a = _mm512_setzero_ps();
          for (int64_t d = 0; d < dim; d += 16) {
            const __m512 qv = _mm512_loadu_ps(qf + d);
            for (int k = 0; k < 16; ++k)
              acc[k] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(keys + (t + k) * dim + d), acc[k]);
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
}

#if defined(__AVX512BF16__)
// The same work item for a bf16 cache and bf16 queries, without the fp32 copy of the chunk: scores multiply
// bf16 pairs straight into fp32 sums (vdpbf16ps: products exact, as the widened path's), and each pair of value
// rows is read once for up to kUnitRegisters / (dim / 16) (row, query head) units at a time. The copy
// (a 48 kB scratch, larger than L1, read back once per query head) and the item's two divisions a key made
// attention at 1000-2000 tokens of context cost ~2x the time of this path with its prefetching below. int8 and
// fp8 caches take it too, their head rows decoded to bf16 (exactly) once per chunk: 1.2-1.3x (int8) and
// 1.5-1.6x (fp8) faster than widening them to the fp32 copy. (int8 scores as integer dot products of the codes
// with the query rounded to int16 codes ran 4-9% faster still, at the cost of a second path and a rounded query.)
constexpr int kUnitRegisters = 16;  // fp32 sums held across a pass over the chunk's values
// Units of a group (its rows times the query heads of a KV head) from which a chunk's keys are transposed for
// score_columns_bf16: a verifying step's six rows (18 units) score 1.04-1.05x faster, one row's three 0.96x.
constexpr int64_t kColumnUnits = 6;

// scores[t] = scale * q . keys[t] for the chunk's kKeyChunk key rows (rows past its last key repeat it: their
// scores are computed and never read).
template <int kSlices>
inline void score_keys_bf16(const at::BFloat16* q, const at::BFloat16* const* keys, float scale, float* scores) {
  __m512bh qv[kSlices];
  for (int s = 0; s < kSlices; ++s) qv[s] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(q + 32 * s));
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t t0 = 0; t0 < kKeyChunk; t0 += 16) {
    __m512 acc[16];
    for (int k = 0; k < 16; ++k) {
      acc[k] = _mm512_setzero_ps();
      for (int s = 0; s < kSlices; ++s)
        acc[k] = _mm512_dpbf16_ps(acc[k], qv[s],
                                  reinterpret_cast<__m512bh>(_mm512_loadu_si512(keys[t0 + k] + 32 * s)));
    }
    _mm512_storeu_ps(scores + t0, _mm512_mul_ps(sum16(acc), vscale));
  }
}

// The chunk's keys with each 16 keys' dword j (a bf16 pair of dimensions 2j, 2j+1) gathered into one vector:
// columns[half][j] lane k = key 16 * half + k's dword j. Four rounds of 16x16 dword transposes a slice.
template <int kSlices>
inline void transpose_keys(const at::BFloat16* const* keys, __m512i (*columns)[16 * kSlices]) {
  for (int half = 0; half < kKeyChunk / 16; ++half)
    for (int s = 0; s < kSlices; ++s) {
      __m512i a[16], b[16];
      for (int k = 0; k < 16; ++k) a[k] = _mm512_loadu_si512(keys[16 * half + k] + 32 * s);
      for (int k = 0; k < 16; k += 2) {
        b[k] = _mm512_unpacklo_epi32(a[k], a[k + 1]);
        b[k + 1] = _mm512_unpackhi_epi32(a[k], a[k + 1]);
      }
      for (int k = 0; k < 16; k += 4)
        for (int i = 0; i < 2; ++i) {
          a[k + 2 * i] = _mm512_unpacklo_epi64(b[k + i], b[k + i + 2]);
          a[k + 2 * i + 1] = _mm512_unpackhi_epi64(b[k + i], b[k + i + 2]);
        }
      for (int k = 0; k < 16; k += 8)
        for (int i = 0; i < 4; ++i) {
          b[k + i] = _mm512_shuffle_i32x4(a[k + i], a[k + i + 4], _MM_SHUFFLE(2, 0, 2, 0));
          b[k + i + 4] = _mm512_shuffle_i32x4(a[k + i], a[k + i + 4], _MM_SHUFFLE(3, 1, 3, 1));
        }
      for (int i = 0; i < 8; ++i) {
        a[i] = _mm512_shuffle_i32x4(b[i], b[i + 8], _MM_SHUFFLE(2, 0, 2, 0));
        a[i + 8] = _mm512_shuffle_i32x4(b[i], b[i + 8], _MM_SHUFFLE(3, 1, 3, 1));
      }
      for (int i = 0; i < 16; ++i) columns[half][16 * s + i] = a[i];
    }
}

// score_keys_bf16 from transposed keys: lane k's sum over dimensions in the same order, bit for bit (lane i of
// a key's dword sums is the chain over slices of dwords i, 16 + i, ...; sum16 adds the 16 lanes as below),
// without the reduction across lanes (32 shuffles and adds for 16 keys) or a load of the keys per unit.
template <int kSlices>
inline void score_columns_bf16(const at::BFloat16* q, const __m512i (*columns)[16 * kSlices], float scale,
                               float* scores) {
  const int32_t* pairs = reinterpret_cast<const int32_t*>(q);
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int half = 0; half < kKeyChunk / 16; ++half) {
    __m512 lane[16];
    for (int i = 0; i < 16; ++i) {
      lane[i] = _mm512_dpbf16_ps(_mm512_setzero_ps(), reinterpret_cast<__m512bh>(_mm512_set1_epi32(pairs[i])),
                                 reinterpret_cast<__m512bh>(columns[half][i]));
      for (int s = 1; s < kSlices; ++s)
        lane[i] = _mm512_dpbf16_ps(lane[i], reinterpret_cast<__m512bh>(_mm512_set1_epi32(pairs[16 * s + i])),
                                   reinterpret_cast<__m512bh>(columns[half][16 * s + i]));
    }
    __m512 quarter[4];
    for (int l = 0; l < 4; ++l)
      quarter[l] = _mm512_add_ps(_mm512_add_ps(lane[4 * l], lane[4 * l + 2]), _mm512_add_ps(lane[4 * l + 1], lane[4 * l + 3]));
    const __m512 total = _mm512_add_ps(_mm512_add_ps(quarter[0], quarter[1]), _mm512_add_ps(quarter[2], quarter[3]));
    _mm512_storeu_ps(scores + 16 * half, _mm512_mul_ps(total, vscale));
  }
}

// outs[u][2 + ...] = sum over t < n of probs[u][t] * values[t], for kUnits units sharing each pair of value
// rows: the two rows interleaved (dimension d of row t, then of row t + 1) and multiplied by each unit's two
// weights rounded to bf16 (vdpbf16ps: one instruction for two keys of 16 dimensions, where the widened rows took
// two multiply-adds; products exact, the weights' rounding ~2^-9 of each, as the output's own bf16 rounding).
// n rounded up to a pair reads one row past it (a row of the chunk or its last repeated), its weights 0.
template <int kSlices, int kUnits>
void accumulate_values_bf16(const at::BFloat16* const* values, int64_t n, const float* const* probs,
                            float* const* outs) {
  alignas(64) int32_t weights[kUnits][kKeyChunk / 2];  // (probs[2j], probs[2j + 1]) as bf16 pairs
  for (int u = 0; u < kUnits; ++u)
    _mm512_store_si512(weights[u], reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(probs[u] + 16),
                                                                                   _mm512_loadu_ps(probs[u]))));
  __m512 acc[kUnits][2 * kSlices];
  for (auto& unit : acc)
    for (auto& a : unit) a = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 2) {
    __m512bh v[2 * kSlices];
    for (int s = 0; s < kSlices; ++s) {
      const __m512i x = _mm512_loadu_si512(values[t] + 32 * s), y = _mm512_loadu_si512(values[t + 1] + 32 * s);
      v[2 * s] = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(x, y));
      v[2 * s + 1] = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(x, y));
    }
    for (int u = 0; u < kUnits; ++u) {
      const __m512bh w = reinterpret_cast<__m512bh>(_mm512_set1_epi32(weights[u][t / 2]));
      for (int i = 0; i < 2 * kSlices; ++i) acc[u][i] = _mm512_dpbf16_ps(acc[u][i], w, v[i]);
    }
  }
  // Lane 4 * L + w of the low interleave holds dimension 8 * L + w of its slice, of the high one 8 * L + 4 + w.
  alignas(64) static const int32_t first[16] = {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23};
  alignas(64) static const int32_t second[16] = {8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
  const __m512i lo = _mm512_load_si512(first), hi = _mm512_load_si512(second);
  for (int u = 0; u < kUnits; ++u)
    for (int s = 0; s < kSlices; ++s) {
      _mm512_storeu_ps(outs[u] + 2 + 32 * s, _mm512_permutex2var_ps(acc[u][2 * s], lo, acc[u][2 * s + 1]));
      _mm512_storeu_ps(outs[u] + 18 + 32 * s, _mm512_permutex2var_ps(acc[u][2 * s], hi, acc[u][2 * s + 1]));
    }
}

template <int kSlices>
void accumulate_values_bf16(const at::BFloat16* const* values, int64_t n, const float* const* probs,
                            float* const* outs, int units) {
  constexpr int kMost = kUnitRegisters / (2 * kSlices);
  static_assert(kMost <= 4, "passes of up to four units");
  switch (units) {
    case 1: return accumulate_values_bf16<kSlices, 1>(values, n, probs, outs);
    case 2: return accumulate_values_bf16<kSlices, 2>(values, n, probs, outs);
    case 3:
      if constexpr (kMost >= 3) return accumulate_values_bf16<kSlices, 3>(values, n, probs, outs);
      break;
    case 4:
      if constexpr (kMost >= 4) return accumulate_values_bf16<kSlices, 4>(values, n, probs, outs);
      break;
  }
  TORCH_CHECK(false, "accumulate_values_bf16: ", units, " units in one pass");
}

// 32 float8 e4m3 codes as bf16, exactly (3-bit mantissas): normal values rebiased (+120) with the mantissa moved
// up 4 bits, subnormals (exponent 0: mantissa * 2^-9) from a table.
inline void fp8_to_bf16(const c10::Float8_e4m3fn* src, at::BFloat16* dst) {
  alignas(64) static const uint16_t subnormals[32] = {0x0000, 0x3B00, 0x3B80, 0x3BC0, 0x3C00, 0x3C20, 0x3C40, 0x3C60};
  const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  const __m512i mag = _mm512_and_si512(b, _mm512_set1_epi16(0x7F));
  const __m512i normal = _mm512_add_epi16(_mm512_slli_epi16(mag, 4), _mm512_set1_epi16(120 << 7));
  const __m512i small = _mm512_permutexvar_epi16(mag, _mm512_load_si512(subnormals));
  const __m512i value = _mm512_mask_blend_epi16(_mm512_cmplt_epu16_mask(mag, _mm512_set1_epi16(8)), normal, small);
  const __m512i sign = _mm512_slli_epi16(_mm512_and_si512(b, _mm512_set1_epi16(0x80)), 8);
  _mm512_storeu_si512(dst, _mm512_or_si512(value, sign));
}

// 32 int8 codes as bf16, exactly (|code| <= 127: seven significant bits).
inline void int8_to_bf16(const int8_t* src, at::BFloat16* dst) {
  const __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
  const __m512 high =
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16))));
  _mm512_storeu_si512(dst, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(high, low)));
}

// attend_chunk for bf16 queries over a bf16 cache, or a quantized one whose head rows (K and V) are first
// decoded to bf16 once for all the head's units (kSlices = dim / 32): fp8 (its per-tensor scales applied
// outside), int8 (its codes; each row's scale multiplies its key's scores and its value's weights).
template <int kSlices, typename C>
void attend_chunk_bf16(const StepRows& s, const RowGroup& g, int64_t c, const at::BFloat16* qkv, int64_t qkv_width,
                       const C* k_cache, const C* v_cache, int64_t row_width, float qk_scale,
                       const Partials& partials, std::vector<float>& scratch, bool first_head_requested) {
  constexpr bool fp8 = std::is_same_v<C, c10::Float8_e4m3fn>, int8 = std::is_same_v<C, int8_t>;
  static_assert(fp8 || int8 || std::is_same_v<C, at::BFloat16>, "a bf16, fp8 or int8 cache");
  constexpr int64_t dim = 32 * kSlices;
  constexpr int kPassUnits = kUnitRegisters / (2 * kSlices);
  const int64_t group = s.heads / s.kv_heads;
  const int64_t t0 = c * kKeyChunk, n = std::min(t0 + kKeyChunk, g.max_len) - t0;
  const int64_t* table = s.tables + g.first * s.max_blocks;
  const int64_t token_stride = s.kv_heads * row_width;
  int64_t offsets[kKeyChunk], next[kKeyChunk];  // this chunk's key rows, the next one's
  token_offsets(s, table, t0, n, token_stride, offsets);
  const int64_t next_n = std::min(t0 + n + kKeyChunk, g.max_len) - (t0 + n);
  if (next_n > 0) token_offsets(s, table, t0 + n, next_n, token_stride, next);
  const int64_t head_bytes = row_width * static_cast<int64_t>(sizeof(C));
  if (!first_head_requested) prefetch_head(k_cache, v_cache, offsets, n, 0, head_bytes);
  // Each unit's scores, then its weights, zero past its own keys: a pass runs to its longest unit's, and 0 * v
  // adds nothing (those keys are the group's, written in this step or before).
  scratch.resize(g.count * group * kKeyChunk);
  static thread_local std::vector<float*> outs;
  static thread_local std::vector<const float*> probs;
  static thread_local std::vector<int64_t> limits;
  limits.resize(g.count * group);
  outs.resize(g.count * group);
  probs.resize(g.count * group);
  for (int64_t h = 0; h < s.kv_heads; ++h) {
    if (h + 1 < s.kv_heads) prefetch_head(k_cache, v_cache, offsets, n, h + 1, head_bytes);
    else if (next_n > 0) prefetch_head(k_cache, v_cache, next, next_n, 0, head_bytes);
    const at::BFloat16* keys[kKeyChunk];
    const at::BFloat16* values[kKeyChunk];
    alignas(64) float key_scales[kKeyChunk], value_scales[kKeyChunk];  // int8 rows' own
    if constexpr (fp8 || int8) {
      alignas(64) static thread_local at::BFloat16 decoded[2][kKeyChunk][dim];
      for (int64_t t = 0; t < kKeyChunk; ++t) {
        const C* key = k_cache + offsets[t] + h * row_width;
        const C* value = v_cache + offsets[t] + h * row_width;
        for (int sl = 0; sl < kSlices; ++sl) {
          if constexpr (fp8) {
            fp8_to_bf16(key + 32 * sl, decoded[0][t] + 32 * sl);
            fp8_to_bf16(value + 32 * sl, decoded[1][t] + 32 * sl);
          } else {
            int8_to_bf16(key + 32 * sl, decoded[0][t] + 32 * sl);
            int8_to_bf16(value + 32 * sl, decoded[1][t] + 32 * sl);
          }
        }
        if constexpr (int8) {
          std::memcpy(&key_scales[t], key + dim, sizeof(float));
          std::memcpy(&value_scales[t], value + dim, sizeof(float));
        }
        keys[t] = decoded[0][t];
        values[t] = decoded[1][t];
      }
    } else {
      for (int64_t t = 0; t < kKeyChunk; ++t) {
        keys[t] = k_cache + offsets[t] + h * row_width;
        values[t] = v_cache + offsets[t] + h * row_width;
      }
    }
    const bool by_columns = g.count * group >= kColumnUnits;
    alignas(64) __m512i columns[kKeyChunk / 16][16 * kSlices];
    if (by_columns) transpose_keys<kSlices>(keys, columns);
    int units = 0;
    for (int64_t r = g.first; r < g.first + g.count; ++r) {
      const int64_t limit = std::min(t0 + n, s.lens[r]) - t0;
      if (limit <= 0) continue;  // the row ends before this chunk: merge reads only its own chunks
      for (int64_t hq = h * group; hq < (h + 1) * group; ++hq, ++units) {
        float* scores = scratch.data() + units * kKeyChunk;
        if (by_columns) score_columns_bf16<kSlices>(qkv + r * qkv_width + hq * dim, columns, qk_scale, scores);
        else score_keys_bf16<kSlices>(qkv + r * qkv_width + hq * dim, keys, qk_scale, scores);
        if constexpr (int8)
          for (int64_t t = 0; t < limit; ++t) scores[t] *= key_scales[t];
        float* out = partials.at(r, hq, c);
        out[1] = softmax_numerators(scores, limit, &out[0]);
        if constexpr (int8)
          for (int64_t t = 0; t < limit; ++t) scores[t] *= value_scales[t];
        std::fill(scores + limit, scores + kKeyChunk, 0.f);
        outs[units] = out;
        probs[units] = scores;
        limits[units] = limit;
      }
    }
    for (int u = 0; u < units; u += kPassUnits) {
      const int pass = std::min(kPassUnits, units - u);
      const int64_t keys_read = *std::max_element(&limits[u], &limits[u] + pass);
      accumulate_values_bf16<kSlices>(values, keys_read, &probs[u], &outs[u], pass);
    }
  }
}
#endif  // __AVX512BF16__

// Chunk merges (a query head's dim values of one chunk, and an exp) per task of merge_chunks: a step's heads
// at a few hundred tokens spread over the threads (one thread took ~5-13% of a verifying step at 400-1000
// tokens), a short context's stay on the calling thread.
constexpr int64_t kMergeChunksPerTask = 256;

// out[r, hq * dim ...] (T, rows out_width apart) = each row's chunks merged, times v_scale.
template <typename T>
void merge_chunks(const StepRows& s, const Partials& partials, float v_scale, T* out, int64_t out_width) {
  const int64_t grain = std::max<int64_t>(1, kMergeChunksPerTask / partials.chunks);
  at::parallel_for(0, s.rows * s.heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(s.dim);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t r = unit / s.heads, hq = unit % s.heads;
      const int64_t chunks = chunks_of(s.lens[r]);
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
  });
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
    // Kept too: a fresh one (then 48 kB, every KV head's keys and values of a chunk) allocated and zeroed in
    // every layer cost ~30% of a one-row step's attention with the cache in L2.
    static thread_local std::vector<float> scratch;
    for (int64_t i = begin; i < end; ++i) {
      const bool first_head_requested = i > begin && items[i].chunk > 0;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, at::BFloat16> &&
                    (std::is_same_v<C, at::BFloat16> || std::is_same_v<C, c10::Float8_e4m3fn> ||
                     std::is_same_v<C, int8_t>)) {
        if (s.dim == 64 || s.dim == 128) {
          (s.dim == 64 ? attend_chunk_bf16<2, C> : attend_chunk_bf16<4, C>)(
              s, groups[items[i].group], items[i].chunk, qkv, qkv_width, k_cache, v_cache, row_width, scale * k_scale,
              partials, scratch, first_head_requested);
          continue;
        }
      }
#endif
      attend_chunk<T, C>(s, groups[items[i].group], items[i].chunk, qkv, qkv_width, k_cache, v_cache, row_width,
                         scale * k_scale, partials, scratch, first_head_requested);
    }
  });
  merge_chunks(s, partials, v_scale, out, s.heads * s.dim);
}

}  // namespace pagoda_attention
#endif  // __AVX512F__
