// Prompt-sized products on quantized weights through AMX int8 tiles, without a dequantized copy of the weights:
// each 16 x 32 block of x (quantized to int8 per 32, as for the VNNI kernels) times the same block of 16
// weight rows unpacked to unsigned bytes, one tile product (tdpbsud) per block, its int32 sums then scaled in
// fp32 by the weight block's and the x block's scales. Every weight layout Pagoda runs has a scale d and an
// offset m per 32 weights, w = d * q + m with q the stored unsigned code (Q4_0: m = -8 d; Q8_0's codes are
// stored plus 128: m = -128 d; int4: m = -d * zero of the block's group), so x . w = sum over blocks of
// d dx dot(xq, q) + m dx sum(xq).
//
// A layer's weight rows are unpacked once per 16 of them into the tiles' VNNI order (four consecutive codes
// of a row per 32-bit word) and then serve every 16 rows of x. Each row's outputs depend on that row alone.
#pragma once

#include "quant_panels.h"
#include "quant_rows.h"

#if defined(PAGODA_VNNI) && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define PAGODA_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

namespace pagoda_quant {

// Linux lets a process use the tile registers only once it asks (arch_prctl ARCH_REQ_XCOMP_PERM for
// XTILEDATA); asked once, the answer holds for every thread.
inline bool amx_permitted() {
  static const bool permitted = [] {
    constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return permitted;
}

constexpr int64_t kTile = 16;  // rows of x, and weight rows, per tile product
constexpr int64_t kPackedBlockBytes = kTile * kBlock;  // one block of 16 weight rows in VNNI order

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// This thread's tiles: 0 and 1 hold `x_rows` (at most 16) rows of x by one block (32 int8), 6 and 7 one block
// of 16 weight rows in VNNI order (8 rows of 16 x 4 codes), 2-5 the x_rows x 16 int32 products of four blocks:
// four independent products in flight before the first is read back.
inline void configure_tiles(int64_t x_rows = kTile) {
  TileConfig config;
  for (int x_tile : {0, 1}) {
    config.rows[x_tile] = static_cast<uint8_t>(x_rows);
    config.colsb[x_tile] = kBlock;
  }
  for (int w_tile : {6, 7}) {
    config.rows[w_tile] = kBlock / 4;
    config.colsb[w_tile] = kTile * 4;
  }
  for (int sum_tile = 2; sum_tile <= 5; ++sum_tile) {
    config.rows[sum_tile] = static_cast<uint8_t>(x_rows);
    config.colsb[sum_tile] = kTile * 4;
  }
  _tile_loadconfig(&config);
}

constexpr int64_t kSums = kTile * kTile;  // int32 products of one block-tile

// The int32 sums of `count` (1-4) consecutive blocks from b: x tile rows at x (stride x_stride bytes), weight
// tiles packed from w, into sums[i * kSums ..] (rows of 16 int32, as many as the x tiles were configured with).
inline void block_sums(const int8_t* x, int64_t x_stride, const uint8_t* w, int count, int32_t* sums) {
  constexpr int64_t w_stride = kTile * 4;
  _tile_loadd(0, x, x_stride);
  _tile_loadd(6, w, w_stride);
  _tile_zero(2);
  _tile_dpbsud(2, 0, 6);
  if (count > 1) {
    _tile_loadd(1, x + kBlock, x_stride);
    _tile_loadd(7, w + kPackedBlockBytes, w_stride);
    _tile_zero(3);
    _tile_dpbsud(3, 1, 7);
  }
  if (count > 2) {
    _tile_loadd(0, x + 2 * kBlock, x_stride);
    _tile_loadd(6, w + 2 * kPackedBlockBytes, w_stride);
    _tile_zero(4);
    _tile_dpbsud(4, 0, 6);
  }
  if (count > 3) {
    _tile_loadd(1, x + 3 * kBlock, x_stride);
    _tile_loadd(7, w + 3 * kPackedBlockBytes, w_stride);
    _tile_zero(5);
    _tile_dpbsud(5, 1, 7);
  }
  _tile_stored(2, sums, w_stride);
  if (count > 1) _tile_stored(3, sums + kSums, w_stride);
  if (count > 2) _tile_stored(4, sums + 2 * kSums, w_stride);
  if (count > 3) _tile_stored(5, sums + 3 * kSums, w_stride);
}

// out[r, c0 + c] = acc[r][c] + bias[c0 + c] for r < rows, c < cols (a tile's last columns may be missing).
template <typename T>
void store_outputs(const __m512* acc, int64_t rows, const float* bias, int64_t c0, int64_t cols, int64_t n, T* out) {
  const __mmask16 col_mask = cols >= kTile ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << cols) - 1);
  const __m512 vb = bias != nullptr ? _mm512_maskz_loadu_ps(col_mask, bias + c0) : _mm512_setzero_ps();
  alignas(64) float tail[kTile];
  for (int64_t r = 0; r < rows; ++r) {
    T* dst = out + r * n + c0;
    const __m512 v = _mm512_add_ps(acc[r], vb);
    if (cols == kTile) {
      pagoda::store16(dst, v);
    } else {
      _mm512_store_ps(tail, v);
      for (int64_t c = 0; c < cols; ++c) dst[c] = static_cast<T>(tail[c]);
    }
  }
}

