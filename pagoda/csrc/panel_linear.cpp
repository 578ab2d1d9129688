// The kernels on weights in panels of 16 rows (quant_panels.h): GGUF Q4_0 / Q4_1 / Q8_0 (gguf_linear.cpp) and
// group-wise int4 (int4_linear.cpp), for every row count of x (decode, drafts to verify, prompts), the one-call
// decode (decode_layers.cpp) and batch-invariant mode alike.
//
// Each row of x is quantized to int8 blocks of 32 with an fp32 scale (as llama.cpp's Q8 activations). A block's
// eight 64-byte loads of 16 rows' words (4-bit types: four loads' low and high nibbles) meet x's bytes four at
// a time broadcast in AVX-512 VNNI dot products (vpdpbusd: unsigned codes x signed x, four pairs summed into
// each int32 lane): 16 outputs' int32 sums, scaled in fp32 by d times x's scale, and the block's offsets m
// times x's d * sum(q). Every output sums its blocks in order, one multiply-add for the scale and one for the
// offset per block, whatever the number of rows of x: a row's outputs do not depend on the rows beside it
// (nor on AMX tiles, amx_tiles.h, which scale alike).
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "quant_panels.h"
#include "quant_rows.h"

namespace pagoda_quant {
namespace {

// Each block's words gathered back into the row's codes, then w = d * code + m sixteen at a time (prompts on
// AMX CPUs dequantize every layer's tiles: a scalar loop was a quarter of a 128-token prompt's time).
template <typename T>
void dequantize_row(const Panel& p, int64_t c, T* out) {
  for (int64_t b = 0; b < p.blocks; ++b) {
    float d, m;
    p.params(c, b, &d, &m);
    T* o = out + b * kBlock;
#if defined(__AVX512F__)
    const auto word = [&](int64_t t) {
      int32_t bits;
      std::memcpy(&bits, p.words(b, t) + 4 * c, 4);
      return bits;
    };
    __m512 first, last;  // codes 0-15 and 16-31 as fp32
    if (p.qtype == kQ8_0) {
      first = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_setr_epi32(word(0), word(1), word(2), word(3))));
      last = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_setr_epi32(word(4), word(5), word(6), word(7))));
    } else {
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_setr_epi32(word(0), word(1), word(2), word(3)));
      first = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(0x0F)));
      last = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
    }
    const __m512 vd = _mm512_set1_ps(d);
    if (p.qtype == kInt4) {  // (q - zero) exactly, then one rounding: as the torch path computes it, bit for bit
      const __m512 zero = _mm512_set1_ps(static_cast<float>(p.zeros(b)[c]));
      pagoda::store16(o, _mm512_mul_ps(vd, _mm512_sub_ps(first, zero)));
      pagoda::store16(o + 16, _mm512_mul_ps(vd, _mm512_sub_ps(last, zero)));
    } else {
      const __m512 vm = _mm512_set1_ps(m);
      pagoda::store16(o, _mm512_fmadd_ps(vd, first, vm));
      pagoda::store16(o + 16, _mm512_fmadd_ps(vd, last, vm));
    }
#else
    uint8_t codes[kBlock];
    p.codes(c, b, codes);
    const float zero = p.qtype == kInt4 ? static_cast<float>(p.zeros(b)[c]) : 0.f;
    for (int j = 0; j < kBlock; ++j) {
      o[j] = static_cast<T>(p.qtype == kInt4 ? d * (codes[j] - zero) : std::fma(d, static_cast<float>(codes[j]), m));
    }
#endif
  }
}

#if defined(PAGODA_VNNI)
// Word t of every row of a panel's block, as 16 lanes (a narrower panel: masked, the missing lanes zeros).
template <bool Full>
inline __m512i load_words(const uint8_t* p, __mmask16 mask) {
  if constexpr (Full) return _mm512_loadu_si512(p);
  return _mm512_maskz_loadu_epi32(mask, p);
}

template <bool Full>
inline __m512 load_halves16(const uint8_t* p, __mmask16 mask) {
  if constexpr (Full) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
}

template <bool Full>
inline __m512 load_bytes16(const uint8_t* p, __mmask16 mask) {
  const __m128i bytes = Full ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)) : _mm_maskz_loadu_epi8(mask, p);
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
}

inline __m512i broadcast_word(const int8_t* p) {
  int32_t bits;
  std::memcpy(&bits, p, 4);
  return _mm512_set1_epi32(bits);
}

