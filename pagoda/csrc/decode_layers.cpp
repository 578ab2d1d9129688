// Decode steps of a few rows (up to 16: sequences' decode tokens and their drafts) through every decoder layer
// in one call.
//
// At batch 1 a token of the bundled model reads ~97 MB of quantized weights, ~5 ms at this machine's
// bandwidth, while the layer-by-layer path spent ~2.5 ms more outside the matmuls: ~20 torch and kernel
// calls per layer from Python, each allocating its output and fanning out to the threads, and every
// projection quantizing its input again. Here a layer is ten phases over preallocated buffers: the tiny
// ones (norms, rotary, the KV write, quantizing a projection's input once) on the calling thread, the
// projections split over the threads by output rows, attention by (rows reading the same blocks, KV head,
// chunk of keys) (row_attention.h).
//
// The arithmetic is the layer-by-layer path's: the same kernels' dot products on the same int8 activations,
// outputs and the residual stream rounded to the model dtype where that path stores them, attention in fp32
// over the cache as stored (pagoda/model/attention/kv_format.py). Projections: GGUF types (gguf_linear.cpp)
// and int4 (int4_linear.cpp); other layers take the layer-by-layer path.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "amx_tiles.h"
#include "decode_layers.h"
#include "quant_panels.h"
#include "kv_rows.h"
#include "quant_rows.h"
#include "row_attention.h"
#include "token_rows.h"

#if defined(PAGODA_VNNI)
using namespace pagoda_quant;
using namespace pagoda_kv;
using namespace pagoda_attention;
using namespace pagoda_rows;

namespace pagoda_decode {

constexpr int64_t kMaxRows = 16;  // a decode batch, or a decode token and its drafts (fused_decode.py)

struct Projection {
  const uint8_t* weight;
  int64_t kind, group, out, in, row_bytes;  // kind: a GGML type id or kInt4; group: int4's group size
  const float* bias;
  bool tiles = false;  // on AMX int8 tiles (amx_q4_rows), x in natural order; else VNNI dot products

  XOrder order() const { return tiles || is_panel_type(kind) ? XOrder::kNatural : gguf_x_order(kind); }

  PanelLayer panels() const { return panel_layer(weight, out, row_bytes, kind, in, group); }

  // One K-quant weight row, the kernel's rows of x a pass at a time: the row stays in L1 for the next.
  void dot(int64_t col, const QuantizedRows& xq, int64_t rows, float* result) const {
    const uint8_t* row = weight + col * row_bytes;
    for (int64_t r0 = 0; r0 < rows; r0 += kRowTile) {
      gguf_row_dot(row, kind, in, xq, r0, std::min(kRowTile, rows - r0), result + r0);
    }
  }
};

Projection projection(const torch::Tensor& w, int64_t kind, int64_t group, int64_t in, const torch::Tensor* bias) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(), "decode_layers: uint8 weight rows");
  return {w.data_ptr<uint8_t>(), kind, group, w.size(0), in, w.size(1),
          bias != nullptr && bias->defined() ? bias->data_ptr<float>() : nullptr};
}

// Every layer's four projections, laid out once: reading them from the tensors took ~25 us a step.
struct Plan {
  std::vector<Projection> projections;
};

// out[r, :] = x[r] . W^T (+ bias), the columns split over the threads; x already quantized in p's order.
template <typename T>
void project(const Projection& p, const QuantizedRows& xq, int64_t rows, T* out) {
#if defined(PAGODA_AMX)
  if (p.tiles) return amx_q4_rows(p.panels(), xq, rows, p.bias, out);
#endif
  if (is_panel_type(p.kind)) {
    const PanelLayer layer = p.panels();
    return for_each_output_by_panels(rows, p.out, p.bias, out, [&](int64_t panel, int64_t r0, int64_t count,
                                                                   float* result) {
      panel_dot(layer.panel(panel), xq, r0, count, result);
    });
  }
  const int64_t ahead = prefetch_rows_ahead(p.row_bytes);
  at::parallel_for(0, p.out, 32, [&](int64_t begin, int64_t end) {
    float result[kMaxRows];
    for (int64_t col = begin; col < end; ++col) {
      if (col + ahead < end) prefetch_row_l2(p.weight + (col + ahead) * p.row_bytes, p.row_bytes);
      p.dot(col, xq, rows, result);
      const float b = p.bias != nullptr ? p.bias[col] : 0.f;
      for (int64_t r = 0; r < rows; ++r) out[r * p.out + col] = static_cast<T>(result[r] + b);
    }
  });
}