// out[r, c] = x[r] . W[c] + bias[c] for x [rows, k] (fp32 or bf16), W of n rows described by `source`:
//   source.unpack(c, b, uint8_t* codes32)  block b of weight row c as 32 unsigned codes, in order;
//   source.params(c, b, float* d, float* m)  that block's scale and offset.
template <typename T, typename Source>
void amx_linear(const T* x, int64_t rows, int64_t k, int64_t n, const float* bias, T* out, const Source& source) {
  const int64_t blocks = k / kBlock;
  QuantizedRows xq = quantize_rows(x, rows, k, XOrder::kNatural);
  // Whole tiles of x: the rows past the last read as zeros, their outputs dropped.
  const int64_t padded_rows = (rows + kTile - 1) / kTile * kTile;
  xq.q.resize(padded_rows * xq.padded_k, 0);
  xq.d.resize(padded_rows * xq.padded_blocks, 0.f);
  xq.dsum.resize(padded_rows * xq.padded_blocks, 0.f);
  const int64_t n_tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    std::vector<uint8_t> packed(blocks * kPackedBlockBytes);
    std::vector<float> dw(blocks * kTile), mw(blocks * kTile);
    alignas(64) uint8_t codes[kTile][kBlock];
    alignas(64) int32_t sums[4 * kSums];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c0 = t * kTile, cols = std::min(kTile, n - c0);
      for (int64_t b = 0; b < blocks; ++b) {
        for (int64_t c = 0; c < kTile; ++c) {
          if (c < cols) {
            source.unpack(c0 + c, b, codes[c]);
            source.params(c0 + c, b, &dw[b * kTile + c], &mw[b * kTile + c]);
          } else {
            std::memset(codes[c], 0, kBlock);
            dw[b * kTile + c] = mw[b * kTile + c] = 0.f;
          }
        }
        // VNNI order: word c of packed row j holds codes 4j .. 4j + 3 of weight row c.
        auto* words = reinterpret_cast<uint32_t*>(packed.data() + b * kPackedBlockBytes);
        for (int64_t j = 0; j < kBlock / 4; ++j) {
          for (int64_t c = 0; c < kTile; ++c) std::memcpy(&words[j * kTile + c], &codes[c][4 * j], 4);
        }
      }
      for (int64_t r0 = 0; r0 < padded_rows; r0 += kTile) {
        __m512 acc[kTile];
        for (auto& a : acc) a = _mm512_setzero_ps();
        for (int64_t b0 = 0; b0 < blocks; b0 += 4) {
          const int count = static_cast<int>(std::min<int64_t>(4, blocks - b0));
          block_sums(xq.q.data() + r0 * xq.padded_k + b0 * kBlock, xq.padded_k, packed.data() + b0 * kPackedBlockBytes,
                     count, sums);
          for (int i = 0; i < count; ++i) {
            const int64_t b = b0 + i;
            const __m512 vd = _mm512_loadu_ps(&dw[b * kTile]), vm = _mm512_loadu_ps(&mw[b * kTile]);
            for (int64_t r = 0; r < kTile; ++r) {
              const int64_t at = (r0 + r) * xq.padded_blocks + b;
              const __m512 block = _mm512_cvtepi32_ps(_mm512_load_si512(sums + i * kSums + r * kTile));
              acc[r] = _mm512_fmadd_ps(block, _mm512_mul_ps(vd, _mm512_set1_ps(xq.d[at])), acc[r]);
              acc[r] = _mm512_fmadd_ps(vm, _mm512_set1_ps(xq.dsum[at]), acc[r]);
            }
          }
        }
        store_outputs(acc, std::min(kTile, rows - r0), bias, c0, cols, n, out + r0 * n);
      }
    }
    _tile_release();
  });
}

