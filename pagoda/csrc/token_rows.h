// Per-token operations of a decoder layer on one row, computed in fp32: residual add + RMSNorm, SiLU(gate) *
// up, rotate-half rotary. Used by the row-parallel kernels (elementwise.cpp) and the fused decode
// (decode_layers.cpp), so both round exactly alike.
#pragma once

#include <torch/extension.h>

#include <cmath>

#include "simd_math.h"

namespace pagoda_rows {

template <typename T>
float sum_squares(const T* x, int64_t n, int64_t& done) {
  float total = 0.f;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 v = pagoda::load16(x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  total = _mm512_reduce_add_ps(acc);
#endif
  done = i;
  return total;
}

// out = x * rsqrt(mean(x^2) + eps) * w for one row; x may alias out.
template <typename T>
void norm_row(const T* x, const T* w, T* out, int64_t n, float eps) {
  int64_t i = 0;
  float ss = sum_squares(x, n, i);
  for (int64_t j = i; j < n; ++j) ss += static_cast<float>(x[j]) * static_cast<float>(x[j]);
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  i = 0;
#if defined(__AVX512F__)
  const __m512 vinv = _mm512_set1_ps(inv);
  for (; i + 16 <= n; i += 16)
    pagoda::store16(out + i, _mm512_mul_ps(_mm512_mul_ps(pagoda::load16(x + i), vinv), pagoda::load16(w + i)));
#endif
  for (; i < n; ++i) out[i] = static_cast<T>(static_cast<float>(x[i]) * inv * static_cast<float>(w[i]));
}

// residual = x + residual (rounded to T, as an unfused add would store it); out = norm(residual) * w.
template <typename T>
void add_norm_row(const T* x, T* residual, const T* w, T* out, int64_t n, float eps) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    pagoda::store16(residual + i, _mm512_add_ps(pagoda::load16(x + i), pagoda::load16(residual + i)));
#endif
  for (; i < n; ++i) residual[i] = static_cast<T>(static_cast<float>(x[i]) + static_cast<float>(residual[i]));
  norm_row(residual, w, out, n, eps);
}

template <typename T>
void silu_mul_row(const T* gate, const T* up, T* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 g = pagoda::load16(gate + i);
    const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, pagoda::exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    pagoda::store16(out + i, _mm512_mul_ps(_mm512_mul_ps(g, sig), pagoda::load16(up + i)));
  }
#endif
  for (; i < n; ++i) {
    const float g = static_cast<float>(gate[i]);
    out[i] = static_cast<T>(g / (1.f + std::exp(-g)) * static_cast<float>(up[i]));
  }
}

// Rotate-half rotary embedding of `heads` vectors of `dim` in place; c, s: the token's [dim / 2] cos and sin.
template <typename T>
void rotate_row(T* x, const float* c, const float* s, int64_t heads, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    T* x1 = x + h * dim;
    T* x2 = x1 + half;
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= half; i += 16) {
      const __m512 a = pagoda::load16(x1 + i), b = pagoda::load16(x2 + i);
      const __m512 vc = _mm512_loadu_ps(c + i), vs = _mm512_loadu_ps(s + i);
      pagoda::store16(x1 + i, _mm512_fmsub_ps(a, vc, _mm512_mul_ps(b, vs)));
      pagoda::store16(x2 + i, _mm512_fmadd_ps(b, vc, _mm512_mul_ps(a, vs)));
    }
#endif
    for (; i < half; ++i) {
      const float a = static_cast<float>(x1[i]), b = static_cast<float>(x2[i]);
      x1[i] = static_cast<T>(a * c[i] - b * s[i]);
      x2[i] = static_cast<T>(b * c[i] + a * s[i]);
    }
  }
}

}  // namespace pagoda_rows