struct Step {
  int64_t rows, hidden, heads, kv_heads, dim, intermediate, block_size, max_blocks;
  const float* cos;
  const float* sin;
  const int64_t* slots;
  const int64_t* tables;
  const int64_t* lens;
  float scale, eps;
};

template <typename T, typename C>
void run_layers(torch::Tensor& hidden, const std::vector<Projection>& projections,
                const std::vector<torch::Tensor>& norms, const std::vector<torch::Tensor>& caches,
                const std::vector<double>& kv_scales, const Step& st) {
  const int64_t rows = st.rows, n = st.hidden, layers = static_cast<int64_t>(caches.size());
  const int64_t q_size = st.heads * st.dim, kv_size = st.kv_heads * st.dim;
  std::vector<T> residual(rows * n), normed(rows * n), qkv(rows * (q_size + 2 * kv_size)), attn(rows * q_size),
      gate_up(rows * 2 * st.intermediate), act(rows * st.intermediate);
  T* h = hidden.data_ptr<T>();  // the embeddings in, each layer's MLP output, the final normed states out
  const float eps = st.eps;
  const StepRows step_rows{rows, st.heads, st.kv_heads, st.dim, st.block_size, st.max_blocks, st.tables, st.lens};
  const std::vector<RowGroup> groups = row_groups(step_rows);  // the same blocks in every layer
  for (int64_t l = 0; l < layers; ++l) {
    const Projection* p = &projections[4 * l];
    const T* in_norm = norms[2 * l].data_ptr<T>();
    const T* post_norm = norms[2 * l + 1].data_ptr<T>();
    const int64_t row_width = caches[l].size(4);
    C* k_cache = static_cast<C*>(caches[l].data_ptr());
    C* v_cache = k_cache + caches[l].stride(0);
    // A checkpoint's k_scale / v_scale apply to an fp8 cache only (kv_format.py).
    constexpr bool fp8 = std::is_same_v<C, c10::Float8_e4m3fn>;
    const float k_scale = fp8 ? static_cast<float>(kv_scales[2 * l]) : 1.f;
    const float v_scale = fp8 ? static_cast<float>(kv_scales[2 * l + 1]) : 1.f;
    for (int64_t r = 0; r < rows; ++r) {
      if (l == 0) {  // the embeddings are the residual stream's start
        std::copy(h + r * n, h + (r + 1) * n, &residual[r * n]);
        norm_row(&residual[r * n], in_norm, &normed[r * n], n, eps);
      } else {
        add_norm_row(h + r * n, &residual[r * n], in_norm, &normed[r * n], n, eps);
      }
    }
    project(p[0], quantize_rows(normed.data(), rows, n, p[0].order()), rows, qkv.data());
    const int64_t qkv_width = q_size + 2 * kv_size;
    for (int64_t r = 0; r < rows; ++r) {
      T* row = &qkv[r * qkv_width];
      const float* c = st.cos + r * st.dim / 2;
      const float* s = st.sin + r * st.dim / 2;
      rotate_row(row, c, s, st.heads + st.kv_heads, st.dim);  // q and k side by side, as the layer does
      const int64_t slot = st.slots[r];
      for (int64_t kh = 0; kh < st.kv_heads; ++kh) {
        C* k_dest = k_cache + (slot * st.kv_heads + kh) * row_width;
        C* v_dest = v_cache + (slot * st.kv_heads + kh) * row_width;
        store_row(row + q_size + kh * st.dim, k_dest, st.dim, k_scale);
        store_row(row + q_size + kv_size + kh * st.dim, v_dest, st.dim, v_scale);
      }
    }
    attend_rows<T, C>(step_rows, groups, qkv.data(), qkv_width, k_cache, v_cache, row_width, st.scale, k_scale, v_scale,
                      attn.data());
    project(p[1], quantize_rows(attn.data(), rows, q_size, p[1].order()), rows, h);
    for (int64_t r = 0; r < rows; ++r) add_norm_row(h + r * n, &residual[r * n], post_norm, &normed[r * n], n, eps);
    project(p[2], quantize_rows(normed.data(), rows, n, p[2].order()), rows, gate_up.data());
    for (int64_t r = 0; r < rows; ++r) {
      const T* gu = &gate_up[r * 2 * st.intermediate];
      silu_mul_row(gu, gu + st.intermediate, &act[r * st.intermediate], st.intermediate);
    }
    project(p[3], quantize_rows(act.data(), rows, st.intermediate, p[3].order()), rows, h);
  }
  const T* final_norm = norms.back().data_ptr<T>();
  for (int64_t r = 0; r < rows; ++r) add_norm_row(h + r * n, &residual[r * n], final_norm, h + r * n, n, eps);
}

}  // namespace pagoda_decode

