// Python bindings of Pagoda's CPU kernels (one extension module, built once and cached by torch).
#include <torch/extension.h>

#include "decode_layers.h"

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, double scale);
torch::Tensor linear_rowwise(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
bool linear_rowwise_fast(torch::Tensor x);
torch::Tensor argmax_rows(torch::Tensor x);
torch::Tensor sample_rows(torch::Tensor logits, torch::Tensor row_ids, torch::Tensor temperature,
                          torch::Tensor top_k, torch::Tensor top_p, torch::Tensor min_p, torch::Tensor uniform);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps);
torch::Tensor silu_and_mul(torch::Tensor gate_up);
void rotary_inplace(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
void apply_token_bitmask(torch::Tensor logits, torch::Tensor bits, torch::Tensor logit_rows);
torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor w, int64_t qtype, c10::optional<torch::Tensor> bias);
bool amx_available();
torch::Tensor gguf_linear_amx(torch::Tensor x, torch::Tensor w, int64_t qtype, c10::optional<torch::Tensor> bias);
torch::Tensor gguf_dequantize(torch::Tensor w, int64_t qtype, int64_t in_features, at::ScalarType dtype,
                              c10::optional<torch::Tensor> rows);
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor w, int64_t group_size, c10::optional<torch::Tensor> bias);
torch::Tensor int4_linear_amx(torch::Tensor x, torch::Tensor w, int64_t group_size, c10::optional<torch::Tensor> bias);
torch::Tensor int4_dequantize(torch::Tensor w, int64_t group_size, int64_t in_features, at::ScalarType dtype,
                              c10::optional<torch::Tensor> rows);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU)");
  m.def("linear_rowwise", &linear_rowwise, "row-independent linear (fp32/bf16)");
  m.def("linear_rowwise_fast", &linear_rowwise_fast, "whether linear_rowwise has a vector path for x");
  m.def("argmax_rows", &argmax_rows, "row-wise argmax (float32 / bfloat16), ties to the lowest index");
  m.def("sample_rows", &sample_rows, "temperature / top-k / top-p / min-p sampling by inverse CDF, one uniform a row");
  m.def("rms_norm", &rms_norm, "RMSNorm of the rows of x, fp32 accumulation");
  m.def("add_rms_norm", &add_rms_norm, "residual += x in place, then RMSNorm of residual");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up of a fused [rows, 2n] gate_up");
  m.def("rotary_inplace", &rotary_inplace, "rotate-half rotary embedding in place");
  m.def("gguf_linear", &gguf_linear, "x @ W.T + b for W in GGUF blocks (Q4_0/Q4_1/Q8_0 in panels), int8 activations (VNNI)");
  m.def("amx_available", &amx_available, "whether these kernels have AMX int8 tile products and may use them");
  m.def("gguf_linear_amx", &gguf_linear_amx, "gguf_linear for Q4_0/Q4_1/Q8_0 through AMX int8 tiles (prompts)");
  m.def("gguf_dequantize", &gguf_dequantize, "GGUF weight rows (all, or those named) -> fp32/bf16", py::arg("w"),
        py::arg("qtype"), py::arg("in_features"), py::arg("dtype"), py::arg("rows") = py::none());
  m.def("int4_linear", &int4_linear, "x @ W.T + b for W in group-wise asymmetric int4 panels, int8 activations (VNNI)");
  m.def("int4_linear_amx", &int4_linear_amx, "int4_linear through AMX int8 tiles (prompts)");
  m.def("int4_dequantize", &int4_dequantize, "group-wise int4 panels (all rows, or those named) -> fp32/bf16",
        py::arg("w"), py::arg("group_size"), py::arg("in_features"), py::arg("dtype"), py::arg("rows") = py::none());
  m.def("decode_layers_supported", &decode_layers_supported, "whether decode_layers runs on this CPU (AVX-512 VNNI)");
  py::class_<DecodeLayers>(m, "DecodeLayers", py::module_local(), "one model's decode steps of up to 16 rows through every layer")
      .def(py::init<std::vector<torch::Tensor>, std::vector<int64_t>, std::vector<int64_t>, std::vector<torch::Tensor>,
                    std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<double>, int64_t, int64_t,
                    int64_t, int64_t, double, double>())
      .def("run", &DecodeLayers::run, "a step through every decoder layer, hidden overwritten in place");
  m.def("apply_token_bitmask", &apply_token_bitmask, "-inf in place for each token a grammar bitmask forbids");
}
