// Fused per-token operations of a decoder layer: residual add + RMSNorm, SiLU(gate) * up, and rotary
// embedding in place.
//
// In torch each is three to six kernels, every one a full pass over the activations with a bf16 -> fp32
// round trip; together they took ~20% of a prefill step and ~10% of a decode step at batch 256. Each
// function here reads its inputs once and writes once, computing in fp32. Rows are independent (no
// cross-row reduction), so results do not depend on the batch.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "simd_math.h"
#include "token_rows.h"

namespace {

using namespace pagoda_rows;

// Rows per task so that a task holds at least ~16k elements (smaller tasks cost more to hand out).
inline int64_t grain_rows(int64_t row_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_elems, 1)); }

template <typename T>
void dispatch(const torch::Tensor& t, const char* what, T&& fn) {
  if (t.scalar_type() == at::kBFloat16) {
    fn(at::BFloat16{});
  } else {
    TORCH_CHECK(t.scalar_type() == at::kFloat, what, " takes float32 or bfloat16");
    fn(float{});
  }
}

}  // namespace

// x: [rows, n]; weight: [n]. Returns a new tensor.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1), "rms_norm: bad shapes");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rms_norm: x and weight dtypes differ");
  x = x.contiguous();
  weight = weight.contiguous();
  auto out = torch::empty_like(x);
  const int64_t rows = x.size(0), n = x.size(1);
  dispatch(x, "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const T* wp = weight.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, rows, grain_rows(n), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) norm_row(xp + r * n, wp, op + r * n, n, static_cast<float>(eps));
    });
  });
  return out;
}

// residual += x in place (both [rows, n], residual contiguous); returns norm(residual) * weight.
torch::Tensor add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.sizes() == residual.sizes() && x.dim() == 2 && weight.size(0) == x.size(1), "add_rms_norm: bad shapes");
  TORCH_CHECK(x.scalar_type() == residual.scalar_type() && x.scalar_type() == weight.scalar_type(),
              "add_rms_norm: dtypes differ");
  TORCH_CHECK(residual.is_contiguous(), "add_rms_norm: residual must be contiguous (it is updated in place)");
  x = x.contiguous();
  weight = weight.contiguous();
  auto out = torch::empty_like(x);
  const int64_t rows = x.size(0), n = x.size(1);
  dispatch(x, "add_rms_norm", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    T* rp = residual.data_ptr<T>();
    const T* wp = weight.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, rows, grain_rows(n), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) add_norm_row(xp + r * n, rp + r * n, wp, op + r * n, n, static_cast<float>(eps));
    });
  });
  return out;
}

// gate_up: [rows, 2 * n] (gate then up) -> [rows, n] = silu(gate) * up.
torch::Tensor silu_and_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "silu_and_mul: [rows, 2 * n] expected");
  gate_up = gate_up.contiguous();
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2;
  auto out = torch::empty({rows, n}, gate_up.options());
  dispatch(gate_up, "silu_and_mul", [&](auto tag) {
    using T = decltype(tag);
    const T* gp = gate_up.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, rows, grain_rows(2 * n), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) silu_mul_row(gp + r * 2 * n, gp + r * 2 * n + n, op + r * n, n);
    });
  });
  return out;
}

// Rotate-half rotary embedding in place. x: [tokens, heads, dim] (rows of heads * dim may be strided by
// row_stride elements, e.g. q and k inside a fused qkv output); cos, sin: [tokens, dim / 2] fp32.
void rotary_inplace(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "rotary: [tokens, heads, dim], inner dims dense");
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, "rotary: fp32 cos/sin");
  TORCH_CHECK(cos.size(0) == tokens && cos.size(1) == half && sin.sizes() == cos.sizes(), "rotary: cos/sin shape");
  cos = cos.contiguous();
  sin = sin.contiguous();
  const int64_t row_stride = x.stride(0);
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  dispatch(x, "rotary", [&](auto tag) {
    using T = decltype(tag);
    T* xp = x.data_ptr<T>();
    at::parallel_for(0, tokens, grain_rows(heads * dim), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const float* c = cp + t * half;
        const float* s = sp + t * half;
        rotate_row(xp + t * row_stride, c, s, heads, dim);
      }
    });
  });
}
