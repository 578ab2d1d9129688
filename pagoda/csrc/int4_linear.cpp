// Linear layers on group-wise asymmetric int4 weights (--quantization int4, GPTQ and AWQ checkpoints, all
// unpacked at load to this one layout): W[n, j] = scale[n, g] * (q[n, j] - zero[n, g]) for group g = j / G.
//
// Layout of a weight row (uint8): [k / 2 bytes of nibbles | ng fp16 scales | ng uint8 zeros], ng = ceil(k / G)
// (the last group may be shorter, as AutoGPTQ allows). The nibbles are in GGUF Q4's order, 32 weights per 16
// bytes (element j < 16 of a 32-block the low nibble of byte j, element j >= 16 the high nibble of byte
// j - 16), with the activations' int8 blocks in the order that lines up with a load's low and high nibbles
// (XOrder::kNibbles); the scales and zeros come per group instead of per block. That keeps a row at 4 + 24 / G bits a weight
// (4.19 at G = 128) where Q4_1 blocks would take 5.
//
// Group sizes: 32, 64, any multiple of 128, or one group for the whole row (GPTQ's group_size -1): in each
// step of four 32-blocks the group is then one, two, or a single one.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "amx_tiles.h"
#include "quant_rows.h"

namespace {

using namespace pagoda_quant;

struct Int4Row {
  const uint8_t* qs;
  const uint16_t* scale;
  const uint8_t* zero;
};

inline int64_t num_groups(int64_t k, int64_t group) { return (k + group - 1) / group; }
inline int64_t int4_row_bytes(int64_t k, int64_t group) { return k / 2 + 3 * num_groups(k, group); }

inline Int4Row int4_row(const uint8_t* row, int64_t k, int64_t group) {
  const auto* scale = reinterpret_cast<const uint16_t*>(row + k / 2);
  return {row, scale, reinterpret_cast<const uint8_t*>(scale + num_groups(k, group))};
}

template <typename T>
void dequantize_int4_row(const uint8_t* row, int64_t k, int64_t group, T* out) {
  const Int4Row v = int4_row(row, k, group);
  for (int64_t b = 0; b < k / kBlock; ++b) {
    const int64_t g = b * kBlock / group;
    const float d = half_to_float(v.scale[g]), z = v.zero[g];
    const uint8_t* qs = v.qs + b * 16;
    T* o = out + b * kBlock;
#if defined(__AVX512F__)
    // (q - zero) exactly, then one rounding: as the torch path computes it, bit for bit.
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
    const __m512 vd = _mm512_set1_ps(d), vz = _mm512_set1_ps(z);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(0x0F)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
    pagoda::store16(o, _mm512_mul_ps(vd, _mm512_sub_ps(lo, vz)));
    pagoda::store16(o + 16, _mm512_mul_ps(vd, _mm512_sub_ps(hi, vz)));
    continue;
#endif
    for (int j = 0; j < 16; ++j) {
      o[j] = static_cast<T>(d * ((qs[j] & 0x0F) - z));
      o[j + 16] = static_cast<T>(d * ((qs[j] >> 4) - z));
    }
  }
}

#if defined(PAGODA_VNNI)
// Blocks of 32 per group, as the vector loop sees it: one, two, or at least four (one group per step).
enum class GroupSpan { kOne, kTwo, kWide };

// `count` (1-4) uint8 values at p as fp32, zeros after.
inline __m128 load_zeros(const uint8_t* p, int64_t count) {
  uint32_t bits = 0;  // (scalar loads: a masked load costs several plain ones on Zen)
  for (int64_t i = 0; i < std::min<int64_t>(count, 4); ++i) bits |= uint32_t{p[i]} << (8 * i);
  return _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(static_cast<int>(bits))));
}

// A step's four blocks of one weight row: their quants split into low and high nibbles (lane l of a dot
// product belongs to block l / 4), each block's scale and its offset scale * zero (taken away at the end).
struct Int4Step {
  __m512i lo, hi;
  __m128 dw, mw;
};

