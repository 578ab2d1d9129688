"""Group-wise int4 layers (--quantization int4; GPTQ/AWQ unpack to them): the row and panel layouts, the C++
kernel and torch's path against the dequantized weights, group sizes with a short last group, each row summed
alone, batch invariance, errors that name what is wrong, and a whole model against its unquantized self."""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM
from pagoda.model.cpu_kernels import load_cpu_kernels
from pagoda.model.layers.linear import Linear, configure_linear
from pagoda.model.layers.quantization import int4, panels
from pagoda.model.layers.quantization.gguf import NATIVE_MAX_ROWS
from pagoda.model.layers.quantization.grid import dequantize_groups, grid, quantize_groups
from tests.model.test_gguf_native import _int8_blocks, filled_linear, meets_int8_activations, top1_agreement

OPS = load_cpu_kernels()
PATHS = [pytest.param(OPS, id="kernel", marks=pytest.mark.skipif(OPS is None, reason="no C++ kernels")),
         pytest.param(None, id="torch")]
# (in_features, group): whole groups, a short last group (576 = 4.5 x 128, 576 = 6 x 96), one group per row.
SHAPES = [(576, 32), (576, 64), (576, 128), (1536, 256), (576, 96), (576, 576), (96, 64), (32, 64)]


def int4_panels(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """int4 rows as a layer on the CPU kernels holds them: in panels."""
    return panels.pack(int4.pack_rows(q, scale, zero), int4.panel_format(q.shape[1], group))


def _layer(weight: torch.Tensor, output_sizes: list[int], group: int, dtype: torch.dtype, ops,  # noqa: ANN001
           bias: torch.Tensor | None = None) -> Linear:
    return filled_linear(int4.Int4LinearMethod(ops, group), weight, weight.shape[1], output_sizes, dtype, bias)


@pytest.mark.parametrize(("k", "group"), SHAPES)
def test_rows_pack_and_unpack_exactly(k: int, group: int) -> None:
    q, scale, zero = quantize_groups(torch.randn(24, k), group, bits=4, sym=False)
    rows = int4.pack_rows(q, scale, zero)
    assert rows.dtype == torch.uint8 and rows.shape == (24, int4.row_bytes(k, group))
    assert rows.shape[1] == k // 2 + 3 * -(-k // group)  # 4 bits a weight, fp16 scale + uint8 zero a group
    for got, want in zip(int4.unpack_rows(rows, k, group), (q, scale, zero)):
        assert torch.equal(got, want)


@pytest.mark.parametrize(("k", "group"), [(192, 64), (224, 64), (96, 96)])
def test_panels_put_a_groups_blocks_then_its_scales_and_zeros(k: int, group: int) -> None:
    """pagoda/csrc/quant_panels.h's layout, byte by byte from a plain loop: per panel of 16 rows (the last one
    narrower) and group (224 = 3.5 x 64: a short last group), each block's word t of every row for every t,
    then the rows' fp16 scales, then their zeros."""
    rows = int4.pack_rows(*quantize_groups(torch.randn(21, k), group, bits=4, sym=False))
    blocks, groups = k // 32, -(-k // group)
    expected = []
    for start in (0, 16):
        panel_rows = rows[start : start + 16].tolist()
        for g in range(groups):
            for b in range(g * group // 32, min(blocks, (g + 1) * group // 32)):
                for t in range(4):
                    for row in panel_rows:
                        expected += row[16 * b + 4 * t : 16 * b + 4 * t + 4]
            for row in panel_rows:
                expected += row[k // 2 + 2 * g : k // 2 + 2 * g + 2]
            for row in panel_rows:
                expected += [row[k // 2 + 2 * groups + g]]
    fmt = int4.panel_format(k, group)
    packed = panels.pack(rows, fmt)
    assert packed.shape == rows.shape and packed.reshape(-1).tolist() == expected
    assert torch.equal(panels.unpack(packed, fmt), rows)


def test_round_to_nearest_stays_within_half_a_step_and_keeps_zero_exact() -> None:
    w = torch.randn(16, 256) * torch.logspace(-3, 1, 16)[:, None]
    w[3, :64] = 0
    q, scale, zero = quantize_groups(w, 64, bits=4, sym=False)
    assert int(q.max()) <= 15 and int(zero.max()) <= 15
    err = (dequantize_groups(q, scale, zero, 64) - w).abs().reshape(16, 4, 64)
    assert (err <= scale.float()[:, :, None] / 2 * 1.001 + 1e-7).all()
    assert (dequantize_groups(q, scale, zero, 64)[3, :64] == 0).all()


def test_a_grid_that_must_keep_zero_above_zero_stretches_to_the_max() -> None:
    """GPTQ's v1 layout stores zero - 1: an all-positive group gets zero 1 and still reaches its max."""
    w = torch.tensor([[0.0, 0.5, 1.0, 1.5]])
    scale, zero = grid(w, bits=4, sym=False, min_zero=1)
    assert zero.item() == 1 and abs(scale.item() * (15 - 1) - 1.5) < 1e-3


@pytest.mark.parametrize("ops", PATHS)
@pytest.mark.parametrize(("k", "group"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_layer_matches_its_dequantized_weights(ops, k: int, group: int, dtype: torch.dtype) -> None:  # noqa: ANN001
    torch.manual_seed(k + group)
    w, bias = torch.randn(40, k), torch.randn(40)
    layer = _layer(w, [24, 16], group, dtype, ops, bias)
    reference_w = dequantize_groups(*quantize_groups(w, group, bits=4, sym=False), group)
    for rows in (1, 3, 9, NATIVE_MAX_ROWS, NATIVE_MAX_ROWS + 5):
        x = torch.randn(rows, k).to(dtype)
        xq = _int8_blocks(x) if meets_int8_activations(ops, rows) else x.float()
        ref = xq @ reference_w.T + bias.to(dtype).float()
        got = layer(x)
        assert got.dtype == dtype and got.shape == (rows, 40)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.skipif(OPS is None, reason="no C++ kernels")
@pytest.mark.parametrize(("k", "group"), SHAPES)
def test_the_kernels_dequantization_matches_torchs(k: int, group: int) -> None:
    q, scale, zero = quantize_groups(torch.randn(19, k), group, bits=4, sym=False)
    stored = int4_panels(q, scale, zero, group)
    for dtype in (torch.float32, torch.bfloat16):
        ours = OPS.int4_dequantize(stored, group, k, dtype)
        torch_path = dequantize_groups(q, scale, zero, group, dtype)
        assert torch.equal(ours, torch_path)
        picked = torch.tensor([18, 0, 18, 5])
        assert torch.equal(OPS.int4_dequantize(stored, group, k, dtype, picked), torch_path[picked])


@pytest.mark.skipif(OPS is None, reason="no C++ kernels")
@pytest.mark.parametrize(("k", "group"), SHAPES)
def test_a_few_rows_sum_as_they_do_beside_more_rows(k: int, group: int) -> None:
    """Up to eight rows of x take a panel a pass, more take several passes, and a narrower last panel masked
    lanes: a row's outputs are bit for bit the same whatever rows are beside it (speculative decoding's
    verification rows give the one-row step's logits)."""
    torch.manual_seed(k * group)
    layer = _layer(torch.randn(67, k), [67], group, torch.float32, OPS)
    x = torch.randn(NATIVE_MAX_ROWS, k)
    beside = layer(x)
    for start, stop in ((0, 1), (1, 3), (2, 6), (3, 12), (5, 14)):
        assert torch.equal(layer(x[start:stop]), beside[start:stop])


@pytest.mark.parametrize("ops", PATHS)
def test_embedding_rows_are_the_dequantized_rows(ops) -> None:  # noqa: ANN001
    """Rows picked from panels (37 rows: two panels of 16 and one of 5) or from plain rows alike."""
    w = torch.randn(37, 96)
    layer = _layer(w, [37], 32, torch.float32, ops)
    ids = torch.tensor([[36, 0], [17, 36]])
    assert torch.equal(layer.embed(ids), dequantize_groups(*quantize_groups(w, 32, bits=4, sym=False), 32)[ids])


@pytest.mark.parametrize("ops", PATHS)
def test_batch_invariant_mode_computes_each_row_alone(ops) -> None:  # noqa: ANN001
    layer = _layer(torch.randn(20, 128), [20], 64, torch.float32, ops)
    x = torch.randn(7, 128)
    configure_linear(batch_invariant=True)
    try:
        together = layer(x)
    finally:
        configure_linear(batch_invariant=False)
    assert torch.equal(together, torch.cat([layer(x[i : i + 1]) for i in range(7)]))


def test_an_unsupported_group_size_is_named_with_the_supported_ones() -> None:
    with pytest.raises(ValueError, match=r"int4 group size 48 is not supported; supported: multiples of 32, or the whole"):
        Linear(576, [8], False, torch.float32, int4.Int4LinearMethod(OPS, 48))
    if OPS is not None:
        rows = int4_panels(*quantize_groups(torch.randn(4, 192), 64, bits=4, sym=False), 64)
        with pytest.raises(RuntimeError, match="group size 48 is not a multiple of 32"):
            OPS.int4_linear(torch.randn(1, 192), rows, 48, None)
        with pytest.raises(RuntimeError, match="weight rows hold 105 bytes, but 192 inputs in groups of 32 take 114"):
            OPS.int4_linear(torch.randn(1, 192), rows, 32, None)


def test_a_tensor_of_the_wrong_shape_is_refused_by_name() -> None:
    layer = Linear(64, [8, 8], False, torch.float32, int4.Int4LinearMethod(OPS, 32))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up_proj.weight' has shape \(8, 32\), expected \(8, 64\)"):
        layer.weight.weight_loader(layer.weight, torch.zeros(8, 32), 1, "model.layers.0.mlp.up_proj.weight")


def test_the_group_size_must_be_one_int4_takes() -> None:
    with pytest.raises(ValueError, match=r"quantization_group_size must be one of 32, 64, 128, got 96"):
        LLM("smollm2-135m", quantization="int4", quantization_group_size=96)


@pytest.mark.slow
def test_an_int4_model_stays_close_to_its_unquantized_self(bundled_gguf) -> None:
    """Top-1 agreement with the fp32 model over 60 decode steps; the bundled Q4_1 weights, dequantized, then
    requantized in groups of 32. Q4_1's grids start at each block's minimum, int4's at a whole number of
    steps below 0, so nearly every weight is rounded a second time: agreement is ~0.67 here where a
    broken layer gives ~0 (bench quality has the perplexities)."""
    int4_llm, fp32 = (LLM(str(bundled_gguf), dtype=d, quantization=q, quantization_group_size=32, num_kv_blocks=64,
                          block_size=16) for d, q in (("bfloat16", "int4"), ("float32", None)))
    model = int4_llm.engine.runner.model
    assert isinstance(model.layers[0].down_proj.method, int4.Int4LinearMethod)
    assert model.embed_tokens.weight.element_size() == 1  # the vocabulary projection in int8
    dense_bytes = sum(p.numel() * 2 for p in fp32.engine.runner.model.parameters())
    assert sum(p.numel() * p.element_size() for p in model.parameters()) < dense_bytes / 2.5
    (agreement,) = top1_agreement(fp32, int4_llm)
    assert agreement >= 0.6, agreement
