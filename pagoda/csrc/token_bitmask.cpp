// Structured outputs: -inf for each token a grammar forbids, in place. The bitmask is xgrammar's layout
// (token t allowed when bit t % 32 of word t / 32 is set). Most words are all-ones or all-zeros, so a
// word-at-a-time scan touches each logit at most once; the torch path unpacks 32 x the mask's size first.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace {

template <typename T>
void mask_row(T* row, const int32_t* words, int64_t num_words, int64_t vocab) {
  const T neg_inf = static_cast<T>(-std::numeric_limits<float>::infinity());
  for (int64_t k = 0; k < num_words; ++k) {
    const uint32_t word = static_cast<uint32_t>(words[k]);
    if (word == 0xFFFFFFFFu) continue;
    const int64_t base = k * 32;
    const int64_t end = std::min<int64_t>(base + 32, vocab);
    if (word == 0u) {
      std::fill(row + base, row + end, neg_inf);
      continue;
    }
    for (int64_t t = base; t < end; ++t) {
      if (!((word >> (t - base)) & 1u)) row[t] = neg_inf;
    }
  }
  for (int64_t t = num_words * 32; t < vocab; ++t) row[t] = neg_inf;  // beyond the mask: not a grammar token
}

}  // namespace

// logits [rows, vocab] (float32 or bfloat16, contiguous); bits [n, words] int32; logit_rows [n] int64: the
// logits row each mask row applies to.
void apply_token_bitmask(torch::Tensor logits, torch::Tensor bits, torch::Tensor logit_rows) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "logits must be a contiguous [rows, vocab] tensor");
  TORCH_CHECK(bits.dim() == 2 && bits.scalar_type() == torch::kInt32 && bits.is_contiguous(),
              "bits must be a contiguous int32 [n, words] tensor");
  TORCH_CHECK(logit_rows.dim() == 1 && logit_rows.scalar_type() == torch::kInt64 &&
              logit_rows.size(0) == bits.size(0), "logit_rows must be int64 [n]");
  const int64_t n = bits.size(0), num_words = bits.size(1), vocab = logits.size(1), rows = logits.size(0);
  const int64_t* where = logit_rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(0 <= where[i] && where[i] < rows, "logit_rows out of range");
  const int32_t* words = bits.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, logits.scalar_type(), "apply_token_bitmask", [&] {
    scalar_t* base = logits.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) mask_row(base + where[i] * vocab, words + i * num_words, num_words, vocab);
    });
  });
}