template <GroupSpan Span>
inline Int4Step int4_step(const Int4Row& w, int64_t b, int64_t present, int64_t group_blocks) {
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  __m128 dw, zw;
  if constexpr (Span == GroupSpan::kOne) {
    dw = load_halves(w.scale + b, present);
    zw = load_zeros(w.zero + b, present);
  } else if constexpr (Span == GroupSpan::kTwo) {
    const int64_t groups = (present + 1) / 2;
    const __m128 d2 = load_halves(w.scale + b / 2, groups), z2 = load_zeros(w.zero + b / 2, groups);
    dw = _mm_unpacklo_ps(d2, d2);  // (g0, g0, g1, g1)
    zw = _mm_unpacklo_ps(z2, z2);
  } else {
    const int64_t g = b / group_blocks;
    dw = _mm_set1_ps(half_to_float(w.scale[g]));
    zw = _mm_set1_ps(static_cast<float>(w.zero[g]));
  }
  const __m512i packed = load_bytes(w.qs + b * 16, 16 * present);
  return {_mm512_and_si512(packed, low_nibbles), _mm512_and_si512(_mm512_srli_epi16(packed, 4), low_nibbles), dw,
          _mm_mul_ps(dw, zw)};
}

// One x row's step against one weight row's: the blocks' int32 dot products times the weight and x scales into
// acc, the offsets times the x blocks' d * sum(q) into offset.
inline void int4_step_row(const Int4Step& w, const int8_t* xg, __m128 dx, __m128 dxsum, __m512& acc, __m128& offset) {
  const __m512i block_lanes = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w.lo, _mm512_loadu_si512(xg)),
                                          w.hi, _mm512_loadu_si512(xg + 64));
  const __m512 scale = _mm512_castps128_ps512(_mm_mul_ps(w.dw, dx));
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(block_lanes, scale), acc);
  offset = _mm_fmadd_ps(w.mw, dxsum, offset);
}

// Four weight rows' (or x rows') sums: a's, b's, c's and d's lanes summed, less the four lanes of each offset.
// The row and the column kernels end alike, so a row's result does not depend on which took it.
inline __m128 int4_sums(__m512 a, __m512 b, __m512 c, __m512 d, __m128 oa, __m128 ob, __m128 oc, __m128 od) {
  return _mm_sub_ps(reduce_add4(a, b, c, d), _mm_hadd_ps(_mm_hadd_ps(oa, ob), _mm_hadd_ps(oc, od)));
}

// One weight row against R quantized rows of x, four blocks a step: the int32 dot
// product of each block times its weight scale and x scale, plus the block's offset (-scale * zero) times
// the x block's d * sum(q).
template <GroupSpan Span, int R>
void row_dot_int4(const Int4Row& w, int64_t blocks, int64_t group_blocks, const QuantizedRows& xq, int64_t r0,
                  float* result) {
  __m512 acc[4];
  __m128 offset[4];
  for (int r = 0; r < 4; ++r) {
    acc[r] = _mm512_setzero_ps();
    offset[r] = _mm_setzero_ps();
  }
  for (int64_t b = 0; b < blocks; b += kGroup) {
    const Int4Step step = int4_step<Span>(w, b, std::min(kGroup, blocks - b), group_blocks);
    for (int r = 0; r < R; ++r) {
      const int64_t at = r0 + r;
      int4_step_row(step, xq.q.data() + at * xq.padded_k + b * kBlock, _mm_loadu_ps(xq.d.data() + at * xq.padded_blocks + b),
                    _mm_loadu_ps(xq.dsum.data() + at * xq.padded_blocks + b), acc[r], offset[r]);
    }
  }
  float sums[4];
  _mm_storeu_ps(sums, int4_sums(acc[0], acc[1], acc[2], acc[3], offset[0], offset[1], offset[2], offset[3]));
  for (int r = 0; r < R; ++r) result[r] = sums[r];
}

