// Linear layers on GGUF block-quantized weights: out[r, n] = x[r] . W[n] without a dequantized copy of W.
// Batch-1 decode is bound by reading the weights, so reading 4.5-8.5 bits a weight instead of bf16's 16 is
// the point. Types: Q4_0, Q4_1, Q8_0 (blocks of 32 weights with an fp16 scale, Q4_1 an fp16 offset too) and
// the K-quants Q4_K, Q5_K, Q6_K (super-blocks of 256 weights: 6-bit scales and mins per 32 for Q4_K/Q5_K,
// int8 scales per 16 for Q6_K, fp16 super-scales).
//
// Layout: Q4_0/Q4_1/Q8_0 weights are stored in panels of 16 output rows (quant_panels.h) and multiplied by
// panel_dot (panel_linear.cpp), whose vector lanes are 16 outputs. K-quant rows stay as stored: a
// super-block's quants are already 128 contiguous bytes, and their lanes are inputs.
//
// Each row of x is quantized on the fly to int8 blocks of 32 with an fp32 scale (as llama.cpp's Q8
// activations), and the products run as AVX-512 VNNI dot products (vpdpbusd: unsigned x signed bytes, four
// pairs summed into each int32 lane), scaled per block in fp32. A row's outputs do not depend on the rows
// beside it. Without VNNI a scalar path dequantizes each weight row and takes fp32 dot products. Where the CPU
// has AMX, large row counts (prompts) dequantize tiles of W to bf16 instead (gguf_dequantize) for the dense
// matmul (pagoda/model/layers/quantization/gguf.py decides).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "amx_tiles.h"
#include "quant_panels.h"
#include "quant_rows.h"

