"""The Triton int4 kernel (the CUDA path of int4 layers, GPTQ and AWQ included) under TRITON_INTERPRET=1 on
CPU tensors, against the torch path (the same packed rows dequantized in torch, then the dense matmul) and,
through a whole checkpoint, against HF transformers."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("triton")

from pagoda import LLM  # noqa: E402
from pagoda.model.layers.quantization import int4, triton_int4  # noqa: E402
from pagoda.model.layers.quantization.grid import quantize_groups  # noqa: E402
from pagoda.model.layers.quantization.int4 import Int4LinearMethod, pack_rows  # noqa: E402
from pagoda.model.layers.quantization.triton_int4 import int4_linear  # noqa: E402
from tests.model.test_gptq_awq import CASES, TOKENS, prefill_logits, write_quantized  # noqa: E402


def packed(out_features: int, in_features: int, group_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    return pack_rows(*quantize_groups(weight, group_size, bits=4, sym=False))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
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
    with pytest.raises(ValueError, match=r"int4_linear: x must be \[rows, 128\]"):
        int4_linear(torch.randn(2, 96), qweight, 64, 128, None)
    with pytest.raises(ValueError, match=r"int4_linear: qweight must be uint8 \[out, 70\]"):
        int4_linear(torch.randn(2, 128), qweight[:, :-1], 64, 128, None)


@pytest.mark.parametrize("case", ["gptq-4bit-act-order", "gptq-group-per-row", "awq"])
def test_a_checkpoint_through_the_cuda_path_gives_hf_logits(case: str, make_tiny_model, tmp_path,  # noqa: ANN001
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The layers' CUDA routing (act-order's column permutation included) taken on CPU tensors: every int4
    projection through the kernel, against HF transformers on the dequantized weights."""
    calls = []

    def kernel_everywhere(x: torch.Tensor) -> object:
        calls.append(x.shape)
        return triton_int4

    monkeypatch.setattr(int4, "gpu_kernel_for", kernel_everywhere)
    folder, hf = make_tiny_model("llama", seed=3)
    quantized = write_quantized(folder, hf, tmp_path / case, **CASES[case])
    llm = LLM(str(quantized), dtype="float32", num_kv_blocks=16, block_size=4)
    calls.clear()
    with torch.no_grad():
        expected = hf(torch.tensor([TOKENS])).logits[0].float()
    torch.testing.assert_close(prefill_logits(llm, TOKENS), expected, rtol=1e-4, atol=1e-4)
    assert len(calls) == 4 * hf.config.num_hidden_layers  # qkv, o, gate_up, down of every layer