using namespace pagoda_decode;
#endif

bool decode_layers_supported() {
#if defined(PAGODA_VNNI)
  return true;
#else
  return false;
#endif
}

DecodeLayers::DecodeLayers(std::vector<torch::Tensor> weights, std::vector<int64_t> kinds,
                           std::vector<int64_t> groups, std::vector<torch::Tensor> qkv_biases,
                           std::vector<torch::Tensor> norms, std::vector<torch::Tensor> caches,
                           std::vector<double> kv_scales, int64_t heads, int64_t kv_heads, int64_t head_dim,
                           int64_t intermediate, double scale, double eps)
    : weights(std::move(weights)), qkv_biases(std::move(qkv_biases)), norms(std::move(norms)),
      caches(std::move(caches)), kv_scales(std::move(kv_scales)), heads(heads), kv_heads(kv_heads),
      head_dim(head_dim), intermediate(intermediate), scale(scale), eps(eps) {
#if defined(PAGODA_VNNI)
  const int64_t layers = static_cast<int64_t>(this->caches.size());
  TORCH_CHECK(layers >= 1 && static_cast<int64_t>(this->weights.size()) == 4 * layers &&
                  kinds.size() == this->weights.size() && groups.size() == this->weights.size() &&
                  static_cast<int64_t>(this->norms.size()) == 2 * layers + 1 &&
                  static_cast<int64_t>(this->kv_scales.size()) == 2 * layers &&
                  (this->qkv_biases.empty() || static_cast<int64_t>(this->qkv_biases.size()) == layers),
              "decode_layers: per-layer lists of the wrong lengths");
  TORCH_CHECK(head_dim % 16 == 0 && heads % kv_heads == 0,
              "decode_layers: head_dim must be a multiple of 16 and heads a multiple of kv_heads");
  const auto cache_type = this->caches[0].scalar_type();
  for (const torch::Tensor& cache : this->caches)
    TORCH_CHECK(cache.dim() == 5 && cache.scalar_type() == cache_type && cache.sizes() == this->caches[0].sizes(),
                "decode_layers: every layer's KV cache [2, blocks, block_size, kv_heads, row width] alike");
  const int64_t n = this->norms[0].size(0);
  const int64_t ins[4] = {n, heads * head_dim, n, intermediate};
  auto laid_out = std::make_shared<Plan>();
  for (int64_t l = 0; l < layers; ++l)
    for (int64_t j = 0; j < 4; ++j)
      laid_out->projections.push_back(projection(this->weights[4 * l + j], kinds[4 * l + j], groups[4 * l + j], ins[j],
                                                 j == 0 && !this->qkv_biases.empty() ? &this->qkv_biases[l] : nullptr));
  plan = std::move(laid_out);
#else
  TORCH_CHECK(false, "decode_layers needs AVX-512 VNNI (decode_layers_supported() is False here)");
#endif
}