// kCols consecutive weight rows against R (1-2) rows of x: each step's x blocks loaded once for the four, one
// reduction for four weight rows' accumulators. result[r * kCols + c].
template <GroupSpan Span, int R>
void cols_dot_int4(const uint8_t* row0, int64_t row_bytes, int64_t k, int64_t group, int64_t group_blocks,
                   const QuantizedRows& xq, float* result) {
  constexpr int C = kCols;
  Int4Row w[C];
  __m512 acc[R][C];
  __m128 offset[R][C];
  for (int c = 0; c < C; ++c) w[c] = int4_row(row0 + c * row_bytes, k, group);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      acc[r][c] = _mm512_setzero_ps();
      offset[r][c] = _mm_setzero_ps();
    }
  const int64_t blocks = k / kBlock;
  for (int64_t b = 0; b < blocks; b += kGroup) {
    __m128 dx[R], dxsum[R];
    for (int r = 0; r < R; ++r) {
      dx[r] = _mm_loadu_ps(xq.d.data() + r * xq.padded_blocks + b);
      dxsum[r] = _mm_loadu_ps(xq.dsum.data() + r * xq.padded_blocks + b);
    }
    for (int c = 0; c < C; ++c) {
      const Int4Step step = int4_step<Span>(w[c], b, std::min(kGroup, blocks - b), group_blocks);
      for (int r = 0; r < R; ++r)
        int4_step_row(step, xq.q.data() + r * xq.padded_k + b * kBlock, dx[r], dxsum[r], acc[r][c], offset[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    _mm_storeu_ps(result + r * C, int4_sums(acc[r][0], acc[r][1], acc[r][2], acc[r][3], offset[r][0], offset[r][1],
                                            offset[r][2], offset[r][3]));
}

template <GroupSpan Span>
void row_dot_int4_rows(const Int4Row& w, int64_t blocks, int64_t group_blocks, const QuantizedRows& xq, int64_t r0,
                       int64_t r_count, float* result) {
  switch (r_count) {
    case 1: return row_dot_int4<Span, 1>(w, blocks, group_blocks, xq, r0, result);
    case 2: return row_dot_int4<Span, 2>(w, blocks, group_blocks, xq, r0, result);
    case 3: return row_dot_int4<Span, 3>(w, blocks, group_blocks, xq, r0, result);
    default: return row_dot_int4<Span, 4>(w, blocks, group_blocks, xq, r0, result);
  }
}

void cols_dot_int4_any(const uint8_t* row0, int64_t row_bytes, int64_t k, int64_t group, const QuantizedRows& xq,
                       int64_t rows, float* result) {
  const int64_t group_blocks = std::min(group, k) / kBlock;
  const auto run = [&](auto span) {
    constexpr GroupSpan S = decltype(span)::value;
    if (rows == 1) return cols_dot_int4<S, 1>(row0, row_bytes, k, group, group_blocks, xq, result);
    cols_dot_int4<S, 2>(row0, row_bytes, k, group, group_blocks, xq, result);
  };
  switch (group_blocks) {
    case 1: return run(std::integral_constant<GroupSpan, GroupSpan::kOne>{});
    case 2: return run(std::integral_constant<GroupSpan, GroupSpan::kTwo>{});
    default: return run(std::integral_constant<GroupSpan, GroupSpan::kWide>{});
  }
}

void row_dot_int4_any(const uint8_t* weight_row, int64_t k, int64_t group, const QuantizedRows& xq, int64_t r0,
                      int64_t r_count, float* result) {
  const int64_t blocks = k / kBlock, group_blocks = std::min(group, k) / kBlock;
  const Int4Row row = int4_row(weight_row, k, group);
  switch (group_blocks) {
    case 1: return row_dot_int4_rows<GroupSpan::kOne>(row, blocks, group_blocks, xq, r0, r_count, result);
    case 2: return row_dot_int4_rows<GroupSpan::kTwo>(row, blocks, group_blocks, xq, r0, r_count, result);
    default: return row_dot_int4_rows<GroupSpan::kWide>(row, blocks, group_blocks, xq, r0, r_count, result);
  }
}

template <typename T>
void run_int4_linear(const torch::Tensor& x, const torch::Tensor& w, int64_t group, const float* bias,
                     torch::Tensor& out) {
  const int64_t rows = x.size(0), k = x.size(1), row_bytes = w.size(1);
  const QuantizedRows xq = quantize_rows(x.data_ptr<T>(), rows, k, XOrder::kNibbles);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t n = w.size(0), ahead = prefetch_rows_ahead(row_bytes);
  const auto row_dot = [&](int64_t col, int64_t r0, int64_t r_count, float* result) {
    if (col + ahead < n) prefetch_row_l2(wp + (col + ahead) * row_bytes, row_bytes);
    row_dot_int4_any(wp + col * row_bytes, k, group, xq, r0, r_count, result);
  };
  if (rows > kInt4ColsMaxRows) return for_each_output(rows, n, bias, out.data_ptr<T>(), row_dot);
  for_each_output_by_cols(rows, n, bias, out.data_ptr<T>(), [&](int64_t col, float* result) {
    if (col + ahead + kCols <= n) prefetch_row_l2(wp + (col + ahead) * row_bytes, kCols * row_bytes);
    cols_dot_int4_any(wp + col * row_bytes, row_bytes, k, group, xq, rows, result);
  }, row_dot);
}
#else
template <typename T>
void run_int4_linear(const torch::Tensor& x, const torch::Tensor& w, int64_t group, const float* bias,
                     torch::Tensor& out) {
  const int64_t k = x.size(1), row_bytes = w.size(1);
  const T* xp = x.data_ptr<T>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  for_each_output(x.size(0), w.size(0), bias, out.data_ptr<T>(), [&](int64_t col, int64_t r0, int64_t r_count, float* result) {
    std::vector<float> wrow(k);
    dequantize_int4_row(wp + col * row_bytes, k, group, wrow.data());
    for (int64_t r = 0; r < r_count; ++r) {
      float total = 0.f;
      for (int64_t i = 0; i < k; ++i) total += wrow[i] * static_cast<float>(xp[(r0 + r) * k + i]);
      result[r] = total;
    }
  });
}
#endif

void check_int4_weight(const torch::Tensor& w, int64_t group, int64_t k, const char* fn) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(), fn,
              ": weight must be a contiguous uint8 [out_features, bytes per row] tensor of int4 rows");
  TORCH_CHECK(k % kBlock == 0, fn, ": in_features ", k, " is not a multiple of ", kBlock);
  TORCH_CHECK(group > 0 && group % kBlock == 0 && (group <= 2 * kBlock || group % (kGroup * kBlock) == 0 || group >= k),
              fn, ": group size ", group, " is not 32, 64, a multiple of 128 or the whole row (", k, ")");
  TORCH_CHECK(w.size(1) == int4_row_bytes(k, group), fn, ": weight rows hold ", w.size(1), " bytes, but ", k,
              " inputs in groups of ", group, " take ", int4_row_bytes(k, group));
}

}  // namespace