namespace {

using namespace pagoda_quant;

constexpr int64_t kSuperBlock = 256;  // weights per K-quant super-block

inline bool is_k_quant(int64_t qtype) { return qtype == kQ4_K || qtype == kQ5_K || qtype == kQ6_K; }
inline int64_t block_size(int64_t qtype) { return is_k_quant(qtype) ? kSuperBlock : kBlock; }

int64_t block_bytes(int64_t qtype) {
  switch (qtype) {
    // Q4_0: fp16 d, 16 bytes of nibbles, w = d * (q - 8); Q4_1: fp16 d, fp16 m, 16 bytes, w = d * q + m;
    // Q8_0: fp16 d, 32 int8, w = d * q (18, 20 and 34 bytes).
    case kQ4_0:
    case kQ4_1:
    case kQ8_0: return panel_quant_bytes(qtype) + panel_param_bytes(qtype);
    case kQ4_K: return 144;  // fp16 d, fp16 dmin, 12 bytes of scales/mins, 128 of nibbles: w = d sc q - dmin m
    case kQ5_K: return 176;  // as Q4_K, with 32 bytes of fifth bits before the nibbles
    case kQ6_K: return 210;  // 128 bytes low nibbles, 64 of high 2 bits, 16 int8 scales, fp16 d: w = d sc (q - 32)
  }
  TORCH_CHECK(false, "gguf kernels: GGML type ", qtype,
              " is not one of Q4_0 (2), Q4_1 (3), Q8_0 (8), Q4_K (12), Q5_K (13), Q6_K (14)");
  return 0;
}

// Q4_K/Q5_K's eight 6-bit sub-block scales and mins, packed in 12 bytes: bytes 0-3 hold scales 0-3 and the
// top bits of scales 4-7, bytes 4-7 mins 0-3 and the top bits of mins 4-7, bytes 8-11 the low nibbles of
// scales 4-7 (low) and mins 4-7 (high). Unpacked four at a time in 32-bit words: out[0..7] the scales,
// out[8..15] the mins.
inline void unpack_scales_k4(const uint8_t* q, uint8_t* out) {
  constexpr uint32_t six_bits = 0x3f3f3f3f, low_nibbles = 0x0f0f0f0f, two_bits = 0x03030303;
  uint32_t w[3];
  std::memcpy(w, q, 12);
  const uint32_t words[4] = {
      w[0] & six_bits,
      (w[2] & low_nibbles) | (((w[0] >> 6) & two_bits) << 4),
      w[1] & six_bits,
      ((w[2] >> 4) & low_nibbles) | (((w[1] >> 6) & two_bits) << 4),
  };
  std::memcpy(out, words, 16);
}

inline void unpack_scales_k4(const uint8_t* q, float* sc, float* m) {
  uint8_t packed[16];
  unpack_scales_k4(q, packed);
  for (int j = 0; j < 8; ++j) {
    sc[j] = packed[j];
    m[j] = packed[8 + j];
  }
}

// Where a K-quant super-block's parts start.
struct KBlockView {
  const uint8_t* qs;  // Q4_K/Q5_K: 128 bytes, chunk c's low nibbles are sub-block 2c, its high ones 2c + 1;
                      // Q6_K: 128 bytes of low nibbles (ql)
  const uint8_t* qh;  // Q5_K: bit 2c / 2c + 1 of byte l is element l's fifth bit in sub-block 2c / 2c + 1;
                      // Q6_K: 64 bytes of two-bit pairs
  const uint8_t* scales;
  float d, dmin;
};

inline KBlockView k_block_view(const uint8_t* blk, int64_t qtype) {
  if (qtype == kQ6_K) return {blk, blk + 128, blk + 192, load_half(blk + 208), 0.f};
  return {blk + (qtype == kQ5_K ? 48 : 16), blk + 16, blk + 4, load_half(blk), load_half(blk + 2)};
}

template <typename T>
void dequantize_row_k(const uint8_t* row, int64_t qtype, int64_t k, T* out) {
  const int64_t bytes = block_bytes(qtype);
  for (int64_t s = 0; s < k / kSuperBlock; ++s) {
    const KBlockView v = k_block_view(row + s * bytes, qtype);
    T* y = out + s * kSuperBlock;
    if (qtype == kQ6_K) {
      const auto* sc = reinterpret_cast<const int8_t*>(v.scales);
      for (int h = 0; h < 2; ++h) {
        const uint8_t* ql = v.qs + 64 * h;
        const uint8_t* qh = v.qh + 32 * h;
        const int8_t* hs = sc + 8 * h;
        T* yh = y + 128 * h;
        for (int l = 0; l < 32; ++l) {
          const int is = l / 16;
          yh[l] = static_cast<T>(v.d * hs[is] * (((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32));
          yh[l + 32] = static_cast<T>(v.d * hs[is + 2] * (((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32));
          yh[l + 64] = static_cast<T>(v.d * hs[is + 4] * (((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32));
          yh[l + 96] = static_cast<T>(v.d * hs[is + 6] * (((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32));
        }
      }
      continue;
    }
    float sc[8], m[8];
    unpack_scales_k4(v.scales, sc, m);
    for (int c = 0; c < 4; ++c) {
      const float d_lo = v.d * sc[2 * c], m_lo = v.dmin * m[2 * c];
      const float d_hi = v.d * sc[2 * c + 1], m_hi = v.dmin * m[2 * c + 1];
      for (int l = 0; l < 32; ++l) {
        int lo = v.qs[32 * c + l] & 0x0F, hi = v.qs[32 * c + l] >> 4;
        if (qtype == kQ5_K) {
          lo += (v.qh[l] >> (2 * c)) & 1 ? 16 : 0;
          hi += (v.qh[l] >> (2 * c + 1)) & 1 ? 16 : 0;
        }
        y[64 * c + l] = static_cast<T>(d_lo * lo - m_lo);
        y[64 * c + 32 + l] = static_cast<T>(d_hi * hi - m_hi);
      }
    }
  }
}

// Weight row `col` of a layer of n rows (panels for Q4_0 / Q4_1 / Q8_0, rows as stored for the K-quants).
template <typename T>
void dequantize_weight_row(const uint8_t* w, int64_t n, int64_t row_bytes, int64_t qtype, int64_t k, int64_t col,
                           T* out) {
  if (!is_panel_type(qtype)) return dequantize_row_k(w + col * row_bytes, qtype, k, out);
  dequantize_panel_row(panel_layer(w, n, row_bytes, qtype, k).panel(col / kPanel), col % kPanel, out);
}

#if defined(PAGODA_VNNI)
inline XOrder x_order(int64_t qtype) {
  if (qtype == kQ4_K || qtype == kQ5_K) return XOrder::kPairs;
  return XOrder::kNatural;
}

inline float hsum256(__m256 v) { return hsum128(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1))); }

// One K-quant weight row against R quantized rows of x, a super-block (256 weights) a step. A 64-byte load
// of quants holds 128 weights; its low and high nibbles (with Q5_K's fifth and Q6_K's two high bits added)
// go through two dot products, each lane of which lies in one sub-block: its scale is d * scale of the
// sub-block * the x block's scale.
template <int64_t QType, int R>
void row_dot_k_vnni(const uint8_t* row, int64_t superblocks, const QuantizedRows& xq, int64_t r0, float* result) {
  const int8_t* xrow[R];
  const float* dx[R];
  const float* dxsum[R];
  __m512 acc[R];
  __m256 offset[R];  // Q4_K/Q5_K: per sub-block lane, dmin * m times the x block's d * sum(q)
  for (int r = 0; r < R; ++r) {
    xrow[r] = xq.q.data() + (r0 + r) * xq.padded_k;
    dx[r] = xq.d.data() + (r0 + r) * xq.padded_blocks;
    dxsum[r] = xq.dsum.data() + (r0 + r) * xq.padded_blocks;
    acc[r] = _mm512_setzero_ps();
    offset[r] = _mm256_setzero_ps();
  }
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  const __m512i two_bits = _mm512_set1_epi8(0x03);
  const __m512i sixteen = _mm512_set1_epi8(16);
  const __m512i thirty_two = _mm512_set1_epi8(32);
  // Q4_K/Q5_K: the low nibbles' lanes 0-7 are sub-block 0 of the four a load covers, 8-15 sub-block 2; the
  // high nibbles' 1 and 3. Q6_K: lane l is in 16-weight sub-block l / 4 (low), 4 + l / 4 (high).
  const __m512i k4_lanes_lo = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i k4_lanes_hi = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i k6_lanes_lo = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const __m512i k6_lanes_hi = _mm512_set_epi32(7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4);
  const __m256i k6_x_blocks = _mm256_set_epi32(3, 3, 2, 2, 1, 1, 0, 0);  // 16-weight sub-block -> x block
  // Q5_K: which bit of the fifth-bit bytes belongs to each half of a load (chunks 2g and 2g + 1).
  // Q6_K: how far each half's two-bit pairs are shifted down (low nibbles: 0 and 2, high: 4 and 6).
  const __m512i q6_shift_lo = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1);
  const __m512i q6_shift_hi = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(6), 1);
  const int64_t bytes = block_bytes(QType);
  for (int64_t s = 0; s < superblocks; ++s) {
    const KBlockView v = k_block_view(row + s * bytes, QType);
    const int64_t xb = s * (kSuperBlock / kBlock);  // first x block of the super-block
    if constexpr (QType == kQ6_K) {
      const __m128i sc8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v.scales));
      const __m512 scales = _mm512_mul_ps(_mm512_set1_ps(v.d), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc8)));
      alignas(64) float scale_of[16];
      _mm512_store_ps(scale_of, scales);
      for (int h = 0; h < 2; ++h) {
        const __m512i ql = _mm512_loadu_si512(v.qs + 64 * h);
        const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v.qh + 32 * h)));
        const __m512i lo = _mm512_or_si512(_mm512_and_si512(ql, low_nibbles),
                                           _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, q6_shift_lo), two_bits), 4));
        const __m512i hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), low_nibbles),
                                           _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, q6_shift_hi), two_bits), 4));
        const __m256 sub_scales = _mm256_loadu_ps(scale_of + 8 * h);
        for (int r = 0; r < R; ++r) {
          const int8_t* xg = xrow[r] + (xb + 4 * h) * kBlock;
          const __m512i xa = _mm512_loadu_si512(xg), xc = _mm512_loadu_si512(xg + 64);
          // q is unsigned 0..63: dot(q - 32, x) = dot(q, x) - dot(32, x).
          const __m512i dot_lo = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xa),
                                                  _mm512_dpbusd_epi32(_mm512_setzero_si512(), thirty_two, xa));
          const __m512i dot_hi = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, xc),
                                                  _mm512_dpbusd_epi32(_mm512_setzero_si512(), thirty_two, xc));
          const __m256 x_scales = _mm256_permutexvar_ps(k6_x_blocks, _mm256_castps128_ps256(_mm_loadu_ps(dx[r] + xb + 4 * h)));
          const __m512 scale = _mm512_castps256_ps512(_mm256_mul_ps(sub_scales, x_scales));
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_lo), _mm512_permutexvar_ps(k6_lanes_lo, scale), acc[r]);
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_hi), _mm512_permutexvar_ps(k6_lanes_hi, scale), acc[r]);
        }
      }
    } else {
      alignas(16) uint8_t packed[16];
      unpack_scales_k4(v.scales, packed);
      const __m512 sc_m = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(packed))));
      alignas(32) float scale_of[8];
      _mm256_store_ps(scale_of, _mm256_mul_ps(_mm256_set1_ps(v.d), _mm512_castps512_ps256(sc_m)));
      const __m256 mins = _mm256_mul_ps(_mm256_set1_ps(v.dmin), _mm512_extractf32x8_ps(sc_m, 1));
      __m512i qh = _mm512_setzero_si512();
      if constexpr (QType == kQ5_K) qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v.qh)));
      for (int g = 0; g < 2; ++g) {
        const __m512i packed = _mm512_loadu_si512(v.qs + 64 * g);
        __m512i lo = _mm512_and_si512(packed, low_nibbles);
        __m512i hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low_nibbles);
        if constexpr (QType == kQ5_K) {
          // Chunk c's low nibbles take bit 2c of the fifth-bit bytes, its high ones bit 2c + 1.
          const char b_lo = static_cast<char>(1 << (4 * g)), b_lo2 = static_cast<char>(1 << (4 * g + 2));
          const char b_hi = static_cast<char>(1 << (4 * g + 1)), b_hi2 = static_cast<char>(1 << (4 * g + 3));
          const __m512i sel_lo = _mm512_inserti64x4(_mm512_set1_epi8(b_lo), _mm256_set1_epi8(b_lo2), 1);
          const __m512i sel_hi = _mm512_inserti64x4(_mm512_set1_epi8(b_hi), _mm256_set1_epi8(b_hi2), 1);
          lo = _mm512_mask_add_epi8(lo, _mm512_test_epi8_mask(qh, sel_lo), lo, sixteen);
          hi = _mm512_mask_add_epi8(hi, _mm512_test_epi8_mask(qh, sel_hi), hi, sixteen);
        }
        for (int r = 0; r < R; ++r) {
          const int8_t* xg = xrow[r] + (xb + 4 * g) * kBlock;
          const __m512i dot_lo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xg));
          const __m512i dot_hi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, _mm512_loadu_si512(xg + 64));
          const __m512 scale = _mm512_castps128_ps512(_mm_mul_ps(_mm_load_ps(scale_of + 4 * g), _mm_loadu_ps(dx[r] + xb + 4 * g)));
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_lo), _mm512_permutexvar_ps(k4_lanes_lo, scale), acc[r]);
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_hi), _mm512_permutexvar_ps(k4_lanes_hi, scale), acc[r]);
        }
      }
      for (int r = 0; r < R; ++r) offset[r] = _mm256_fmadd_ps(mins, _mm256_loadu_ps(dxsum[r] + xb), offset[r]);
    }
  }
  for (int r = 0; r < R; ++r) result[r] = _mm512_reduce_add_ps(acc[r]) - hsum256(offset[r]);
}

