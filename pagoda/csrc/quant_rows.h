// What the CPU kernels on quantized weights share (gguf_linear.cpp: GGUF blocks; int4_linear.cpp: group-wise
// int4; panel_linear.cpp: both in panels): fp16 scales, rows of x quantized on the fly to int8 blocks of 32 (as llama.cpp's Q8 activations) for
// AVX-512 VNNI dot products, and the loop over output columns that every such layer runs.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PAGODA_VNNI 1
#endif
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd_math.h"

namespace pagoda_quant {

// GGML's type ids, as GGUF files store them.
enum GgmlType : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };
// Pagoda's group-wise int4 (int4_linear.cpp) where a GGML type id is expected (fused_decode.py's INT4_KIND).
constexpr int64_t kInt4 = 1000;

constexpr int64_t kBlock = 32;
constexpr int64_t kGroup = 4;  // blocks per step of the vector loops (128 weights)
constexpr int64_t kRowTile = 4;  // rows of x per pass over a weight row (their accumulators stay in registers)

#if defined(__F16C__)
inline float half_to_float(uint16_t bits) { return _cvtsh_ss(bits); }
#else
inline float half_to_float(uint16_t bits) { return c10::detail::fp16_ieee_to_fp32_value(bits); }
#endif

inline float load_half(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return half_to_float(bits);
}

// Weight rows this many bytes ahead of the one being multiplied are requested into L2: at batch 1 a core
// streaming its half of a layer alone keeps too few reads in flight to reach the bandwidth. (Two cores
// streaming 576-wide Q4_1 rows: nothing 13 GB/s, 8 rows ahead into L1 17.7, 8 KB ahead into L2 27; a plain
// read loop 23-27; 2.9 KB or 16 KB into L2 were slower than 8 KB end to end.)
constexpr int64_t kPrefetchBytes = 8192;

inline int64_t prefetch_rows_ahead(int64_t row_bytes) { return kPrefetchBytes / row_bytes + 1; }

inline void prefetch_row_l2(const uint8_t* row, int64_t bytes) {
#if defined(__AVX512F__) || defined(__SSE__)
  for (int64_t at = 0; at < bytes; at += 64) _mm_prefetch(reinterpret_cast<const char*>(row + at), _MM_HINT_T1);
#endif
}

// AMX tiles' rows, next tile's into L1.
inline void prefetch_row(const uint8_t* row, int64_t bytes) {
#if defined(__AVX512F__) || defined(__SSE__)
  for (int64_t at = 0; at < bytes; at += 64) _mm_prefetch(reinterpret_cast<const char*>(row + at), _MM_HINT_T0);
#endif
}

// out[r, col] = row_dot's result for rows r of x against weight row col, plus bias[col]; parallel over the
// output columns, kRowTile rows of x per pass over a weight row.
// row_dot(col, r0, r_count, result) writes result[0 .. r_count).
template <typename T, typename RowDot>
void for_each_output(int64_t rows, int64_t n, const float* bias, T* out, const RowDot& row_dot) {
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    float result[kRowTile];
    for (int64_t r0 = 0; r0 < rows; r0 += kRowTile) {
      const int64_t r_count = std::min(kRowTile, rows - r0);
      for (int64_t col = begin; col < end; ++col) {
        row_dot(col, r0, r_count, result);
        const float b = bias ? bias[col] : 0.f;
        for (int64_t r = 0; r < r_count; ++r) out[(r0 + r) * n + col] = static_cast<T>(result[r] + b);
      }
    }
  });
}

// What the quantized layers' entry points share: x [rows, in_features] fp32 / bf16 checked, then the
// layer's own weight check(in_features), an optional bias as fp32, the output [rows, out_features] in x's
// dtype; run(T{}, x, bias or nullptr, out) with T from x's dtype.
template <typename Check, typename Run>
torch::Tensor quantized_linear(torch::Tensor x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias,
                               const char* fn, const Check& check, const Run& run) {
  TORCH_CHECK(x.dim() == 2, fn, ": x must be [rows, in_features]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, fn, ": x must be fp32 or bf16");
  check(x.size(1));
  x = x.contiguous();
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(at::kFloat).contiguous();
  auto out = torch::empty({x.size(0), w.size(0)}, x.options());
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kBFloat16) {
    run(at::BFloat16{}, x, bp, out);
  } else {
    run(float{}, x, bp, out);
  }
  return out;
}

