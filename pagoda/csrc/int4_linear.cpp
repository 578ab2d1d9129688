// Linear layers on group-wise asymmetric int4 weights (--quantization int4, GPTQ and AWQ checkpoints, all
// unpacked at load to this one layout): W[n, j] = scale[n, g] * (q[n, j] - zero[n, g]) for group g = j / G.
//
// A row's bytes are k / 2 of nibbles (32 weights per 16 bytes, in GGUF Q4's order: element j < 16 of a
// 32-block the low nibble of byte j, element j >= 16 the high nibble of byte j - 16), ng = ceil(k / G) fp16
// scales and ng uint8 zeros (the last group may be shorter, as AutoGPTQ allows): 4 + 24 / G bits a weight
// (4.19 at G = 128) where Q4_1 blocks would take 5. On the CPU kernels they are laid out in panels of 16 rows
// (quant_panels.h: each group's blocks of words, then its scales and zeros) and multiplied by panel_dot
// (panel_linear.cpp), the kernel of GGUF's Q4_0 / Q4_1 / Q8_0 with a scale and zero per group.
//
// Group sizes: any multiple of 32, or one group for the whole row (GPTQ's group_size -1).
#include <torch/extension.h>

#include <cstdint>

#include "amx_tiles.h"
#include "quant_panels.h"
#include "quant_rows.h"

namespace {

using namespace pagoda_quant;

inline int64_t num_groups(int64_t k, int64_t group) { return (k + group - 1) / group; }
inline int64_t int4_row_bytes(int64_t k, int64_t group) { return k / 2 + 3 * num_groups(k, group); }

void check_int4_weight(const torch::Tensor& w, int64_t group, int64_t k, const char* fn) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(), fn,
              ": weight must be a contiguous uint8 [out_features, bytes per row] tensor of int4 panels");
  TORCH_CHECK(k % kBlock == 0, fn, ": in_features ", k, " is not a multiple of ", kBlock);
  TORCH_CHECK(group > 0 && (group % kBlock == 0 || group >= k), fn, ": group size ", group, " is not a multiple of ",
              kBlock, " (nor the whole row)");
  TORCH_CHECK(w.size(1) == int4_row_bytes(k, group), fn, ": weight rows hold ", w.size(1), " bytes, but ", k,
              " inputs in groups of ", group, " take ", int4_row_bytes(k, group));
}

PanelLayer int4_layer(const torch::Tensor& w, int64_t group, int64_t k) {
  return panel_layer(w.data_ptr<uint8_t>(), w.size(0), w.size(1), kInt4, k, group);
}

}  // namespace

// x: [rows, in_features] fp32/bf16; w: [out_features, int4 row bytes] in panels (see the file note); bias:
// [out_features] or None. Returns [rows, out_features] in x's dtype.
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor w, int64_t group_size, c10::optional<torch::Tensor> bias) {
  return quantized_linear(
      x, w, bias, "int4_linear", [&](int64_t k) { check_int4_weight(w, group_size, k, "int4_linear"); },
      [&](auto tag, const torch::Tensor& xc, const float* bp, torch::Tensor& out) {
        using T = decltype(tag);
        panel_linear(xc.data_ptr<T>(), xc.size(0), int4_layer(w, group_size, xc.size(1)), bp, out.data_ptr<T>());
      });
}

// w as in int4_linear -> its rows `rows` (int64 indices; None: all) as [rows, in_features] of `dtype` (fp32 or
// bf16).
torch::Tensor int4_dequantize(torch::Tensor w, int64_t group_size, int64_t in_features, at::ScalarType dtype,
                              c10::optional<torch::Tensor> rows) {
  check_int4_weight(w, group_size, in_features, "int4_dequantize");
  const PanelLayer layer = int4_layer(w, group_size, in_features);
  return dequantized(w, in_features, dtype, "int4_dequantize", rows.value_or(torch::Tensor()),
                     [&](int64_t row, auto* out) { dequantize_panel_row(layer.panel(row / kPanel), row % kPanel, out); });
}

// As int4_linear, through AMX int8 tiles (amx_tiles.h): for prompts.
torch::Tensor int4_linear_amx(torch::Tensor x, torch::Tensor w, int64_t group_size, c10::optional<torch::Tensor> bias) {
#if defined(PAGODA_AMX)
  return amx_quantized_linear(
      x, w, bias, "int4_linear_amx", [&](int64_t k) { check_int4_weight(w, group_size, k, "int4_linear_amx"); },
      [&](int64_t k) { return int4_layer(w, group_size, k); });
#else
  TORCH_CHECK(false, "int4_linear_amx: these kernels were built without AMX int8 (amx_available() is false)");
  return {};
#endif
}