template <int64_t QType>
void row_dot_k_rows(const uint8_t* row, int64_t superblocks, const QuantizedRows& xq, int64_t r0, int64_t r_count,
                    float* result) {
  switch (r_count) {
    case 1: return row_dot_k_vnni<QType, 1>(row, superblocks, xq, r0, result);
    case 2: return row_dot_k_vnni<QType, 2>(row, superblocks, xq, r0, result);
    case 3: return row_dot_k_vnni<QType, 3>(row, superblocks, xq, r0, result);
    default: return row_dot_k_vnni<QType, 4>(row, superblocks, xq, r0, result);
  }
}

void row_dot_k_any(const uint8_t* row, int64_t qtype, int64_t k, const QuantizedRows& xq, int64_t r0,
                   int64_t r_count, float* result) {
  switch (qtype) {
    case kQ4_K: return row_dot_k_rows<kQ4_K>(row, k / kSuperBlock, xq, r0, r_count, result);
    case kQ5_K: return row_dot_k_rows<kQ5_K>(row, k / kSuperBlock, xq, r0, r_count, result);
    default: return row_dot_k_rows<kQ6_K>(row, k / kSuperBlock, xq, r0, r_count, result);
  }
}

#endif

template <typename T>
void run_linear(const torch::Tensor& x, const torch::Tensor& w, int64_t qtype, const float* bias, torch::Tensor& out) {
  const int64_t rows = x.size(0), k = x.size(1), row_bytes = w.size(1), n = w.size(0);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  if (is_panel_type(qtype)) {
    return panel_linear(x.data_ptr<T>(), rows, panel_layer(wp, n, row_bytes, qtype, k), bias, out.data_ptr<T>());
  }
#if defined(PAGODA_VNNI)
  const QuantizedRows xq = quantize_rows(x.data_ptr<T>(), rows, k, x_order(qtype));
  const int64_t ahead = prefetch_rows_ahead(row_bytes);
  for_each_output(rows, n, bias, out.data_ptr<T>(), [&](int64_t col, int64_t r0, int64_t r_count, float* result) {
    if (col + ahead < n) prefetch_row_l2(wp + (col + ahead) * row_bytes, row_bytes);
    row_dot_k_any(wp + col * row_bytes, qtype, k, xq, r0, r_count, result);
  });
#else
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> wrow(k);
    for (int64_t col = begin; col < end; ++col) {
      dequantize_row_k(wp + col * row_bytes, qtype, k, wrow.data());
      for (int64_t r = 0; r < rows; ++r) {
        float total = 0.f;
        for (int64_t i = 0; i < k; ++i) total += wrow[i] * static_cast<float>(xp[r * k + i]);
        op[r * n + col] = static_cast<T>(total + (bias ? bias[col] : 0.f));
      }
    }
  });