// Weight rows `rows` (int64 indices; undefined: every row) of w (already checked) -> [rows, in_features] of
// dtype (fp32 or bf16), row(index, dst) per row.
template <typename Row>
torch::Tensor dequantized(const torch::Tensor& w, int64_t in_features, at::ScalarType dtype, const char* fn,
                          const torch::Tensor& rows, const Row& row) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, fn, ": dtype must be fp32 or bf16");
  torch::Tensor ids;
  if (rows.defined()) {
    TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong, fn, ": rows must be a 1-d int64 tensor");
    ids = rows.contiguous();
    const int64_t* p = ids.data_ptr<int64_t>();
    for (int64_t i = 0; i < ids.size(0); ++i)
      TORCH_CHECK(p[i] >= 0 && p[i] < w.size(0), fn, ": row ", p[i], " is out of range for ", w.size(0), " rows");
  }
  const int64_t count = ids.defined() ? ids.size(0) : w.size(0);
  const int64_t* index = ids.defined() ? ids.data_ptr<int64_t>() : nullptr;
  auto out = torch::empty({count, in_features}, w.options().dtype(dtype));
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = index != nullptr ? index[i] : i;
      if (dtype == at::kBFloat16) {
        row(r, out.data_ptr<at::BFloat16>() + i * in_features);
      } else {
        row(r, out.data_ptr<float>() + i * in_features);
      }
    }
  });
  return out;
}

#if defined(PAGODA_VNNI)
// Rows of x quantized to int8 blocks: q, each block's scale d, and d * sum(q) (what the weights' offsets
// multiply), padded with zeros to whole groups of four blocks. Each group's 128 values are stored so that a
// 64-byte load lines up with what one weight load unpacks (XOrder).
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> d, dsum;
  int64_t padded_k, padded_blocks;
};

constexpr int64_t kQuantizeGrain = 32;  // rows of x per thread, at least, when quantize_rows splits them

enum class XOrder {
  kNatural,  // panels (quant_panels.h), Q6_K, AMX tiles: in order
  kPairs,    // Q4_K/Q5_K: [b0 b2 | b1 b3], lining up with the low and the high nibbles of two 32-byte chunks
};

template <typename T>
QuantizedRows quantize_rows(const T* x, int64_t rows, int64_t k, XOrder order) {
  const int64_t blocks = k / kBlock, padded_blocks = (blocks + kGroup - 1) / kGroup * kGroup;
  const int64_t padded_k = padded_blocks * kBlock;
  QuantizedRows out{std::vector<int8_t>(rows * padded_k, 0), std::vector<float>(rows * padded_blocks, 0.f),
                    std::vector<float>(rows * padded_blocks, 0.f), padded_k, padded_blocks};
  const __m512 sign_off = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  // Prompts' rows split over the threads (a 1536-wide input of 128 rows took ~10% of its projection's time
  // on one thread); a decode step's few rows stay on the calling thread.
  at::parallel_for(0, rows, kQuantizeGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t b = 0; b < blocks; ++b) {
        const T* xb = x + r * k + b * kBlock;
        const __m512 lo = pagoda::load16(xb), hi = pagoda::load16(xb + 16);
        const float amax =
            _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(lo, sign_off), _mm512_and_ps(hi, sign_off)));
        const float d = amax / 127.f;
        const __m512 inv = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
        // Rounded to nearest, ties to even (the default rounding mode), as std::nearbyint.
        const __m512i q_lo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv));
        const __m512i q_hi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
        const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q_lo, q_hi));
        // Where the block's two halves of 16 go in its group of four blocks (XOrder).
        int8_t* group = out.q.data() + r * padded_k + b / kGroup * kGroup * kBlock;
        const int64_t i = b % kGroup;
        int64_t at_lo = kBlock * i, at_hi = kBlock * i + 16;
        if (order == XOrder::kPairs) {
          const int64_t slot = i == 1 ? 2 : i == 2 ? 1 : i;
          at_lo = kBlock * slot;
          at_hi = kBlock * slot + 16;
        }
        _mm_storeu_si128(reinterpret_cast<__m128i*>(group + at_lo), _mm512_cvtepi32_epi8(q_lo));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(group + at_hi), _mm512_cvtepi32_epi8(q_hi));
        out.d[r * padded_blocks + b] = d;
        out.dsum[r * padded_blocks + b] = d * static_cast<float>(sum);
      }
    }
  });
  return out;
}

inline float hsum128(__m128 v) {
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
}

// K-quant layers' dot products (gguf_linear.cpp), for kernels that run whole layers (decode_layers.cpp; the
// panel types' is panel_dot, quant_panels.h): x quantized in gguf_x_order; one weight row against rows r0 ..
// r0 + r_count.
XOrder gguf_x_order(int64_t qtype);
void gguf_row_dot(const uint8_t* row, int64_t qtype, int64_t k, const QuantizedRows& xq, int64_t r0, int64_t r_count,
                  float* result);
#endif  // PAGODA_VNNI

}  // namespace pagoda_quant
