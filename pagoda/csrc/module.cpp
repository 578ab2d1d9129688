// Python bindings of Pagoda's CPU kernels (one extension module, built once and cached by torch).
#include <torch/extension.h>

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, double scale);
torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
bool linear_bf16_supported();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU)");
  m.def("linear_bf16", &linear_bf16, "small-batch bf16 linear (CPU, AVX-512 BF16)");
  m.def("linear_bf16_supported", &linear_bf16_supported);
}