#endif
}

void check_weight(const torch::Tensor& w, int64_t qtype, int64_t k, const char* fn) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(), fn,
              ": weight must be a contiguous uint8 [out_features, bytes per row] tensor of GGUF blocks");
  const int64_t bs = block_size(qtype);
  TORCH_CHECK(k % bs == 0, fn, ": in_features ", k, " is not a multiple of the block size ", bs);
  TORCH_CHECK(w.size(1) == k / bs * block_bytes(qtype), fn, ": weight rows hold ", w.size(1), " bytes, but ", k,
              " inputs of GGML type ", qtype, " take ", k / bs * block_bytes(qtype));
}

}  // namespace

#if defined(PAGODA_VNNI)
XOrder pagoda_quant::gguf_x_order(int64_t qtype) { return x_order(qtype); }

void pagoda_quant::gguf_row_dot(const uint8_t* row, int64_t qtype, int64_t k, const QuantizedRows& xq, int64_t r0,
                                int64_t r_count, float* result) {
  row_dot_k_any(row, qtype, k, xq, r0, r_count, result);
}
#endif

// x: [rows, in_features] fp32/bf16; w: [out_features, in_features / block * block bytes] uint8, GGUF blocks
// (Q4_0 / Q4_1 / Q8_0 in panels, see the file note); bias: [out_features] or None. Returns [rows, out_features]
// in x's dtype.
torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor w, int64_t qtype, c10::optional<torch::Tensor> bias) {
  return quantized_linear(
      x, w, bias, "gguf_linear", [&](int64_t k) { check_weight(w, qtype, k, "gguf_linear"); },
      [&](auto tag, const torch::Tensor& xc, const float* bp, torch::Tensor& out) {
        run_linear<decltype(tag)>(xc, w, qtype, bp, out);
      });
}

