// Rows of a paged KV cache as the CPU kernels read and write them (paged_decode.cpp, decode_layers.cpp): the
// model dtype, int8 (head_dim codes, then the row's fp32 scale) or float8 e4m3 (see
// pagoda/model/attention/kv_format.py); and the fp32 vector helpers of attention over them.
#pragma once

#include <torch/extension.h>
#include <c10/util/Float8_e4m3fn.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>

#include "simd_math.h"

namespace pagoda_kv {

// A paged read past a sequence's block table, or a block id outside the cache, would read (or write) memory
// that is not the cache: refuse it with an error instead. block_tables: [rows, max_blocks], seq_lens: [rows].
inline void check_paged_indices(const torch::Tensor& block_tables, const torch::Tensor& seq_lens,
                                int64_t num_cache_blocks, int64_t block_size, const char* kernel) {
  const int64_t rows = seq_lens.size(0), width = block_tables.size(1);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == rows, kernel, ": one block table row per sequence");
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(lens[r] >= 1 && lens[r] <= width * block_size, kernel, ": sequence ", r, " has length ", lens[r],
                " but its block table holds ", width * block_size, " slots");
    for (int64_t b = 0; b < (lens[r] + block_size - 1) / block_size; ++b)
      TORCH_CHECK(tables[r * width + b] >= 0 && tables[r * width + b] < num_cache_blocks, kernel, ": block id ",
                  tables[r * width + b], " outside the cache's ", num_cache_blocks, " blocks");
  }
}

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

using pagoda::exp512;

// Sixteen vectors -> one: lane j holds the sum of v[j]'s lanes (a transpose-and-add tree, ~3 ops a lane
// instead of a full horizontal reduction per vector).
inline __m512 sum16(__m512 v[16]) {
  __m512 pairs[8];
  for (int j = 0; j < 8; ++j)
    pairs[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
  __m512 quads[4];
  for (int j = 0; j < 4; ++j)
    quads[j] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * j], pairs[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(pairs[2 * j], pairs[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// In place: sc = exp(sc - max(sc)); returns the sum (and the max through max_out).
inline float softmax_numerators(float* sc, int64_t n, float* max_out = nullptr) {
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(sc + i));
  float mx = _mm512_reduce_max_ps(vmax);
  for (; i < n; ++i) mx = std::max(mx, sc[i]);
  if (max_out != nullptr) *max_out = mx;
  const __m512 vmx = _mm512_set1_ps(mx);
  __m512 vsum = _mm512_setzero_ps();
  for (i = 0; i + 16 <= n; i += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sc + i), vmx));
    _mm512_storeu_ps(sc + i, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  float sum = _mm512_reduce_add_ps(vsum);
  for (; i < n; ++i) {
    sc[i] = std::exp(sc[i] - mx);
    sum += sc[i];
  }
  return sum;
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

inline float softmax_numerators(float* sc, int64_t n, float* max_out = nullptr) {
  const float mx = *std::max_element(sc, sc + n);
  if (max_out != nullptr) *max_out = mx;
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    sc[i] = std::exp(sc[i] - mx);
    sum += sc[i];
  }
  return sum;
}
#endif

constexpr int64_t kInt8ScaleBytes = 4;

// One cache row (every KV head of one token) as fp32: [kv_heads * dim].
template <typename C>
inline void load_row(const C* src, float* dst, int64_t kv_heads, int64_t dim) {
  to_float(src, dst, kv_heads * dim);
}

// int8 rows: each head's dim codes, then its fp32 scale.
template <>
inline void load_row<int8_t>(const int8_t* src, float* dst, int64_t kv_heads, int64_t dim) {
  for (int64_t h = 0; h < kv_heads; ++h, src += dim + kInt8ScaleBytes, dst += dim) {
    float scale;
    std::memcpy(&scale, src + dim, sizeof(scale));
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 vs = _mm512_set1_ps(scale);
    for (; i + 16 <= dim; i += 16) {
      const __m512i wide = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
      _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_cvtepi32_ps(wide), vs));
    }
#endif
    for (; i < dim; ++i) dst[i] = static_cast<float>(src[i]) * scale;
  }
}

// float8 e4m3 (no infinities; 0x7F / 0xFF are NaN): sign, 4 exponent bits (bias 7), 3 mantissa bits.
template <>
inline void load_row<c10::Float8_e4m3fn>(const c10::Float8_e4m3fn* src, float* dst, int64_t kv_heads, int64_t dim) {
  const int64_t n = kv_heads * dim;
  const auto* bytes = reinterpret_cast<const uint8_t*>(src);
  int64_t i = 0;
#if defined(__AVX512F__)
  // Normal values: the fp32 with the exponent rebiased (+120) and the mantissa moved up 20 bits; subnormals
  // (exponent 0) are mantissa * 2^-9.
  const __m512i seven = _mm512_set1_epi32(0x7F), rebias = _mm512_set1_epi32(120 << 23);
  for (; i + 16 <= n; i += 16) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + i)));
    const __m512i mag = _mm512_and_si512(b, seven);
    const __m512i sign = _mm512_slli_epi32(_mm512_srli_epi32(b, 7), 31);
    const __m512 normal = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(mag, 20), rebias));
    const __m512 subnormal = _mm512_mul_ps(_mm512_cvtepi32_ps(mag), _mm512_set1_ps(1.f / 512.f));
    const __mmask16 is_sub = _mm512_cmplt_epi32_mask(mag, _mm512_set1_epi32(8));
    const __m512 value = _mm512_mask_blend_ps(is_sub, normal, subnormal);
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(value), sign)));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// One row of head_dim values (the model dtype T) into a cache row of C: copied, or encoded as int8 codes with
// their scale max|x| / 127 (ties to even, as torch.round), or as fp8 of x / scale saturated at +-448.
template <typename T, typename C>
inline void store_row(const T* src, C* dest, int64_t dim, float scale) {
  if constexpr (std::is_same_v<C, int8_t>) {
    float amax = 0.f;
    for (int64_t i = 0; i < dim; ++i) amax = std::max(amax, std::fabs(static_cast<float>(src[i])));
    const float row_scale = amax / 127.f;
    const float safe = row_scale > 0.f ? row_scale : 1.f;
    for (int64_t i = 0; i < dim; ++i) dest[i] = static_cast<int8_t>(std::nearbyint(static_cast<float>(src[i]) / safe));
    std::memcpy(dest + dim, &row_scale, sizeof(row_scale));
  } else if constexpr (std::is_same_v<C, c10::Float8_e4m3fn>) {
    for (int64_t i = 0; i < dim; ++i)
      dest[i] = c10::Float8_e4m3fn(std::clamp(static_cast<float>(src[i]) / scale, -448.f, 448.f));
  } else {
    std::memcpy(dest, src, dim * sizeof(T));
  }
}

}  // namespace pagoda_kv
