// bf16 matrix-vector products for small batches (decode), with AVX-512 BF16 dot-product instructions.
//
// oneDNN is excellent for large batches (it uses AMX tiles) but reaches only ~10 GB/s on the
// one-to-a-few-row products of decode, which are bound by reading the weights; this kernel streams
// each weight row once for all rows of x and accumulates in fp32. Each output element depends only
// on its own row of x, never on how many rows there are.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512BF16__)
inline __m512bh load_bh(const at::BFloat16* p) {
  return reinterpret_cast<__m512bh>(_mm512_loadu_si512(reinterpret_cast<const void*>(p)));
}

void gemv_rows(const at::BFloat16* x, const at::BFloat16* w, const at::BFloat16* bias, at::BFloat16* out,
               int64_t rows, int64_t k, int64_t n, int64_t n_begin, int64_t n_end) {
  constexpr int64_t kMaxRows = 8;
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
    const int64_t r_count = std::min(kMaxRows, rows - r0);
    for (int64_t col = n_begin; col < n_end; ++col) {
      const at::BFloat16* wrow = w + col * k;
      __m512 acc[kMaxRows];
      for (int64_t r = 0; r < r_count; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t i = 0; i < k; i += 32) {
        const __m512bh wv = load_bh(wrow + i);
        for (int64_t r = 0; r < r_count; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], wv, load_bh(x + (r0 + r) * k + i));
      }
      const float b = bias ? static_cast<float>(bias[col]) : 0.f;
      for (int64_t r = 0; r < r_count; ++r)
        out[(r0 + r) * n + col] = static_cast<at::BFloat16>(_mm512_reduce_add_ps(acc[r]) + b);
    }
  }
}
#endif

}  // namespace

bool linear_bf16_supported() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// x: [rows, k] bf16; w: [n, k] bf16 (nn.Linear layout); bias: [n] bf16 or empty. k % 32 == 0.
torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16 only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "shape mismatch");
  TORCH_CHECK(x.size(1) % 32 == 0, "k must be a multiple of 32");
  TORCH_CHECK(w.is_contiguous(), "weight must be contiguous");
  x = x.contiguous();
  const int64_t rows = x.size(0), k = x.size(1), n = w.size(0);
  auto out = torch::empty({rows, n}, x.options());
#if defined(__AVX512BF16__)
  const at::BFloat16* bias_ptr = nullptr;
  torch::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    bias_c = bias->to(at::kBFloat16).contiguous();
    bias_ptr = bias_c.data_ptr<at::BFloat16>();
  }
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) { gemv_rows(xp, wp, bias_ptr, op, rows, k, n, begin, end); });
#else
  TORCH_CHECK(false, "built without AVX-512 BF16");
#endif
  return out;
}