#if defined(PAGODA_VNNI)
void pagoda_quant::int4_row_dot(const uint8_t* row, int64_t k, int64_t group, const QuantizedRows& xq, int64_t r0,
                                int64_t r_count, float* result) {
  row_dot_int4_any(row, k, group, xq, r0, r_count, result);
}

void pagoda_quant::int4_cols_dot(const uint8_t* row0, int64_t row_bytes, int64_t k, int64_t group,
                                 const QuantizedRows& xq, int64_t rows, float* result) {
  cols_dot_int4_any(row0, row_bytes, k, group, xq, rows, result);
}
#endif

// x: [rows, in_features] fp32/bf16; w: [out_features, int4 row bytes] (see the file note); bias: [out_features]
// or None. Returns [rows, out_features] in x's dtype.
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor w, int64_t group_size, c10::optional<torch::Tensor> bias) {
  return quantized_linear(
      x, w, bias, "int4_linear", [&](int64_t k) { check_int4_weight(w, group_size, k, "int4_linear"); },
      [&](auto tag, const torch::Tensor& xc, const float* bp, torch::Tensor& out) {
        run_int4_linear<decltype(tag)>(xc, w, group_size, bp, out);
      });
}

// w as in int4_linear -> [rows, in_features] of `dtype` (fp32 or bf16).
torch::Tensor int4_dequantize(torch::Tensor w, int64_t group_size, int64_t in_features, at::ScalarType dtype) {
  check_int4_weight(w, group_size, in_features, "int4_dequantize");
  const uint8_t* wp = w.data_ptr<uint8_t>();
  return dequantized(w, in_features, dtype, "int4_dequantize", torch::Tensor(), [&](int64_t row, auto* out) {
    dequantize_int4_row(wp + row * w.size(1), in_features, group_size, out);
  });
}

#if defined(PAGODA_AMX)
namespace {

// int4 rows as amx_linear reads weights: block b lies in group b * 32 / G, w = scale * q - scale * zero.
struct Int4Blocks {
  const uint8_t* w;
  int64_t row_bytes, k, group;

  void unpack(int64_t col, int64_t b, uint8_t* codes) const { unpack_q4_block(w + col * row_bytes + b * 16, codes); }

  void params(int64_t col, int64_t b, float* d, float* m) const {
    const Int4Row v = int4_row(w + col * row_bytes, k, group);
    const int64_t g = b * kBlock / group;
    *d = half_to_float(v.scale[g]);
    *m = -*d * static_cast<float>(v.zero[g]);
  }
};

}  // namespace
#endif

// As int4_linear, through AMX int8 tiles (amx_tiles.h): for prompts.
torch::Tensor int4_linear_amx(torch::Tensor x, torch::Tensor w, int64_t group_size, c10::optional<torch::Tensor> bias) {
#if defined(PAGODA_AMX)
  return amx_quantized_linear(
      x, w, bias, "int4_linear_amx", [&](int64_t k) { check_int4_weight(w, group_size, k, "int4_linear_amx"); },
      [&](int64_t k) { return Int4Blocks{w.data_ptr<uint8_t>(), w.size(1), k, group_size}; });
#else
  TORCH_CHECK(false, "int4_linear_amx: these kernels were built without AMX int8 (amx_available() is false)");
  return {};
#endif
}
