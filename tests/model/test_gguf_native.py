"""GGUF blocks executed as stored: the C++ kernel against a reference built from the gguf package's own
quantizer and dequantizer, the byte regrouping, the prefill tile path, and a whole model against its
dequantized self."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from pagoda import LLM
from pagoda.api.params import SamplingParams
from pagoda.engine.core.request import Request
from pagoda.model.cpu_kernels import load_cpu_kernels
from pagoda.model.gguf_file import dequantize
from pagoda.model.layers.linear import Linear, configure_linear
from pagoda.model.layers.quantization.gguf import (
    AMX_MAX_ROWS,
    NATIVE_MAX_ROWS,
    NATIVE_TYPES,
    GGUFLinearMethod,
    PANEL_TYPES,
    amx_tiles,
    dequantize_rows,
    panel_format,
    panels_for_prompts,
    regroup_rows,
    ungroup_rows,
)
from pagoda.model.layers.quantization import panels

OPS = load_cpu_kernels()
needs_kernels = pytest.mark.skipif(OPS is None, reason="C++ CPU kernels unavailable")
TYPE_IDS = [t.name for t in NATIVE_TYPES]


_K_QUANTS = (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K)
# Byte offsets of each K-quant block's fp16 super-scales (the other bytes may take any value).
_K_HALVES = {GGMLQuantizationType.Q4_K: (0, 2), GGMLQuantizationType.Q5_K: (0, 2), GGMLQuantizationType.Q6_K: (208,)}


def _random_k_blocks(qtype: GGMLQuantizationType, out_features: int, in_features: int, rng: np.random.Generator) -> np.ndarray:
    """K-quant rows (which the gguf package cannot quantize to): random bytes, with sane fp16 super-scales."""
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (out_features, in_features // block, block_bytes), dtype=np.uint8)
    for at in _K_HALVES[qtype]:
        halves = rng.uniform(0.001, 0.02, raw.shape[:2]).astype(np.float16)
        raw[:, :, at : at + 2] = halves.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(out_features, -1)


def _quantized(qtype: GGMLQuantizationType, out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF rows of a random weight (the gguf package's quantizer; random K-quant blocks) and their
    dequantized fp32 values by the gguf package's arithmetic."""
    rng = np.random.default_rng(seed)
    if qtype in _K_QUANTS:
        raw = torch.from_numpy(_random_k_blocks(qtype, out_features, in_features, rng))
    else:
        w = rng.standard_normal((out_features, in_features)).astype(np.float32)
        raw = torch.from_numpy(quants.quantize(w, qtype).copy())
    return raw, dequantize(raw.reshape(-1), qtype, (out_features, in_features)).float()


def kernel_rows(raw: torch.Tensor, qtype: GGMLQuantizationType, in_features: int) -> torch.Tensor:
    """GGUF rows as a layer on the CPU kernels holds them: regrouped, and Q4_0/Q4_1/Q8_0 in panels."""
    grouped = regroup_rows(raw, qtype)
    return panels.pack(grouped, panel_format(qtype, in_features)) if qtype in PANEL_TYPES else grouped


def _widths(qtype: GGMLQuantizationType) -> list[int]:
    return [256, 512, 768] if qtype in _K_QUANTS else [96, 192, 576]


def _int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """``x`` after the kernel's activation quantization: int8 per block of 32, scale max|x| / 127, each value
    times the scale's fp32 inverse rounded to nearest (dividing instead rounds some halves the other way)."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    scale = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inverse = torch.where(scale > 0, 1 / scale.clamp_min(1e-30), torch.zeros_like(scale))
    q = torch.round(blocks * inverse)
    return (q * scale).reshape(x.shape[0], -1)


def meets_int8_activations(ops, rows: int, qtype: GGMLQuantizationType | None = None) -> bool:  # noqa: ANN001
    """Whether a quantized layer's input of ``rows`` rows goes through kernels that quantize it to int8 (the
    VNNI kernels, AMX tiles) rather than through the dequantized weights' dense product; ``qtype``: the layer's
    GGUF type (a GGUF or int8 layer), None for int4 (in panels, as Q4_0/Q4_1/Q8_0)."""
    return ops is not None and (rows <= NATIVE_MAX_ROWS or (rows <= AMX_MAX_ROWS and amx_tiles(ops))
                                or (qtype in (*PANEL_TYPES, None) and panels_for_prompts(ops)))


def filled_linear(method, weights: torch.Tensor, in_features: int, output_sizes: list[int], dtype: torch.dtype,  # noqa: ANN001
                  bias: torch.Tensor | None = None) -> Linear:
    """A Linear of ``method`` whose shards (and bias) are handed in through their weight loaders, as a
    checkpoint's q/k/v or gate/up tensors are."""
    layer = Linear(in_features, output_sizes, bias is not None, dtype, method)
    start = 0
    for shard, size in enumerate(output_sizes):
        layer.weight.weight_loader(layer.weight, weights[start : start + size], shard, f"w{shard}")
        if bias is not None:
            layer.bias.weight_loader(layer.bias, bias[start : start + size].to(dtype), shard, f"b{shard}")
        start += size
    finish = getattr(method, "process_weights_after_loading", None)
    if finish is not None:  # as the model does once every checkpoint tensor is in
        finish(layer)
    return layer