// w as in gguf_linear -> its rows `rows` (int64 indices; None: all) as [rows, in_features] of `dtype` (fp32 or
// bf16).
torch::Tensor gguf_dequantize(torch::Tensor w, int64_t qtype, int64_t in_features, at::ScalarType dtype,
                              c10::optional<torch::Tensor> rows) {
  check_weight(w, qtype, in_features, "gguf_dequantize");
  const uint8_t* wp = w.data_ptr<uint8_t>();
  return dequantized(w, in_features, dtype, "gguf_dequantize", rows.value_or(torch::Tensor()),
                     [&](int64_t row, auto* out) {
                       dequantize_weight_row(wp, w.size(0), w.size(1), qtype, in_features, row, out);
                     });
}

bool amx_available() {
#if defined(PAGODA_AMX)
  return amx_permitted();
#else
  return false;
#endif
}

// As gguf_linear for Q4_0 / Q4_1 / Q8_0 rows, through AMX int8 tiles (amx_tiles.h): for prompts, where
// gguf_linear's one-row-at-a-time dot products would be compute-bound, and for Q4_0 / Q4_1 steps of a few
// rows (up to 16: a token and its drafts, decode batches) through tiles of exactly those rows (amx_q4_rows).
torch::Tensor gguf_linear_amx(torch::Tensor x, torch::Tensor w, int64_t qtype, c10::optional<torch::Tensor> bias) {
#if defined(PAGODA_AMX)
  TORCH_CHECK(qtype == kQ4_0 || qtype == kQ4_1 || qtype == kQ8_0, "gguf_linear_amx: GGML type ", qtype,
              " is not one of Q4_0 (2), Q4_1 (3), Q8_0 (8)");
  if (qtype != kQ8_0 && x.dim() == 2 && x.size(0) <= kTile) {  // a few rows: tiles of exactly those rows
    TORCH_CHECK(amx_permitted(), "gguf_linear_amx: the kernel did not grant this process AMX tile state");
    return quantized_linear(
        x, w, bias, "gguf_linear_amx", [&](int64_t k) { check_weight(w, qtype, k, "gguf_linear_amx"); },
        [&](auto tag, const torch::Tensor& xc, const float* bp, torch::Tensor& out) {
          using T = decltype(tag);
          const QuantizedRows xq = quantize_rows(xc.data_ptr<T>(), xc.size(0), xc.size(1), XOrder::kNatural);
          amx_q4_rows(panel_layer(w.data_ptr<uint8_t>(), w.size(0), w.size(1), qtype, xc.size(1)), xq, xc.size(0), bp,
                      out.data_ptr<T>());
        });
  }
  return amx_quantized_linear(
      x, w, bias, "gguf_linear_amx", [&](int64_t k) { check_weight(w, qtype, k, "gguf_linear_amx"); },
      [&](int64_t k) { return panel_layer(w.data_ptr<uint8_t>(), w.size(0), w.size(1), qtype, k); });
#else
  TORCH_CHECK(false, "gguf_linear_amx: these kernels were built without AMX int8 (amx_available() is false)");
  return {};
#endif
}
