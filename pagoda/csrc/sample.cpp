// Random sampling of one token per row: temperature, top-k, top-p and min-p, then an inverse-CDF draw
// with one uniform number per row.
//
// The torch formulation (softmax, a full sort for top-p, an exponential race) costs ~2.5 ms a row on
// this CPU, mostly in generating 49k exponentials per row; here a row is a few passes over its logits.
// Every filter keeps a top set of the distribution, so their composition is "probability >= the largest
// of the thresholds", and only that threshold is computed: top-k by selection, top-p by sorting only as
// many of the largest values as it takes to reach the mass.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "simd_math.h"

namespace {

struct RowParams {
  float temperature;
  int64_t top_k;  // <= 0: off
  float top_p;    // >= 1: off
  float min_p;    // <= 0: off
  double uniform; // in [0, 1)
};

// e[i] = exp((x[i] - max) / T) (0 for -inf logits); returns max(x), or -inf when every logit is -inf.
template <typename T>
float scaled_exps(const T* x, int64_t n, float temperature, float* e) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, static_cast<float>(x[i]));
  if (mx == -std::numeric_limits<float>::infinity()) return mx;
  const float inv_t = 1.f / temperature;
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vmx = _mm512_set1_ps(mx), vinv = _mm512_set1_ps(inv_t);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (; i + 16 <= n; i += 16) {
    const __m512 v = pagoda::load16(x + i);
    const __mmask16 finite = _mm512_cmp_ps_mask(v, ninf, _CMP_NEQ_OQ);
    const __m512 ex = pagoda::exp512(_mm512_mul_ps(_mm512_sub_ps(v, vmx), vinv));
    _mm512_storeu_ps(e + i, _mm512_maskz_mov_ps(finite, ex));
  }
#endif
  for (; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    e[i] = v == -std::numeric_limits<float>::infinity() ? 0.f : std::exp((v - mx) * inv_t);
  }
  return mx;
}

// The smallest value kept by top-p among the positive values >= floor: walk the values from the largest
// down and keep one while the mass of those above it is below top_p * total. Sorts growing slices of the
// largest values only.
float top_p_threshold(const float* e, int64_t n, float floor, float top_p, std::vector<float>& scratch) {
  scratch.clear();
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (e[i] > 0.f && e[i] >= floor) {
      scratch.push_back(e[i]);
      total += e[i];
    }
  }
  const double target = static_cast<double>(top_p) * total;
  double above = 0.0;
  float threshold = scratch.empty() ? floor : scratch.front();
  const auto begin = scratch.begin();
  int64_t start = 0, chunk = 64;
  const int64_t size = static_cast<int64_t>(scratch.size());
  while (start < size) {
    const int64_t end = std::min(size, start + chunk);
    std::nth_element(begin + start, begin + (end - 1), scratch.end(), std::greater<float>());
    std::sort(begin + start, begin + end, std::greater<float>());
    for (int64_t j = start; j < end; ++j) {
      if (above >= target) return threshold;
      threshold = scratch[j];
      above += scratch[j];
    }
    start = end;
    chunk *= 2;
  }
  return threshold;
}

template <typename T>
int64_t sample_row(const T* x, int64_t n, const RowParams& p, std::vector<float>& e, std::vector<float>& scratch) {
  e.resize(n);
  if (scaled_exps(x, n, p.temperature, e.data()) == -std::numeric_limits<float>::infinity()) return -1;
  // The largest exp is exactly 1, so min-p's "p >= min_p * p_max" is "e >= min_p".
  float threshold = std::max(p.min_p, 0.f);
  float top_k_floor = 0.f;
  if (p.top_k > 0 && p.top_k < n) {
    scratch.assign(e.begin(), e.end());
    std::nth_element(scratch.begin(), scratch.begin() + (p.top_k - 1), scratch.end(), std::greater<float>());
    top_k_floor = scratch[p.top_k - 1];
  }
  if (p.top_p < 1.f) {
    threshold = std::max(threshold, top_p_threshold(e.data(), n, top_k_floor, p.top_p, scratch));
  }
  threshold = std::max(threshold, top_k_floor);
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i)
    if (e[i] > 0.f && e[i] >= threshold) total += e[i];
  const double target = p.uniform * total;
  double cumulative = 0.0;
  int64_t last_kept = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (e[i] > 0.f && e[i] >= threshold) {
      cumulative += e[i];
      last_kept = i;
      if (cumulative > target) return i;
    }
  }
  return last_kept;  // rounding left the target at the very top of the mass
}

}  // namespace

// logits: [rows, vocab] float32 or bfloat16; row_ids: [n] int64 rows to sample; temperature, top_p, min_p:
// [n] float32; top_k: [n] int64; uniform: [n] float64 in [0, 1). Returns [n] int64 token ids.
torch::Tensor sample_rows(torch::Tensor logits, torch::Tensor row_ids, torch::Tensor temperature,
                          torch::Tensor top_k, torch::Tensor top_p, torch::Tensor min_p, torch::Tensor uniform) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "sample_rows needs non-empty 2-D logits");
  const int64_t n = row_ids.numel(), vocab = logits.size(1);
  TORCH_CHECK(temperature.numel() == n && top_k.numel() == n && top_p.numel() == n && min_p.numel() == n &&
                  uniform.numel() == n,
              "one parameter value per sampled row");
  TORCH_CHECK(row_ids.scalar_type() == torch::kInt64 && top_k.scalar_type() == torch::kInt64, "int64 row ids, top_k");
  TORCH_CHECK(temperature.scalar_type() == torch::kFloat && top_p.scalar_type() == torch::kFloat &&
                  min_p.scalar_type() == torch::kFloat && uniform.scalar_type() == torch::kDouble,
              "float32 temperature/top_p/min_p, float64 uniform");
  logits = logits.contiguous();
  row_ids = row_ids.contiguous();
  const int64_t* rows = row_ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(rows[i] >= 0 && rows[i] < logits.size(0), "row id out of range");
  const float* temps = temperature.contiguous().data_ptr<float>();
  const int64_t* ks = top_k.contiguous().data_ptr<int64_t>();
  const float* ps = top_p.contiguous().data_ptr<float>();
  const float* mins = min_p.contiguous().data_ptr<float>();
  const double* us = uniform.contiguous().data_ptr<double>();
  auto out = torch::empty({n}, row_ids.options());
  int64_t* op = out.data_ptr<int64_t>();
  const auto run = [&](auto* lp) {
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e_end) {
      std::vector<float> e, scratch;
      for (int64_t i = b; i < e_end; ++i) {
        const RowParams p{temps[i], ks[i], ps[i], mins[i], us[i]};
        op[i] = sample_row(lp + rows[i] * vocab, vocab, p, e, scratch);
      }
    });
  };
  if (logits.scalar_type() == at::kBFloat16) {
    run(logits.data_ptr<at::BFloat16>());
  } else {
    TORCH_CHECK(logits.scalar_type() == at::kFloat, "sample_rows takes float32 or bfloat16 logits");
    run(logits.data_ptr<float>());
  }
  TORCH_CHECK(out.min().item<int64_t>() >= 0, "sample_rows: a row has no finite logit");
  return out;
}
