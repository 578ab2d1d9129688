// Python bindings of Pagoda's CPU kernels (one extension module, built once and cached by torch).
#include <torch/extension.h>

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, double scale);
torch::Tensor linear_rowwise(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
bool linear_rowwise_fast(torch::Tensor x);
torch::Tensor argmax_rows(torch::Tensor x);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU)");
  m.def("linear_rowwise", &linear_rowwise, "row-independent linear (fp32/bf16)");
  m.def("linear_rowwise_fast", &linear_rowwise_fast, "whether linear_rowwise has a vector path for x");
  m.def("argmax_rows", &argmax_rows, "row-wise argmax (float32 / bfloat16), ties to the lowest index");
}
