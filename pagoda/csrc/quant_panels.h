// Quantized weights with a scale per block of 32 or per group of blocks, as the CPU kernels store them: panels
// of 16 output rows. Types: GGUF Q4_0 / Q4_1 / Q8_0 (an fp16 scale d per block, Q4_1 an fp16 offset m too) and
// Pagoda's group-wise int4 (--quantization int4, GPTQ, AWQ: an fp16 scale and a uint8 zero per group of G
// inputs, w = d * (q - zero)).
//
// A layer's rows are taken 16 at a time (its last panel may be narrower: `width` rows) and each panel's bytes
// are laid out group by group (GGUF: a group is one block), each group's blocks first and then its parameters.
// A block (32 inputs) is its quants as 32-bit words, word t of every row of the panel side by side (4-bit
// types: 4 words a row, word t holding codes 4t .. 4t + 3 in its low nibbles and 16 + 4t .. 16 + 4t + 3 in its
// high ones, as GGUF's bytes do; Q8_0: 8 words, codes 4t .. 4t + 3 stored plus 128). The parameters are the
// rows' fp16 scales d, then Q4_1's fp16 offsets m or int4's uint8 zeros. A 64-byte load then holds the same
// four inputs' codes of 16 output rows: one VNNI dot product against four of x's bytes broadcast gives 16
// outputs' partial sums, so a block's scale is applied once per 16 outputs (lanes are outputs) instead of once
// per block of each row, and the words are what AMX's weight tiles take.
//
// A panel of width P holds P times a row's bytes, so the tensor keeps its [rows, row bytes] shape and a slice
// of whole panels (every 16th row) is a layer of its own. The layout is made at load from rows of the same
// bytes (pagoda/model/layers/quantization/panels.py). The kernels are in panel_linear.cpp.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "quant_rows.h"

namespace pagoda_quant {

constexpr int64_t kPanel = 16;  // output rows per panel

inline bool is_panel_type(int64_t qtype) { return qtype == kQ4_0 || qtype == kQ4_1 || qtype == kQ8_0 || qtype == kInt4; }

// Bytes of one row's quants per block, and of its parameters per group.
constexpr int64_t panel_quant_bytes(int64_t qtype) { return qtype == kQ8_0 ? 32 : 16; }
constexpr int64_t panel_param_bytes(int64_t qtype) { return qtype == kQ4_1 ? 4 : qtype == kInt4 ? 3 : 2; }

// w = d * code + m for a block's unsigned codes: Q4_0's offset is -8 d, Q8_0's (codes stored plus 128) -128 d.
inline float panel_offset_factor(int64_t qtype) { return qtype == kQ4_0 ? -8.f : -128.f; }

struct Panel {
  const uint8_t* base;
  int64_t width, qtype;
  int64_t blocks;        // of 32 inputs in a row
  int64_t group_blocks;  // blocks sharing one set of parameters (GGUF: 1; the last group may have fewer)

  int64_t blocks_in(int64_t g) const { return std::min(group_blocks, blocks - g * group_blocks); }
  int64_t group_bytes(int64_t g) const {
    return width * (blocks_in(g) * panel_quant_bytes(qtype) + panel_param_bytes(qtype));
  }
  // Group g's first block (every group before it is whole).
  const uint8_t* group(int64_t g) const {
    return base + g * width * (group_blocks * panel_quant_bytes(qtype) + panel_param_bytes(qtype));
  }
  // Word t of every row of block b (4 * width bytes).
  const uint8_t* words(int64_t b, int64_t t) const {
    return group(b / group_blocks) + ((b % group_blocks) * panel_quant_bytes(qtype) + 4 * t) * width;
  }
  // The parameters of the group holding block b: the rows' fp16 scales, Q4_1's fp16 offsets, int4's zeros.
  const uint16_t* scales(int64_t b) const {
    const int64_t g = b / group_blocks;
    return reinterpret_cast<const uint16_t*>(group(g) + blocks_in(g) * panel_quant_bytes(qtype) * width);
  }
  const uint16_t* offsets(int64_t b) const { return scales(b) + width; }
  const uint8_t* zeros(int64_t b) const { return reinterpret_cast<const uint8_t*>(scales(b) + width); }

  // Row c's block b: its 32 unsigned codes in order, and d, m with w = d * code + m.
  void codes(int64_t c, int64_t b, uint8_t* out) const {
    if (qtype == kQ8_0) {
      for (int64_t t = 0; t < 8; ++t) std::memcpy(out + 4 * t, words(b, t) + 4 * c, 4);
      return;
    }
    for (int64_t t = 0; t < 4; ++t) {
      const uint8_t* word = words(b, t) + 4 * c;
      for (int64_t i = 0; i < 4; ++i) {
        out[4 * t + i] = word[i] & 0x0F;
        out[16 + 4 * t + i] = word[i] >> 4;
      }
    }
  }