void DecodeLayers::run(torch::Tensor hidden, torch::Tensor cos, torch::Tensor sin, torch::Tensor slots,
                       torch::Tensor block_tables, torch::Tensor seq_lens, int64_t tile_min_rows) const {
#if defined(PAGODA_VNNI)
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) >= 1 && hidden.size(0) <= kMaxRows && hidden.is_contiguous(),
              "decode_layers: hidden must be contiguous [1..16, hidden]");
  TORCH_CHECK(block_tables.is_contiguous() && seq_lens.is_contiguous() && seq_lens.size(0) == hidden.size(0) &&
                  slots.size(0) == hidden.size(0),
              "decode_layers: contiguous block tables, one slot and sequence length per row");
  pagoda_kv::check_paged_indices(block_tables, seq_lens, caches[0].size(1), caches[0].size(2), "decode_layers");
  const int64_t* slot_ids = slots.data_ptr<int64_t>();
  for (int64_t r = 0; r < slots.size(0); ++r)
    TORCH_CHECK(slot_ids[r] >= 0 && slot_ids[r] < caches[0].size(1) * caches[0].size(2), "decode_layers: slot ",
                slot_ids[r], " outside the cache");
  const int64_t n = hidden.size(1);
  TORCH_CHECK(n == norms[0].size(0), "decode_layers: hidden has ", n, " features, the model ", norms[0].size(0));
  const bool tiles = tile_min_rows > 0 && hidden.size(0) >= tile_min_rows;
#if defined(PAGODA_AMX)
  TORCH_CHECK(!tiles || amx_permitted(), "decode_layers: tile_min_rows set, but this process has no AMX tile state");
#else
  TORCH_CHECK(!tiles, "decode_layers: tile_min_rows set, but these kernels were built without AMX int8");
#endif
  std::vector<Projection> tiled;
  if (tiles) {
    tiled = plan->projections;
    for (Projection& p : tiled) p.tiles = p.kind == kQ4_0 || p.kind == kQ4_1;
  }
  const std::vector<Projection>& projections = tiles ? tiled : plan->projections;
  const Step st{hidden.size(0), n, heads, kv_heads, head_dim, intermediate, caches[0].size(2),
                block_tables.size(1), cos.data_ptr<float>(), sin.data_ptr<float>(), slots.data_ptr<int64_t>(),
                block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(), static_cast<float>(scale),
                static_cast<float>(eps)};
  const auto cache_type = caches[0].scalar_type();
  auto dispatch = [&](auto model_tag) {
    using T = decltype(model_tag);
    if (cache_type == at::kChar) {
      run_layers<T, int8_t>(hidden, projections, norms, caches, kv_scales, st);
    } else if (cache_type == at::kFloat8_e4m3fn) {
      run_layers<T, c10::Float8_e4m3fn>(hidden, projections, norms, caches, kv_scales, st);
    } else {
      TORCH_CHECK(cache_type == hidden.scalar_type(), "decode_layers: the cache must be int8, fp8 or the model dtype");
      run_layers<T, T>(hidden, projections, norms, caches, kv_scales, st);
    }
  };
  if (hidden.scalar_type() == at::kBFloat16) {
    dispatch(at::BFloat16{});
  } else {
    TORCH_CHECK(hidden.scalar_type() == at::kFloat, "decode_layers: the model dtype must be fp32 or bf16");
    dispatch(float{});
  }
#else
  TORCH_CHECK(false, "decode_layers needs AVX-512 VNNI (decode_layers_supported() is False here)");
#endif
}