def _layer(qtype: GGMLQuantizationType, raw: torch.Tensor, in_features: int, output_sizes: list[int], dtype: torch.dtype,
           bias: torch.Tensor | None = None) -> Linear:
    return filled_linear(GGUFLinearMethod(qtype, OPS), raw, in_features, output_sizes, dtype, bias)


@pytest.mark.parametrize("qtype", NATIVE_TYPES, ids=TYPE_IDS)
def test_regrouping_keeps_every_byte_and_inverts(qtype: GGMLQuantizationType) -> None:
    raw, _ = _quantized(qtype, 5, _widths(qtype)[1])
    grouped = regroup_rows(raw, qtype)
    assert grouped.shape == raw.shape
    if qtype == GGMLQuantizationType.Q8_0:  # quants stored plus 128: the kernel's unsigned operand
        blocks = raw.reshape(5, -1, 34)
        assert torch.equal(grouped[:, : blocks.shape[1] * 32], (blocks[:, :, 2:] ^ 0x80).reshape(5, -1))
    else:
        assert torch.equal(torch.sort(grouped, dim=1).values, torch.sort(raw, dim=1).values)
    assert torch.equal(ungroup_rows(grouped, qtype), raw)


@pytest.mark.parametrize("qtype", PANEL_TYPES, ids=[t.name for t in PANEL_TYPES])
def test_panels_put_sixteen_rows_words_side_by_side(qtype: GGMLQuantizationType) -> None:
    """pagoda/csrc/quant_panels.h's layout, byte by byte from a plain loop: per panel of 16 rows (the last one
    narrower) and block, word t of every row's quants, then the rows' scales, then Q4_1's offsets."""
    rows, width = 21, 64  # a whole panel and one of 5 rows; two blocks
    grouped = regroup_rows(_quantized(qtype, rows, width)[0], qtype)
    header = {GGMLQuantizationType.Q4_0: 2, GGMLQuantizationType.Q4_1: 4, GGMLQuantizationType.Q8_0: 2}[qtype]
    quant_bytes = GGML_QUANT_SIZES[qtype][1] - header
    blocks = width // 32
    expected = []
    for start in (0, 16):
        panel_rows = grouped[start : start + 16].tolist()
        for b in range(blocks):
            for t in range(quant_bytes // 4):
                for row in panel_rows:
                    expected += row[b * quant_bytes + 4 * t : b * quant_bytes + 4 * t + 4]
            for half in range(header // 2):
                at = blocks * quant_bytes + 2 * blocks * half + 2 * b
                for row in panel_rows:
                    expected += row[at : at + 2]
    packed = panels.pack(grouped, panel_format(qtype, width))
    assert packed.shape == grouped.shape and packed.reshape(-1).tolist() == expected
    assert torch.equal(panels.unpack(packed, panel_format(qtype, width)), grouped)


@needs_kernels
@pytest.mark.parametrize("qtype", NATIVE_TYPES, ids=TYPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpp_dequantize_matches_the_gguf_package(qtype: GGMLQuantizationType, dtype: torch.dtype) -> None:
    width = _widths(qtype)[0]
    raw, ref = _quantized(qtype, 7, width)
    grouped = regroup_rows(raw, qtype)
    stored = kernel_rows(raw, qtype, width)
    torch.testing.assert_close(dequantize_rows(OPS, stored, qtype, width, dtype), ref.to(dtype), rtol=1e-6, atol=1e-6)
    rows = torch.tensor([6, 0, 6, 3])
    assert torch.equal(OPS.gguf_dequantize(stored, int(qtype), width, dtype, rows),
                       dequantize_rows(OPS, stored, qtype, width, dtype)[rows])
    assert torch.equal(dequantize_rows(None, grouped, qtype, width, dtype), ref.to(dtype))


@needs_kernels
@pytest.mark.parametrize("qtype", NATIVE_TYPES, ids=TYPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("width", range(3))
def test_the_kernel_matches_dequantized_weights(qtype: GGMLQuantizationType, dtype: torch.dtype, width: int) -> None:
    in_features = _widths(qtype)[width]
    out_features = 67  # not a multiple of any tile
    raw, w = _quantized(qtype, out_features, in_features, seed=in_features)
    bias = torch.randn(out_features)
    layer = _layer(qtype, raw, in_features, [40, 27], dtype, bias)
    torch.manual_seed(in_features)
    for rows in range(1, NATIVE_MAX_ROWS + 1):
        x = torch.randn(rows, in_features).to(dtype)
        ref = _int8_blocks(x) @ w.T + bias.to(dtype).float()
        got = layer(x)
        assert got.dtype == dtype and got.shape == (rows, out_features)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("qtype", NATIVE_TYPES, ids=TYPE_IDS)
def test_prefill_rows_use_dequantized_tiles(qtype: GGMLQuantizationType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompt rows without AMX: Q4_0/Q4_1/Q8_0 panels on the panel kernel (int8 activations, each row as it
    would be alone), the K-quants (and panels where the kernel is not taken) on dequantized tiles."""
    monkeypatch.setenv("PAGODA_DISABLE_AMX", "1")  # (else Q4_0/Q4_1/Q8_0 prompts take AMX tiles: test_amx_linear.py)
    width = _widths(qtype)[0]
    raw, w = _quantized(qtype, 50, width)
    layer = _layer(qtype, raw, width, [50], torch.float32)
    x = torch.randn(2 * 128 + 19, width)  # more than one sweep of rows over the panels (quant_panels.h)
    assert layer.method.panels_for_prompts == (qtype in PANEL_TYPES and OPS.decode_layers_supported())
    if layer.method.panels_for_prompts:
        got = layer(x)
        torch.testing.assert_close(got, _int8_blocks(x) @ w.T, rtol=1e-4, atol=1e-4 * got.abs().max().item())
        assert torch.equal(got[-7:], layer(x[-7:]))
        layer.method.panels_for_prompts = False
    monkeypatch.setattr("pagoda.model.layers.quantization.gguf.DEQUANT_TILE_ROWS", 16)  # several tiles, a ragged last
    x = x[: NATIVE_MAX_ROWS + 3]
    torch.testing.assert_close(layer(x), x @ w.T, rtol=1e-5, atol=1e-4)


@needs_kernels
def test_batch_invariant_mode_keeps_every_row_on_the_kernel() -> None:
    qtype = GGMLQuantizationType.Q4_1
    raw, _ = _quantized(qtype, 33, 64)
    layer = _layer(qtype, raw, 64, [33], torch.float32)
    x = torch.randn(NATIVE_MAX_ROWS + 5, 64)
    configure_linear(batch_invariant=True)
    try:
        together = layer(x)
    finally:
        configure_linear(batch_invariant=False)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(x.shape[0])])
    assert torch.equal(together, alone)


@needs_kernels
@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0],
                         ids=["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("in_features", [96, 576, 736, 1536])  # blocks: 3; 16 + 2; 16 + 7; 48
def test_a_few_rows_sum_as_they_do_beside_more_rows(qtype: GGMLQuantizationType, in_features: int) -> None:
    """Up to eight rows of x take a panel a pass, more take several passes, and a narrower last panel masked
    lanes: a row's outputs are bit for bit the same whatever rows are beside it (speculative decoding's
    verification rows give the one-row step's logits)."""
    raw, w = _quantized(qtype, 67, in_features, seed=in_features)
    layer = _layer(qtype, raw, in_features, [67], torch.float32)
    x = torch.randn(NATIVE_MAX_ROWS, in_features)
    beside = layer(x)
    for start, stop in ((0, 1), (1, 3), (2, 6), (3, 12), (5, 14)):
        assert torch.equal(layer(x[start:stop]), beside[start:stop])
    torch.testing.assert_close(beside, _int8_blocks(x) @ w.T, rtol=1e-4, atol=1e-4 * beside.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("qtype", NATIVE_TYPES, ids=TYPE_IDS)
def test_embedding_rows_are_the_dequantized_rows(qtype: GGMLQuantizationType) -> None:
    width = _widths(qtype)[0]
    raw, w = _quantized(qtype, 20, width)
    layer = _layer(qtype, raw, width, [20], torch.float32)
    ids = torch.tensor([[3, 0], [19, 3]])
    torch.testing.assert_close(layer.embed(ids), w[ids], rtol=1e-6, atol=1e-6)


def test_a_type_without_a_kernel_is_named_with_the_native_ones() -> None:
    with pytest.raises(ValueError, match=r"GGUF type Q3_K; native: \['Q4_0', 'Q4_1', 'Q8_0', 'Q4_K', 'Q5_K', 'Q6_K'\]"):
        GGUFLinearMethod(GGMLQuantizationType.Q3_K, OPS)


@needs_kernels
def test_rows_of_the_wrong_width_are_refused_by_name() -> None:
    qtype = GGMLQuantizationType.Q8_0
    raw, _ = _quantized(qtype, 4, 64)
    layer = Linear(96, 4, False, torch.float32, GGUFLinearMethod(qtype, OPS))
    with pytest.raises(ValueError, match=r"'blk.0.attn_q.weight' has shape \(4, 68\), expected \(4, 102\)"):
        layer.weight.weight_loader(layer.weight, raw, None, "blk.0.attn_q.weight")


def _decode_logits(llm: LLM, tokens: list[int], prompt_len: int) -> torch.Tensor:
    """Logits after each token past the prompt, the prompt prefilled and the rest decoded one at a time."""
    engine, runner = llm.engine, llm.engine.runner
    req = Request("r", tokens[:prompt_len], SamplingParams(), frozenset())
    rows = []
    for end in range(prompt_len, len(tokens) + 1):
        num_new = len(req.token_ids) - req.num_computed_tokens
        assert engine.scheduler.kv.allocate(req, num_new)
        hidden = runner.hidden_states(req.token_ids, req.num_computed_tokens, num_new, req.block_ids)
        with torch.inference_mode():
            rows.append(runner.model.compute_logits(hidden[-1:]).float())
        req.num_computed_tokens += num_new
        if end < len(tokens):
            req.token_ids.append(tokens[end])
    return torch.cat(rows)


AGREEMENT_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters."
)


def top1_agreement(reference: LLM, *others: LLM) -> list[float]:
    """Each model's top-1 agreement with ``reference`` over AGREEMENT_TEXT, 16 tokens prefilled, the rest
    (60) decoded one at a time."""
    tokens = reference.get_tokenizer().encode(AGREEMENT_TEXT)
    ref = _decode_logits(reference, tokens, 16).argmax(-1)
    return [(_decode_logits(llm, tokens, 16).argmax(-1) == ref).float().mean().item() for llm in others]


@needs_kernels
def test_a_gguf_model_runs_its_blocks_and_is_as_faithful_as_dequantizing(bundled_gguf) -> None:
    """Top-1 agreement with the fp32-dequantized model over 60 decode steps: the native path (int8
    activations on the file's blocks) may lose no more than dequantizing to bf16 does."""
    native, bf16, fp32 = (LLM(str(bundled_gguf), dtype=d, num_kv_blocks=64, block_size=16) for d in ("auto", "bfloat16", "float32"))
    native_model, dense_model = native.engine.runner.model, bf16.engine.runner.model
    assert native_model.layers[0].qkv_proj.weight.dtype == torch.uint8  # Q4_1 kept as stored
    assert native_model.embed_tokens.weight.dtype == torch.uint8  # Q8_0 kept as stored
    assert dense_model.layers[0].qkv_proj.weight.dtype == torch.bfloat16
    native_bytes = sum(p.numel() * p.element_size() for p in native_model.parameters())
    dense_bytes = sum(p.numel() * p.element_size() for p in dense_model.parameters())
    assert native_bytes < dense_bytes / 2

    native_agreement, bf16_agreement = top1_agreement(fp32, native, bf16)
    assert native_agreement >= min(0.9, bf16_agreement - 0.05), (native_agreement, bf16_agreement)