// Four Q4 blocks (b0 .. b0 + 3) of a GGUF panel (quant_panels.h) into the weight tiles' VNNI order, and their scales
// and offsets per block as 16 lanes. A panel's words already are that order: packed row j of block i is word j
// of every row (low nibbles), packed row j + 4 the same words' high nibbles. A narrower panel or fewer than
// four blocks: the missing ones read as zeros.
inline void pack_q4_blocks(const Panel& p, int64_t b0, int count, uint8_t* packed, __m512 d[4], __m512 m[4]) {
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  const __mmask16 mask = static_cast<__mmask16>((1u << p.width) - 1);
  for (int i = 0; i < 4; ++i) {
    uint8_t* block = packed + i * kPackedBlockBytes;
    if (i >= count) {
      std::memset(block, 0, kPackedBlockBytes);
      d[i] = m[i] = _mm512_setzero_ps();
      continue;
    }
    for (int j = 0; j < 4; ++j) {
      const __m512i words = _mm512_maskz_loadu_epi32(mask, p.words(b0 + i, j));
      _mm512_store_si512(block + 64 * j, _mm512_and_si512(words, low_nibbles));
      _mm512_store_si512(block + 64 * (j + 4), _mm512_and_si512(_mm512_srli_epi16(words, 4), low_nibbles));
    }
    d[i] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p.scales(b0 + i)));
    m[i] = p.qtype == kQ4_1 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p.offsets(b0 + i)))
                            : _mm512_mul_ps(d[i], _mm512_set1_ps(panel_offset_factor(p.qtype)));
  }
}

// out[r, c] = x[r] . W[c] (+ bias[c]) for a few rows of x (1-16: a decode batch, a token and its drafts) on
// Q4_0 / Q4_1 panels (quant_panels.h), through tiles configured for exactly those rows: each panel's blocks
// are packed four at a time (pack_q4_blocks), multiplied, and the int32 sums of each block scaled into
// 16 output lanes per row. xq: the rows quantized in natural order. Each row's outputs depend on that row alone.
template <typename T>
void amx_q4_rows(const PanelLayer& layer, const QuantizedRows& xq, int64_t rows, const float* bias, T* out) {
  const int64_t blocks = layer.k / kBlock, n_tiles = layer.panels(), n = layer.n;
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    configure_tiles(rows);
    alignas(64) uint8_t packed[4 * kPackedBlockBytes];
    alignas(64) int32_t sums[4 * kSums];
    __m512 d[4], m[4];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c0 = t * kTile, cols = std::min(kTile, n - c0);
      const Panel panel = layer.panel(t);
      // The panel after the next requested while this one is multiplied: it would otherwise wait on memory (a
      // decode step streams the model's weights).
      if (t + 2 < end) {
        const Panel later = layer.panel(t + 2);
        prefetch_row(later.base, later.width * layer.row_bytes);
      }
      __m512 acc[kTile];
      for (int64_t r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t b0 = 0; b0 < blocks; b0 += 4) {
        const int count = static_cast<int>(std::min<int64_t>(4, blocks - b0));
        pack_q4_blocks(panel, b0, count, packed, d, m);
        block_sums(xq.q.data() + b0 * kBlock, xq.padded_k, packed, count, sums);
        for (int i = 0; i < count; ++i) {
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t at = r * xq.padded_blocks + b0 + i;
            const __m512 block = _mm512_cvtepi32_ps(_mm512_load_si512(sums + i * kSums + r * kTile));
            acc[r] = _mm512_fmadd_ps(block, _mm512_mul_ps(d[i], _mm512_set1_ps(xq.d[at])), acc[r]);
            acc[r] = _mm512_fmadd_ps(m[i], _mm512_set1_ps(xq.dsum[at]), acc[r]);
          }
        }
      }
      store_outputs(acc, rows, bias, c0, cols, n, out);
    }
    _tile_release();
  });
}

// A layer's entry point (gguf_linear_amx, int4_linear_amx): quantized_linear's checks and output, the weights
// read through make_source(in_features).
template <typename Check, typename MakeSource>
torch::Tensor amx_quantized_linear(torch::Tensor x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias,
                                   const char* fn, const Check& check, const MakeSource& make_source) {
  TORCH_CHECK(amx_permitted(), fn, ": the kernel did not grant this process AMX tile state");
  return quantized_linear(x, w, bias, fn, check, [&](auto tag, const torch::Tensor& xc, const float* bp, torch::Tensor& out) {
    using T = decltype(tag);
    amx_linear(xc.data_ptr<T>(), xc.size(0), xc.size(1), w.size(0), bp, out.data_ptr<T>(), make_source(xc.size(1)));
  });
}

}  // namespace pagoda_quant
#endif  // PAGODA_AMX
