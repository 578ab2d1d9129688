// Q4_0 / Q4_1 / Q8_0 weights as the CPU kernels store them: panels of 16 output rows.
//
// A layer's rows are taken 16 at a time (its last panel may be narrower: `width` rows) and each panel's
// bytes are laid out block by block (32 inputs): first the block's quants as 32-bit words, word t of
// every row of the panel side by side (Q4: 4 words a row, word t holding codes 4t .. 4t + 3 in its low
// nibbles and 16 + 4t .. 16 + 4t + 3 in its high ones, as GGUF's bytes do; Q8_0: 8 words, codes 4t ..
// 4t + 3 stored plus 128), then the rows' fp16 scales d, then Q4_1's fp16 offsets m. A 64-byte load then
// holds the same four inputs' codes of 16 output rows: one VNNI dot product against four of x's bytes
// broadcast gives 16 outputs' partial sums, so a block's scale is applied once per 16 outputs (lanes are
// outputs) instead of once per block of each row, and the words are what AMX's weight tiles take.
//
// A panel of width P holds P times a row's bytes, so the tensor keeps its [rows, row bytes] shape and a
// slice of whole panels (every 16th row) is a layer of its own. The layout is made at load from GGUF's rows
// (pagoda/model/layers/quantization/gguf.py, pack_panels).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "quant_rows.h"

namespace pagoda_quant {

constexpr int64_t kPanel = 16;  // output rows per panel

inline bool is_panel_type(int64_t qtype) { return qtype == kQ4_0 || qtype == kQ4_1 || qtype == kQ8_0; }

// Bytes of one block of one row: quants, fp16 d, Q4_1's fp16 m.
inline int64_t panel_quant_bytes(int64_t qtype) { return qtype == kQ8_0 ? 32 : 16; }
inline int64_t panel_block_bytes(int64_t qtype) {
  return panel_quant_bytes(qtype) + (qtype == kQ4_1 ? 4 : 2);
}

// w = d * code + m for a block's unsigned codes: Q4_0's offset is -8 d, Q8_0's (codes stored plus 128) -128 d.
inline float panel_offset_factor(int64_t qtype) { return qtype == kQ4_0 ? -8.f : -128.f; }

struct Panel {
  const uint8_t* base;
  int64_t width, qtype;

  const uint8_t* block(int64_t b) const { return base + b * width * panel_block_bytes(qtype); }
  // Word t of every row of block b (4 * width bytes).
  const uint8_t* words(int64_t b, int64_t t) const { return block(b) + t * 4 * width; }
  const uint16_t* scales(int64_t b) const {
    return reinterpret_cast<const uint16_t*>(block(b) + panel_quant_bytes(qtype) * width);
  }
  const uint16_t* offsets(int64_t b) const { return scales(b) + width; }  // Q4_1 only

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
    *m = qtype == kQ4_1 ? half_to_float(offsets(b)[c]) : panel_offset_factor(qtype) * *d;
  }
};

// Panel p of a layer of n rows of row_bytes each.
inline Panel panel_at(const uint8_t* w, int64_t n, int64_t row_bytes, int64_t qtype, int64_t p) {
  return {w + p * kPanel * row_bytes, std::min(kPanel, n - p * kPanel), qtype};
}

inline int64_t panel_count(int64_t n) { return (n + kPanel - 1) / kPanel; }

constexpr int64_t kPanelRows = 8;  // rows of x per pass over a panel (their accumulators stay in registers)
// Rows of x per sweep over a thread's panels: their int8 blocks (72-200 kB for the bundled model's widths) stay
// in L2 while every panel meets them.
constexpr int64_t kRowSweep = 128;

// out[r, col] = x[r] . W[col] + bias[col], parallel over the panels of W's n rows, kPanelRows rows of x per
// pass over a panel (it stays in L1 for the next pass). panel_dot(panel, r0, count, result) writes
// result[r * kPanel + c] for rows r0 + r of x and row c of the panel.
template <typename T, typename PanelDot>
void for_each_output_by_panels(int64_t rows, int64_t n, const float* bias, T* out, const PanelDot& panel_dot) {
  at::parallel_for(0, panel_count(n), 4, [&](int64_t begin, int64_t end) {
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

}  // namespace pagoda_quant
