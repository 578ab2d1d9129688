// The one-call decode step of one model (decode_layers.cpp). Its per-layer weights, norms and KV caches are the
// same in every step: they are checked and laid out once here. Passed in Python lists (~210 tensors through the
// binding's conversions) and laid out again in every call, they cost ~0.1 ms a step (2% of a bundled-model token).
#pragma once

#include <torch/extension.h>

#include <memory>
#include <vector>

namespace pagoda_decode {
struct Plan;  // the projections as the kernels read them (decode_layers.cpp)
}

bool decode_layers_supported();

// weights: 4 a layer (qkv, o, gate_up, down: uint8 rows, or panels) with their kinds (GGML type ids, 1000 =
// int4) and int4 group sizes; norms: 2 a layer, then the final norm's; caches: a layer's KV cache [2, blocks, block_size,
// kv_heads, row width] (model dtype, int8 rows or fp8) with its two fp8 scales in kv_scales; qkv_biases: one
// fp32 [qkv rows] a layer, or none.
struct DecodeLayers {
  std::vector<torch::Tensor> weights, qkv_biases;  // kept alive: the plan's projections point into them
  std::vector<torch::Tensor> norms, caches;
  std::vector<double> kv_scales;
  int64_t heads, kv_heads, head_dim, intermediate;
  double scale, eps;
  std::shared_ptr<const pagoda_decode::Plan> plan;

  DecodeLayers(std::vector<torch::Tensor> weights, std::vector<int64_t> kinds, std::vector<int64_t> groups,
               std::vector<torch::Tensor> qkv_biases, std::vector<torch::Tensor> norms,
               std::vector<torch::Tensor> caches, std::vector<double> kv_scales, int64_t heads, int64_t kv_heads,
               int64_t head_dim, int64_t intermediate, double scale, double eps);

  // hidden: [rows <= 16, hidden] embeddings of the step's tokens (fp32 / bf16), overwritten with the final normed
  // hidden states. cos / sin: [rows, head_dim / 2] fp32; slots [rows], block_tables [rows, max_blocks], seq_lens
  // [rows]: int64, the sequences' lengths with this token. tile_min_rows: steps of at least this many rows run
  // their Q4_0 / Q4_1 projections on AMX int8 tiles (0: never).
  void run(torch::Tensor hidden, torch::Tensor cos, torch::Tensor sin, torch::Tensor slots,
           torch::Tensor block_tables, torch::Tensor seq_lens, int64_t tile_min_rows) const;
};
