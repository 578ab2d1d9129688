"""The Triton quantized-linear kernel (the CUDA path of int4 layers, GPTQ and AWQ included, and of GGUF
Q4_0/Q4_1/Q8_0 layers) under TRITON_INTERPRET=1 on CPU tensors, against the torch path (the same rows
dequantized in torch, then the dense matmul) and, through whole checkpoints, against HF transformers and
against the CPU engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType
from torch.nn import functional as F

pytest.importorskip("triton")

from pagoda import LLM  # noqa: E402
from pagoda.model.layers.quantization import gpu_kernel, triton_linear  # noqa: E402
from pagoda.model.gguf_file import GGUFFile  # noqa: E402
from pagoda.model.layers.quantization.gguf import (  # noqa: E402
    GPU_NATIVE_TYPES,
    GGUFLinearMethod,
    GGUFQuantConfig,
    dequantize_rows,
)
from pagoda.model.loader import gguf_to_hf_name  # noqa: E402
from pagoda.model.layers.quantization.grid import quantize_groups  # noqa: E402
from pagoda.model.layers.quantization.int4 import Int4LinearMethod, pack_rows  # noqa: E402
from pagoda.model.layers.quantization.int8 import quantize_int8_rows  # noqa: E402
from tests.model.test_gguf_native import _quantized, filled_linear  # noqa: E402
from tests.model.test_gptq_awq import CASES, PREFILL_TOKENS, TOKENS, prefill_logits, write_quantized  # noqa: E402

DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]
# every tiling the kernel is launched with
TILES = (*triton_linear.DECODE_TILES, *(triton_linear.prefill_tiles(d) for d in (torch.float32, torch.bfloat16)))


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, group_size: int, in_features: int,
                bias: torch.Tensor | None, tiles: triton_linear.Tiles | None = None) -> torch.Tensor:
    return triton_linear.quantized_linear(x, qweight, triton_linear.INT4, in_features, bias, group_size, tiles=tiles)


def packed(out_features: int, in_features: int, group_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    return pack_rows(*quantize_groups(weight, group_size, bits=4, sym=False))


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("in_features, group_size", [
    (128, 32), (128, 64), (256, 128),
    (160, 128),  # a short last group (32 of 128)
    (96, 96),  # one group per row (GPTQ's group_size -1)
])
@pytest.mark.parametrize("rows", [1, 5, 33])  # one program's rows, a partial one, several
def test_the_kernel_matches_dequantize_then_matmul(dtype: torch.dtype, tol: float, in_features: int,
                                                   group_size: int, rows: int) -> None:
    out_features = 70  # not a multiple of the kernel's 64 output rows: the masked tail
    qweight = packed(out_features, in_features, group_size, seed=rows)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(out_features).to(dtype)
    weight = Int4LinearMethod(None, group_size).dequantize_weight(qweight, in_features, dtype)
    for b, tiles in [(None, None), (bias, None)] + [(bias, tiles) for tiles in TILES]:
        expected = F.linear(x.float(), weight.float(), None if b is None else b.float())
        got = int4_linear(x, qweight, group_size, in_features, b, tiles)
        assert got.dtype == dtype and got.shape == (rows, out_features)
        torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol, msg=lambda m: f"{tiles}: {m}")


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("rows", [1, 33])
def test_int8_rows_match_the_torch_path(dtype: torch.dtype, tol: float, rows: int) -> None:
    """``--quantization int8`` layers without the CPU kernels (so on CUDA): int8 codes and a scale per row."""
    in_features, out_features = 160, 70
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(rows)) * 0.05
    q, scale = quantize_int8_rows(weight)
    scale = scale.to(dtype)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(3)).to(dtype)
    bias = torch.randn(out_features).to(dtype)
    expected = F.linear(x.float(), q.float()) * scale.float() + bias.float()
    for tiles in TILES:
        got = triton_linear.quantized_linear(x, q, triton_linear.INT8, in_features, bias, scale=scale, tiles=tiles)
        torch.testing.assert_close(got.float(), expected, atol=tol * expected.abs().max().item(), rtol=tol)
    with pytest.raises(ValueError, match="int8 rows need their scales"):
        triton_linear.quantized_linear(x, q, triton_linear.INT8, in_features, bias)


def test_each_row_is_computed_alone() -> None:
    """Whatever the batch, and so whatever tiling it gets: each output adds its products in one order."""
    qweight = packed(64, 160, 64, seed=0)
    x = torch.randn(20, 160).to(torch.bfloat16)
    together = int4_linear(x, qweight, 64, 160, None)
    for tiles in TILES:
        alone = torch.cat([int4_linear(row, qweight, 64, 160, None, tiles) for row in x.split(1)])
        assert torch.equal(together, alone), tiles


def test_shapes_that_do_not_fit_are_named() -> None:
    qweight = packed(8, 128, 64, seed=0)
    with pytest.raises(ValueError, match=r"quantized_linear: x must be \[rows, 128\]"):
        int4_linear(torch.randn(2, 96), qweight, 64, 128, None)
    with pytest.raises(ValueError, match=r"quantized_linear: qweight must be torch.uint8 \[out, row bytes\]"):
        int4_linear(torch.randn(2, 128), qweight.float(), 64, 128, None)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("qtype", GPU_NATIVE_TYPES, ids=[t.name for t in GPU_NATIVE_TYPES])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_gguf_rows_match_dequantize_then_matmul(dtype: torch.dtype, tol: float, qtype, rows: int) -> None:  # noqa: ANN001
    in_features, output_sizes = 192, [40, 30]  # a fused layer of two shards, 70 rows: the masked tail
    raw, _ = _quantized(qtype, sum(output_sizes), in_features, seed=rows)
    bias = torch.randn(sum(output_sizes))
    layer = filled_linear(GGUFLinearMethod(qtype, None), raw, in_features, output_sizes, dtype, bias)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(2)).to(dtype)
    weight = dequantize_rows(None, layer.weight, qtype, in_features, dtype)
    expected = F.linear(x.float(), weight.float(), layer.bias.float())
    # Sums of 192 unit-scale products: bf16's rounding of a weight or an output scales with their size.
    for tiles in TILES:
        got = triton_linear.quantized_linear(x, layer.weight, int(qtype), in_features, layer.bias, tiles=tiles)
        torch.testing.assert_close(got.float(), expected, atol=tol * expected.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("case", ["gptq-4bit-act-order", "gptq-group-per-row", "awq"])
def test_a_checkpoint_through_the_cuda_path_gives_hf_logits(case: str, make_tiny_model, tmp_path,  # noqa: ANN001
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The layers' CUDA routing (act-order's column permutation included) taken on CPU tensors: every int4
    projection through the kernel, against HF transformers on the dequantized weights."""
    calls = []

    def kernel_everywhere(x: torch.Tensor) -> object:
        calls.append(x.shape)
        return triton_linear

    monkeypatch.setattr(gpu_kernel, "kernel_for", kernel_everywhere)
    monkeypatch.setenv("PAGODA_DISABLE_AMX", "1")  # CPU tensors: AMX tiles would come first
    # As on a GPU, the rows stay rows (not the CPU kernels' panels) and prompts skip the panel kernel.
    monkeypatch.setattr(Int4LinearMethod, "process_weights_after_loading", lambda self, layer: None)
    monkeypatch.setattr("pagoda.model.layers.quantization.gguf.panels_for_prompts", lambda ops: False)
    folder, hf = make_tiny_model("llama", seed=3)
    quantized = write_quantized(folder, hf, tmp_path / case, **CASES[case])
    llm = LLM(str(quantized), dtype="float32", num_kv_blocks=16, block_size=4)
    calls.clear()
    with torch.no_grad():
        expected = hf(torch.tensor([PREFILL_TOKENS])).logits[0].float()
    torch.testing.assert_close(prefill_logits(llm, PREFILL_TOKENS), expected, rtol=1e-4, atol=1e-4)
    assert len(calls) == 4 * hf.config.num_hidden_layers  # qkv, o, gate_up, down of every layer


