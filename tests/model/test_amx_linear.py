"""Prompt-sized products on AMX int8 tiles (pagoda/csrc/amx_tiles.h): GGUF Q4_0/Q4_1/Q8_0 and int4 panels
against the VNNI kernels (the same int8 activations: equal up to fp32 rounding) and against the weights'
dequantized values, ragged row and column counts, each row computed alone, and which path a layer takes
(PAGODA_DISABLE_AMX=1 included). Skipped where the CPU or the OS offers no AMX int8."""

from __future__ import annotations

import pytest
import torch

from pagoda.model.cpu_kernels import load_cpu_kernels
from pagoda.model.layers.quantization import int4
from pagoda.model.layers.linear import configure_linear
from pagoda.model.layers.quantization.gguf import (
    AMX_MAX_ROWS,
    AMX_TYPES,
    NATIVE_MAX_ROWS,
    TILE_MIN_ROWS_ENV,
    TILE_TYPES,
    GGUFLinearMethod,
)
from pagoda.model.layers.quantization.grid import dequantize_groups, quantize_groups
from tests.model.test_gguf_native import _int8_blocks, _quantized, filled_linear, kernel_rows
from tests.model.test_int4 import int4_panels

OPS = load_cpu_kernels()
pytestmark = pytest.mark.skipif(OPS is None or not OPS.amx_available(),
                                reason="no AMX int8 here (CPU, OS or build), or no C++ kernels")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
ROWS = [17, 40, 128]  # more than one tile of 16, ragged, several


def _close(got: torch.Tensor, vnni: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == ref.shape
    # Against the VNNI kernel only the order of the fp32 sums differs (and bf16's last rounding of the output).
    same = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.float(), vnni.float(), rtol=same, atol=same * ref.abs().max().item())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("qtype", AMX_TYPES, ids=[t.name for t in AMX_TYPES])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
def test_gguf_rows_on_tiles_match_the_vnni_kernel_and_the_weights(qtype, dtype: torch.dtype, rows: int) -> None:  # noqa: ANN001
    in_features, out_features = 192, 67  # 67: a partial tile of weight rows
    raw, w = _quantized(qtype, out_features, in_features, seed=rows)
    grouped = kernel_rows(raw, qtype, in_features)
    torch.manual_seed(rows)
    x, bias = torch.randn(rows, in_features).to(dtype), torch.randn(out_features)
    ref = _int8_blocks(x) @ w.T + bias.to(dtype).float()
    got = OPS.gguf_linear_amx(x, grouped, int(qtype), bias)
    _close(got, OPS.gguf_linear(x, grouped, int(qtype), bias), ref, dtype)


TILE_Q4 = [t for t in AMX_TYPES if t in TILE_TYPES]


@pytest.mark.parametrize("qtype", TILE_Q4, ids=[t.name for t in TILE_Q4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 5, 16])
@pytest.mark.parametrize("in_features", [192, 576])
def test_a_few_q4_rows_on_tiles_of_their_own_match_the_vnni_kernel(qtype, dtype: torch.dtype, rows: int,  # noqa: ANN001
                                                                   in_features: int) -> None:
    """amx_q4_rows: tiles of exactly the step's rows (a token and its drafts); 192 = one whole group of four
    blocks and a partial one, 576 = 18 blocks; 67 weight rows = four whole tiles of 16 and a partial one."""
    raw, w = _quantized(qtype, 67, in_features, seed=rows + in_features)
    grouped = kernel_rows(raw, qtype, in_features)
    torch.manual_seed(rows)
    x, bias = torch.randn(rows, in_features).to(dtype), torch.randn(67)
    ref = _int8_blocks(x) @ w.T + bias.to(dtype).float()
    got = OPS.gguf_linear_amx(x, grouped, int(qtype), bias)
    _close(got, OPS.gguf_linear(x, grouped, int(qtype), bias), ref, dtype)
    alone = OPS.gguf_linear_amx(x[-1:], grouped, int(qtype), bias)  # a row's outputs: the same beside others
    assert torch.equal(alone, got[-1:])


