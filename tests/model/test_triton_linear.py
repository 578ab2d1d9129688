"""The Triton quantized-linear kernel (the CUDA path of int4 layers, GPTQ and AWQ included, and of GGUF
Q4_0/Q4_1/Q8_0 layers) under TRITON_INTERPRET=1 on CPU tensors, against the torch path (the same rows
dequantized in torch, then the dense matmul) and, through whole checkpoints, against HF transformers and
against the CPU engine."""

from __future__ import annotations

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
from tests.model.test_gguf_native import _quantized, filled_linear  # noqa: E402
from tests.model.test_gptq_awq import CASES, TOKENS, prefill_logits, write_quantized  # noqa: E402

DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, group_size: int, in_features: int,
                bias: torch.Tensor | None) -> torch.Tensor:
    return triton_linear.quantized_linear(x, qweight, triton_linear.INT4, in_features, bias, group_size)


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
    for b in (None, bias):
        expected = F.linear(x.float(), weight.float(), None if b is None else b.float())
        got = int4_linear(x, qweight, group_size, in_features, b)
        assert got.dtype == dtype and got.shape == (rows, out_features)
        torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)


def test_each_row_is_computed_alone() -> None:
    qweight = packed(64, 128, 64, seed=0)
    x = torch.randn(20, 128).to(torch.bfloat16)
    together = int4_linear(x, qweight, 64, 128, None)
    alone = torch.cat([int4_linear(row, qweight, 64, 128, None) for row in x.split(1)])
    assert torch.equal(together, alone)


def test_shapes_that_do_not_fit_are_named() -> None:
    qweight = packed(8, 128, 64, seed=0)
    with pytest.raises(ValueError, match=r"quantized_linear: x must be \[rows, 128\]"):
        int4_linear(torch.randn(2, 96), qweight, 64, 128, None)
    with pytest.raises(ValueError, match=r"quantized_linear: qweight must be uint8 \[out, row bytes\]"):
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
    got = triton_linear.quantized_linear(x, layer.weight, int(qtype), in_features, layer.bias)
    # Sums of 192 unit-scale products: bf16's rounding of a weight or an output scales with their size.
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
    folder, hf = make_tiny_model("llama", seed=3)
    quantized = write_quantized(folder, hf, tmp_path / case, **CASES[case])
    llm = LLM(str(quantized), dtype="float32", num_kv_blocks=16, block_size=4)
    calls.clear()
    with torch.no_grad():
        expected = hf(torch.tensor([TOKENS])).logits[0].float()
    torch.testing.assert_close(prefill_logits(llm, TOKENS), expected, rtol=1e-4, atol=1e-4)
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