  void params(int64_t c, int64_t b, float* d, float* m) const {
    *d = half_to_float(scales(b)[c]);
    if (qtype == kQ4_1) {
      *m = half_to_float(offsets(b)[c]);
    } else if (qtype == kInt4) {
      *m = -*d * static_cast<float>(zeros(b)[c]);
    } else {
      *m = panel_offset_factor(qtype) * *d;
    }
  }
};

// A layer of n rows of row_bytes each, k inputs, in panels; group_blocks as in Panel.
struct PanelLayer {
  const uint8_t* w;
  int64_t n, row_bytes, qtype, k, group_blocks;

  Panel panel(int64_t p) const {
    return {w + p * kPanel * row_bytes, std::min(kPanel, n - p * kPanel), qtype, k / kBlock, group_blocks};
  }
  int64_t panels() const { return (n + kPanel - 1) / kPanel; }

  // Weight row `col`'s block b, as amx_linear (amx_tiles.h) reads weights.
  void unpack(int64_t col, int64_t b, uint8_t* codes) const { panel(col / kPanel).codes(col % kPanel, b, codes); }
  void params(int64_t col, int64_t b, float* d, float* m) const {
    panel(col / kPanel).params(col % kPanel, b, d, m);
  }
};

// A layer of n rows of row_bytes in panels, k inputs; group: int4's group size (GGUF's types: a group per block).
inline PanelLayer panel_layer(const uint8_t* w, int64_t n, int64_t row_bytes, int64_t qtype, int64_t k,
                              int64_t group = kBlock) {
  return {w, n, row_bytes, qtype, k, qtype == kInt4 ? std::min(group, k) / kBlock : 1};
}

// Row c of a panel as k weights (panel_linear.cpp). int4's are d * (q - zero), rounded once.
void dequantize_panel_row(const Panel& p, int64_t c, float* out);
void dequantize_panel_row(const Panel& p, int64_t c, c10::BFloat16* out);

constexpr int64_t kPanelRows = 8;  // rows of x per pass over a panel (their accumulators stay in registers)
// Rows of x per sweep over a thread's panels: their int8 blocks (72-200 kB for the bundled model's widths) stay
// in L2 while every panel meets them.
constexpr int64_t kRowSweep = 128;

// out[r, col] = x[r] . W[col] + bias[col], parallel over the panels of W's n rows, kPanelRows rows of x per
// pass over a panel (it stays in L1 for the next pass). panel_dot(panel, r0, count, result) writes
// result[r * kPanel + c] for rows r0 + r of x and row c of the panel.
template <typename T, typename PanelDot>
void for_each_output_by_panels(int64_t rows, int64_t n, const float* bias, T* out, const PanelDot& panel_dot) {
  at::parallel_for(0, (n + kPanel - 1) / kPanel, 4, [&](int64_t begin, int64_t end) {
    alignas(64) float result[kPanelRows * kPanel];
    for (int64_t sweep = 0; sweep < rows; sweep += kRowSweep) {
      const int64_t sweep_end = std::min(rows, sweep + kRowSweep);
      for (int64_t panel = begin; panel < end; ++panel) {
        const int64_t c0 = panel * kPanel, width = std::min(kPanel, n - c0);
        for (int64_t r0 = sweep; r0 < sweep_end; r0 += kPanelRows) {
          const int64_t count = std::min(kPanelRows, sweep_end - r0);
          panel_dot(panel, r0, count, result);
          for (int64_t r = 0; r < count; ++r) {
            T* dst = out + (r0 + r) * n + c0;
            for (int64_t c = 0; c < width; ++c) {
              dst[c] = static_cast<T>(result[r * kPanel + c] + (bias != nullptr ? bias[c0 + c] : 0.f));
            }
          }
        }
      }
    }
  });
}

#if defined(PAGODA_VNNI)
// Panel p against rows r0 .. r0 + rows (at most kPanelRows) of x, quantized in natural order:
// result[r * kPanel + c] for row c of the panel.
void panel_dot(const Panel& p, const QuantizedRows& xq, int64_t r0, int64_t rows, float* result);
#endif

// out = x . W^T + bias for x [rows, k] (T: float or bf16) and a layer in panels.
template <typename T>
void panel_linear(const T* x, int64_t rows, const PanelLayer& layer, const float* bias, T* out) {
#if defined(PAGODA_VNNI)
  const QuantizedRows xq = quantize_rows(x, rows, layer.k, XOrder::kNatural);
  for_each_output_by_panels(rows, layer.n, bias, out, [&](int64_t panel, int64_t r0, int64_t count, float* result) {
    panel_dot(layer.panel(panel), xq, r0, count, result);
  });
#else
  // Without VNNI: each weight row dequantized, fp32 dot products.
  for_each_output_by_panels(rows, layer.n, bias, out, [&](int64_t panel, int64_t r0, int64_t count, float* result) {
    const Panel p = layer.panel(panel);
    std::vector<float> wrow(layer.k);
    for (int64_t c = 0; c < p.width; ++c) {
      dequantize_panel_row(p, c, wrow.data());
      for (int64_t r = 0; r < count; ++r) {
        float total = 0.f;
        for (int64_t i = 0; i < layer.k; ++i) total += wrow[i] * static_cast<float>(x[(r0 + r) * layer.k + i]);
        result[r * kPanel + c] = total;
      }
    }
  });
#endif
}

}  // namespace pagoda_quant