// One panel against R rows of x from r0, walking its bytes in order: group by group (GGUF: block by block), a
// group's d and m loaded once, its blocks' eight words of 16 rows (4-bit types: four loads' low and high
// nibbles) against x's four bytes at a time broadcast, in two chains of four dot products.
template <int64_t QType, int R, bool Full>
void panel_dot_rows(const Panel& p, const QuantizedRows& xq, int64_t r0, float* result) {
  const __mmask16 mask = static_cast<__mmask16>((1u << p.width) - 1);
  const int8_t* xrow[R];
  const float* dx[R];
  const float* dxsum[R];
  __m512 acc[R];
  for (int r = 0; r < R; ++r) {
    xrow[r] = xq.q.data() + (r0 + r) * xq.padded_k;
    dx[r] = xq.d.data() + (r0 + r) * xq.padded_blocks;
    dxsum[r] = xq.dsum.data() + (r0 + r) * xq.padded_blocks;
    acc[r] = _mm512_setzero_ps();
  }
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  const int64_t block_stride = panel_quant_bytes(QType) * p.width;
  const uint8_t* at = p.base;
  for (int64_t b = 0; b < p.blocks;) {
    // (GGUF's groups are single blocks: a constant, so that the loop below is no loop.)
    const int64_t count = QType == kInt4 ? std::min(p.group_blocks, p.blocks - b) : 1;
    const uint8_t* params = at + count * block_stride;
    // The bytes kPrefetchBytes ahead requested into L2 group by group, on the first pass (at batch 1 the
    // panels stream from DRAM). Past a layer's end this names other memory: a prefetch never faults.
    if (r0 == 0) prefetch_row_l2(at + kPrefetchBytes, count * block_stride + panel_param_bytes(QType) * p.width);
    const __m512 d = load_halves16<Full>(params, mask);
    __m512 m;
    if constexpr (QType == kQ4_1) {
      m = load_halves16<Full>(params + 2 * p.width, mask);
    } else if constexpr (QType == kInt4) {
      m = _mm512_mul_ps(d, _mm512_sub_ps(_mm512_setzero_ps(), load_bytes16<Full>(params + 2 * p.width, mask)));
    } else {
      m = _mm512_mul_ps(d, _mm512_set1_ps(panel_offset_factor(QType)));
    }
    for (const int64_t end = b + count; b < end; ++b, at += block_stride) {
      // w[t]: inputs 4t .. 4t + 3 of each row (4-bit types: words 0-3's low nibbles, then their high nibbles).
      __m512i w[8];
      if constexpr (QType == kQ8_0) {
        for (int t = 0; t < 8; ++t) w[t] = load_words<Full>(at + 4 * t * p.width, mask);
      } else {
        for (int t = 0; t < 4; ++t) {
          const __m512i packed = load_words<Full>(at + 4 * t * p.width, mask);
          w[t] = _mm512_and_si512(packed, low_nibbles);
          w[t + 4] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low_nibbles);
        }
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* xb = xrow[r] + b * kBlock;
        __m512i first = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], broadcast_word(xb));
        __m512i last = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[4], broadcast_word(xb + 16));
        for (int t = 1; t < 4; ++t) {
          first = _mm512_dpbusd_epi32(first, w[t], broadcast_word(xb + 4 * t));
          last = _mm512_dpbusd_epi32(last, w[t + 4], broadcast_word(xb + 16 + 4 * t));
        }
        const __m512 sums = _mm512_cvtepi32_ps(_mm512_add_epi32(first, last));
        acc[r] = _mm512_fmadd_ps(sums, _mm512_mul_ps(d, _mm512_set1_ps(dx[r][b])), acc[r]);
        acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(dxsum[r][b]), acc[r]);
      }
    }
    at = params + panel_param_bytes(QType) * p.width;
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(result + r * kPanel, acc[r]);
}

template <int64_t QType, bool Full>
void panel_dot_count(const Panel& p, const QuantizedRows& xq, int64_t r0, int64_t rows, float* result) {
  switch (rows) {
    case 1: return panel_dot_rows<QType, 1, Full>(p, xq, r0, result);
    case 2: return panel_dot_rows<QType, 2, Full>(p, xq, r0, result);
    case 3: return panel_dot_rows<QType, 3, Full>(p, xq, r0, result);
    case 4: return panel_dot_rows<QType, 4, Full>(p, xq, r0, result);
    case 5: return panel_dot_rows<QType, 5, Full>(p, xq, r0, result);
    case 6: return panel_dot_rows<QType, 6, Full>(p, xq, r0, result);
    case 7: return panel_dot_rows<QType, 7, Full>(p, xq, r0, result);
    default: return panel_dot_rows<QType, 8, Full>(p, xq, r0, result);
  }
}

template <int64_t QType>
void panel_dot_type(const Panel& p, const QuantizedRows& xq, int64_t r0, int64_t rows, float* result) {
  if (p.width == kPanel) return panel_dot_count<QType, true>(p, xq, r0, rows, result);
  panel_dot_count<QType, false>(p, xq, r0, rows, result);
}
#endif

}  // namespace

void dequantize_panel_row(const Panel& p, int64_t c, float* out) { dequantize_row(p, c, out); }
void dequantize_panel_row(const Panel& p, int64_t c, c10::BFloat16* out) { dequantize_row(p, c, out); }

#if defined(PAGODA_VNNI)
void panel_dot(const Panel& p, const QuantizedRows& xq, int64_t r0, int64_t rows, float* result) {
  switch (p.qtype) {
    case kQ4_0: return panel_dot_type<kQ4_0>(p, xq, r0, rows, result);
    case kQ4_1: return panel_dot_type<kQ4_1>(p, xq, r0, rows, result);
    case kQ8_0: return panel_dot_type<kQ8_0>(p, xq, r0, rows, result);
    default: return panel_dot_type<kInt4>(p, xq, r0, rows, result);
  }
}
#endif

}  // namespace pagoda_quant