def test_a_gpu_keeps_q4_0_q4_1_and_q8_0_blocks_and_dequantizes_k_quants(bundled_gguf) -> None:  # noqa: ANN001
    """What a GGUF file's layers get where the Triton kernel runs them (no C++ ops): the bundled Q4_1
    projections and Q8_0 vocabulary as stored, a K-quant layer dequantized at load."""
    gguf = GGUFFile(bundled_gguf)
    config = GGUFQuantConfig.from_file(gguf, gguf_to_hf_name, None)
    method = config.linear_method(["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"])
    assert isinstance(method, GGUFLinearMethod) and method.ops is None
    assert method.qtype == GGMLQuantizationType.Q4_1
    config.types["model.layers.1.mlp.down_proj.weight"] = GGMLQuantizationType.Q4_K
    assert config.linear_method(["model.layers.1.mlp.down_proj"]) is None


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_at_load_models_through_the_cuda_path_match_the_torch_path(
        quantization: str, make_tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """``--quantization int8|int4`` as a GPU loads them (no C++ kernels: int8 codes + a scale per row, int4 rows):
    every projection, the vocabulary's included, through the kernel's CUDA routing, against the torch path
    on the same weights. Qwen2's attention biases included."""
    monkeypatch.setattr("pagoda.model.loader.load_cpu_kernels", lambda: None)
    folder, _ = make_tiny_model("qwen2", seed=5)
    llm = LLM(str(folder), dtype="float32", quantization=quantization, quantization_group_size=32,
              num_kv_blocks=16, block_size=4)
    monkeypatch.setattr(gpu_kernel, "kernel_for", lambda x: None)
    expected = prefill_logits(llm, TOKENS)
    calls = []

    def kernel_everywhere(x: torch.Tensor) -> object:
        calls.append(x.shape)
        return triton_linear

    monkeypatch.setattr(gpu_kernel, "kernel_for", kernel_everywhere)
    torch.testing.assert_close(prefill_logits(llm, TOKENS), expected, rtol=1e-4, atol=1e-4)
    assert len(calls) == 4 * 2 + 1  # qkv, o, gate_up, down of both layers; the vocabulary projection


def test_the_gpu_benchmark_s_layers_and_tilings_are_right() -> None:
    """scripts/bench_quantized_gpu.py (run where a GPU is): the layers it builds of each layout agree with their
    dequantized weights through every tiling it times, here at a small size."""
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_quantized_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_quantized_gpu", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for kind in (triton_linear.INT4, triton_linear.Q4_0, triton_linear.Q8_0, triton_linear.INT8):
        qweight, scale, dense = bench.make_layer(kind, 70, 256, "cpu")
        for rows in (1, 40):
            x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
            expected = F.linear(x.float(), dense.float())
            for tiles in bench.variants(rows, 70, torch.device("cpu")):
                got = triton_linear.quantized_linear(x, qweight, kind, 256, None, bench.GROUP, scale=scale, tiles=tiles)
                assert bench.relative_error(got, expected) < 1e-2, (kind, tiles)
