"""--quantization int8: per-channel symmetric rows, the layer against its dequantized weights, batch
invariance, errors that name what is wrong, and a whole model against its unquantized self."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType

from pagoda import LLM
from pagoda.model.layers.linear import Linear, configure_linear
from pagoda.model.layers.quantization.int8 import Int8LinearMethod, quantize_int8_rows
from pagoda.model.cpu_kernels import load_cpu_kernels
from tests.model.test_gguf_native import _decode_logits, _int8_blocks, filled_linear, meets_int8_activations, top1_agreement

OPS = load_cpu_kernels()
# The GGUF Q8_0 kernel where the C++ kernels build; torch's _weight_int8pack_mm without them.
PATHS = [pytest.param(OPS, id="kernel", marks=pytest.mark.skipif(OPS is None, reason="no C++ kernels")),
         pytest.param(None, id="torch")]


def _layer(weight: torch.Tensor, output_sizes: list[int], dtype: torch.dtype, bias: torch.Tensor | None = None,
           ops=None) -> Linear:  # noqa: ANN001 - the kernels' module or None
    return filled_linear(Int8LinearMethod(ops), weight, weight.shape[1], output_sizes, dtype, bias)


def test_rows_quantize_symmetrically_within_half_a_step() -> None:
    w = torch.randn(9, 70) * torch.logspace(-3, 1, 9)[:, None]  # rows of very different ranges
    q, scale = quantize_int8_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and (q.abs().amax(dim=1) == 127).all()
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()
    zero_q, zero_scale = quantize_int8_rows(torch.zeros(2, 8))
    assert (zero_q == 0).all() and (zero_scale == 0).all()


@pytest.mark.parametrize("ops", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_the_layer_matches_its_dequantized_weights(ops, dtype: torch.dtype, rows: int) -> None:  # noqa: ANN001
    torch.manual_seed(rows)
    w, bias = torch.randn(48, 64), torch.randn(48)
    layer = _layer(w, [32, 16], dtype, bias, ops)
    if ops is None:
        q, scale = quantize_int8_rows(w)
        x = torch.randn(rows, 64).to(dtype)
        ref = x.float() @ (q.float() * scale.to(dtype).float()[:, None]).T + bias.to(dtype).float()
    else:  # fp16 scales; decode rows (and AMX tiles' rows) meet int8 activations
        q, scale = quantize_int8_rows(w, torch.float16)
        x = torch.randn(rows, 64).to(dtype)
        xq = _int8_blocks(x) if meets_int8_activations(ops, rows, GGMLQuantizationType.Q8_0) else x.float()
        ref = xq @ (q.float() * scale.float()[:, None]).T + bias.to(dtype).float()
    got = layer(x)
    assert got.dtype == dtype and got.shape == (rows, 48)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    assert layer.weight.element_size() == 1 and layer.weight.numel() < w.numel() * 1.1  # ~half of bf16's bytes


@pytest.mark.parametrize("ops", PATHS)
def test_batch_invariant_mode_computes_each_row_alone(ops) -> None:  # noqa: ANN001
    layer = _layer(torch.randn(20, 32), [20], torch.float32, ops=ops)
    x = torch.randn(7, 32)
    configure_linear(batch_invariant=True)
    try:
        together = layer(x)
    finally:
        configure_linear(batch_invariant=False)
    assert torch.equal(together, torch.cat([layer(x[i : i + 1]) for i in range(7)]))


@pytest.mark.parametrize("ops", PATHS)
def test_a_tensor_of_the_wrong_shape_is_refused_by_name(ops) -> None:  # noqa: ANN001
    layer = Linear(32, [8, 8], False, torch.float32, Int8LinearMethod(ops))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up_proj.weight' has shape \(8, 16\), expected \(8, 32\)"):
        layer.weight.weight_loader(layer.weight, torch.zeros(8, 16), 1, "model.layers.0.mlp.up_proj.weight")


def test_an_unknown_quantization_is_named_with_the_supported_ones(bundled_gguf) -> None:
    with pytest.raises(ValueError, match=r"quantization must be one of int8, int4, gptq, awq, got 'int3'"):
        LLM(str(bundled_gguf), quantization="int3")


def test_dummy_weights_fill_quantized_layers(make_tiny_model) -> None:
    folder, _ = make_tiny_model("llama")
    llm = LLM(str(folder), load_format="dummy", quantization="int8", num_kv_blocks=16, block_size=4)
    model = llm.engine.runner.model
    assert model.layers[0].qkv_proj.weight.element_size() == 1
    assert torch.isfinite(_decode_logits(llm, list(range(100, 110)), 8)).all()


def test_an_int8_model_is_nearly_as_faithful_as_bf16(bundled_gguf) -> None:
    """Top-1 agreement with the fp32 model over 60 decode steps (the bundled weights, dequantized, then
    quantized per channel)."""
    int8, bf16, fp32 = (LLM(str(bundled_gguf), dtype=d, quantization=q, num_kv_blocks=64, block_size=16)
                        for d, q in (("bfloat16", "int8"), ("bfloat16", None), ("float32", None)))
    layer = int8.engine.runner.model.layers[0]
    assert layer.qkv_proj.weight.element_size() == 1 and layer.down_proj.weight.element_size() == 1
    assert int8.engine.runner.model.embed_tokens.weight.element_size() == 1  # the tied output projection too
    int8_agreement, bf16_agreement = top1_agreement(fp32, int8, bf16)
    assert int8_agreement >= min(0.9, bf16_agreement - 0.05), (int8_agreement, bf16_agreement)