def test_steps_of_a_few_rows_take_their_own_tiles_from_tile_min_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    qtype = TILE_Q4[-1]
    raw, _ = _quantized(qtype, 48, 96, seed=9)
    few, one = torch.randn(3, 96), torch.randn(1, 96)
    default = filled_linear(GGUFLinearMethod(qtype, OPS), raw, 96, [48], torch.float32)
    assert torch.equal(default(few), OPS.gguf_linear(few, default.weight, int(qtype), None))  # off by default
    monkeypatch.setenv(TILE_MIN_ROWS_ENV, "3")
    layer = filled_linear(GGUFLinearMethod(qtype, OPS), raw, 96, [48], torch.float32)
    assert torch.equal(layer(few), OPS.gguf_linear_amx(few, layer.weight, int(qtype), None))
    assert torch.equal(layer(one), OPS.gguf_linear(one, layer.weight, int(qtype), None))
    configure_linear(batch_invariant=True)  # every row count the VNNI kernel's way
    try:
        assert torch.equal(layer(few), OPS.gguf_linear(few, layer.weight, int(qtype), None))
    finally:
        configure_linear(batch_invariant=False)
    for bad in ("many", "17", "-1"):
        monkeypatch.setenv(TILE_MIN_ROWS_ENV, bad)
        with pytest.raises(ValueError, match=TILE_MIN_ROWS_ENV):
            GGUFLinearMethod(qtype, OPS)


@pytest.mark.parametrize(("k", "group"), [(576, 32), (576, 64), (576, 128), (1536, 256), (576, 576), (96, 64)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_panels_on_tiles_match_the_vnni_kernel_and_the_weights(k: int, group: int, dtype: torch.dtype) -> None:
    """Group sizes of one, two and more blocks, a short last group (576 = 4.5 x 128), one group per row."""
    torch.manual_seed(k + group)
    q, scale, zero = quantize_groups(torch.randn(40, k), group, bits=4, sym=False)
    rows_of_w = int4_panels(q, scale, zero, group)
    w = dequantize_groups(q, scale, zero, group)
    for rows in ROWS:
        x, bias = torch.randn(rows, k).to(dtype), torch.randn(40)
        ref = _int8_blocks(x) @ w.T + bias.to(dtype).float()
        got = OPS.int4_linear_amx(x, rows_of_w, group, bias)
        _close(got, OPS.int4_linear(x, rows_of_w, group, bias), ref, dtype)


def test_each_row_is_computed_alone() -> None:
    """A row's outputs do not depend on the rows beside it or on where it sits in the tiles of 16."""
    raw, _ = _quantized(AMX_TYPES[1], 50, 128, seed=1)
    grouped = kernel_rows(raw, AMX_TYPES[1], 128)
    x = torch.randn(37, 128).to(torch.bfloat16)
    together = OPS.gguf_linear_amx(x, grouped, int(AMX_TYPES[1]), None)
    moved = torch.cat([torch.randn(5, 128).to(torch.bfloat16), x[20:]])
    assert torch.equal(OPS.gguf_linear_amx(moved, grouped, int(AMX_TYPES[1]), None)[5:], together[20:])


@pytest.mark.parametrize("disabled", [False, True])
def test_prompt_rows_take_the_tiles_unless_turned_off(disabled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """More rows than the VNNI kernel takes: AMX tiles; more than AMX_MAX_ROWS: the dequantized weights' dense
    product. With PAGODA_DISABLE_AMX=1 GGUF and int4 panels stay on the VNNI panel kernel at every row count."""
    if disabled:
        monkeypatch.setenv("PAGODA_DISABLE_AMX", "1")
    qtype = AMX_TYPES[0]
    raw, w = _quantized(qtype, 48, 96, seed=4)
    layer = filled_linear(GGUFLinearMethod(qtype, OPS), raw, 96, [48], torch.float32)
    int4_layer = filled_linear(int4.Int4LinearMethod(OPS, 32), torch.randn(48, 96), 96, [48], torch.float32)
    longer = torch.randn(AMX_MAX_ROWS + 1, 96)  # past what the tiles take
    x = torch.randn(NATIVE_MAX_ROWS + 1, 96)
    if disabled:
        for rows in (longer, x):
            assert torch.equal(layer(rows), OPS.gguf_linear(rows, layer.weight, int(qtype), None))
        assert torch.equal(int4_layer(x), OPS.int4_linear(x, int4_layer.weight, 32, None))
    else:
        torch.testing.assert_close(layer(longer), longer @ w.T, rtol=1e-5, atol=1e-4)
        assert torch.equal(layer(x), OPS.gguf_linear_amx(x, layer.weight, int(qtype), None))
        assert torch.equal(int4_layer(x), OPS.int4_linear_amx(x, int4_layer.weight, 32, None))


def test_a_type_without_a_tile_path_is_named() -> None:
    with pytest.raises(RuntimeError, match=r"gguf_linear_amx: GGML type 12 is not one of Q4_0 \(2\), Q4_1 \(3\), Q8_0"):
        OPS.gguf_linear_amx(torch.randn(20, 256), torch.zeros(4, 144, dtype=torch.uint8), 12, None)
