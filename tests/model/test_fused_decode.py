"""The one-call decode path (pagoda/csrc/decode_layers.cpp) against the layer-by-layer path on the same
weights: GGUF blocks, int4 (with a Qwen2 q/k/v bias), int8, each KV cache format, one to sixteen rows, several
of them one sequence's (drafts to verify, a short prompt chunk); and where it must not run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.model.attention.base import AttentionMetadata
from pagoda.model.cpu_kernels import load_cpu_kernels
from pagoda.model.fused_decode import MAX_ROWS, FusedDecode
from pagoda.model.layers.linear import configure_linear
from tests.model.test_gguf_native import AGREEMENT_TEXT, _decode_logits

OPS = load_cpu_kernels()
pytestmark = pytest.mark.skipif(OPS is None or not OPS.decode_layers_supported(),
                                reason="needs the C++ kernels with AVX-512 VNNI")


def _both(llm: LLM, tokens: list[int], prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode logits through the fused path, then (same engine, fresh blocks) layer by layer."""
    model = llm.engine.runner.model
    assert model.fused_decode is not None
    fused = _decode_logits(llm, tokens, prompt_len)
    saved, model.fused_decode = model.fused_decode, None
    try:
        layered = _decode_logits(llm, tokens, prompt_len)
    finally:
        model.fused_decode = saved
    return fused, layered


@pytest.fixture(scope="module")
def fp32_reference(bundled_gguf) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy top-1 of the fp32 (dequantized) model over the agreement text, 16 tokens prefilled, and which of
    its positions it prefers by at least 0.5 over the runner-up (at the others, ~40% of them, the top two are
    within a bf16 model's rounding of each other: either choice is as faithful, and which one a path takes
    changes with any change to the order of its sums)."""
    fp32 = LLM(str(bundled_gguf), dtype="float32", num_kv_blocks=64, block_size=16)
    tokens = fp32.get_tokenizer().encode(AGREEMENT_TEXT)
    top2 = _decode_logits(fp32, tokens, 16).topk(2, dim=-1)
    return top2.indices[:, 0], top2.values[:, 0] - top2.values[:, 1] >= 0.5


@pytest.mark.parametrize("kv", ["auto", "int8", "fp8"])
def test_the_bundled_gguf_decodes_as_faithfully_as_layer_by_layer(bundled_gguf, fp32_reference, kv: str) -> None:
    """Its blocks as stored, in bf16 (dtype auto here): the two paths round differently (sums run in other
    orders, and layer by layer rounds every intermediate to bf16), which moves bf16 logits by up to ~1-2 of ~30
    here; neither may agree less with the fp32 model than the other where it is clear."""
    llm = LLM(str(bundled_gguf), kv_cache_dtype=kv, num_kv_blocks=64, block_size=16)
    tokens = llm.get_tokenizer().encode(AGREEMENT_TEXT)
    fused, layered = _both(llm, tokens, 16)
    # fp8's 3-bit mantissas turn a last-bit difference of a K or V value into a step of 6-12%: at the first
    # decoded position the two paths' logits moved apart by 3.9 (before the panel layout) and 5.25 (after) of
    # ~30, by at most ~2.3 elsewhere and in the other cache dtypes.
    assert (fused - layered).abs().max() < (0.25 if kv == "fp8" else 0.15) * layered.abs().max()
    top1, clear = fp32_reference
    assert clear.sum() >= 30
    fused_agreement = (fused.argmax(-1) == top1)[clear].float().mean().item()
    layered_agreement = (layered.argmax(-1) == top1)[clear].float().mean().item()
    assert fused_agreement >= layered_agreement - 0.05, (fused_agreement, layered_agreement)
    assert fused_agreement >= 0.9, fused_agreement


@pytest.mark.parametrize("arch, quantization", [("llama", "int4"), ("qwen2", "int4"), ("llama", "int8")])
def test_quantized_tiny_models_decode_as_layer_by_layer(make_tiny_model, arch: str, quantization: str) -> None:
    folder, _ = make_tiny_model(arch, seed=7, hidden_size=128, intermediate_size=256)  # qwen2: q/k/v bias
    llm = LLM(str(folder), dtype="float32", quantization=quantization, quantization_group_size=32,
              num_kv_blocks=32, block_size=4)
    # A prompt longer than the fused path's rows, so that both runs write its KV alike: a last-bit difference
    # there may round one int8 activation code the other way in some later step, far above the tolerance.
    fused, layered = _both(llm, list(range(200, 232)), MAX_ROWS + 1)
    torch.testing.assert_close(fused, layered, rtol=1e-3, atol=1e-3 * layered.abs().max().item())


def test_several_rows_decode_together_as_each_alone(make_tiny_model) -> None:
    """Ten sequences of different lengths in one fused step (rows in passes of four): the same greedy tokens
    as the layer-by-layer engine (fp32 activations: bf16 rounds the two paths apart, see above)."""
    folder, _ = make_tiny_model("llama", seed=5, hidden_size=128, intermediate_size=256)
    llm = LLM(str(folder), dtype="float32", quantization="int4", quantization_group_size=32, num_kv_blocks=64,
              block_size=4)
    prompts = [{"prompt_token_ids": list(range(100 + 37 * i, 103 + 41 * i, 7))} for i in range(10)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    llm.engine.runner.model.fused_decode = None
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == want


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_several_tokens_of_one_sequence_attend_causally(make_tiny_model, quantization: str) -> None:
    """A sequence's chunk of tokens (its drafts) in one fused call: each token attends to the keys up to itself,
    as the layer-by-layer path computes the same chunk, beside a decode token of another sequence."""
    folder, _ = make_tiny_model("llama", seed=3, hidden_size=128, intermediate_size=256)
    llm = LLM(str(folder), dtype="float32", quantization=quantization, quantization_group_size=32,
              num_kv_blocks=32, block_size=4)
    runner, model = llm.engine.runner, llm.engine.runner.model
    tokens = list(range(300, 320))

    def prefix_layer_by_layer() -> None:
        # Both runs write the prefix's KV alike: 11 rows would fit the fused path too, and there a last-bit
        # difference in attention may round an int8 activation code the other way, far above the tolerance.
        saved, model.fused_decode = model.fused_decode, None
        try:
            runner.hidden_states(tokens, 0, 11, list(range(5)))
        finally:
            model.fused_decode = saved

    prefix_layer_by_layer()
    fused = runner.hidden_states(tokens, 11, 6, list(range(5))).clone()  # 6 rows: fused when it fits
    prefix_layer_by_layer()
    saved, model.fused_decode = model.fused_decode, None
    try:
        layered = runner.hidden_states(tokens, 11, 6, list(range(5))).clone()
    finally:
        model.fused_decode = saved
    torch.testing.assert_close(fused, layered, rtol=1e-3, atol=1e-3 * layered.abs().max().item())


def test_a_row_attends_alike_alone_or_beside_its_drafts_over_several_key_chunks(make_tiny_model) -> None:
    """A context of 150 tokens (three of row_attention.h's 64-key chunks, merged per row): each of 6 rows of
    one sequence equals, bit for bit, that token decoded alone (chunk bounds count from the sequence's start,
    so the rows beside a row change nothing), and the layer-by-layer path within tolerance."""
    folder, _ = make_tiny_model("llama", seed=11, hidden_size=128, intermediate_size=256)
    llm = LLM(str(folder), dtype="float32", quantization="int4", quantization_group_size=32, num_kv_blocks=64,
              block_size=4)
    runner, model = llm.engine.runner, llm.engine.runner.model
    tokens, blocks, prefix = [(7 * i) % 2000 + 100 for i in range(160)], list(range(40)), 150
    saved, model.fused_decode = model.fused_decode, None
    try:
        runner.hidden_states(tokens, 0, prefix, blocks)
        layered = runner.hidden_states(tokens, prefix, 6, blocks).clone()
    finally:
        model.fused_decode = saved
    together = runner.hidden_states(tokens, prefix, 6, blocks).clone()
    alone = torch.cat([runner.hidden_states(tokens, prefix + i, 1, blocks).clone() for i in range(6)])
    assert torch.equal(together, alone)
    torch.testing.assert_close(together, layered, rtol=1e-3, atol=1e-3 * layered.abs().max().item())


def test_other_kv_caches_are_read_where_they_are(make_tiny_model) -> None:
    """The kernel's model is made once with the caches it reads; handed other caches (copies, the originals then
    zeroed), the fused path makes it again and decodes from those, as it did from the originals."""
    folder, _ = make_tiny_model("llama", seed=3, hidden_size=128, intermediate_size=256)
    llm = LLM(str(folder), dtype="float32", quantization="int8", num_kv_blocks=32, block_size=4)
    runner, fused = llm.engine.runner, llm.engine.runner.model.fused_decode
    tokens, blocks = list(range(300, 320)), list(range(5))
    runner.hidden_states(tokens, 0, 11, blocks)
    made = fused.layers
    want = runner.hidden_states(tokens, 11, 1, blocks).clone()
    assert fused.layers is made  # the same caches: kept
    originals = list(runner.kv_caches)
    runner.kv_caches[:] = [cache.clone() for cache in originals]
    for cache in originals:
        cache.zero_()
    got = runner.hidden_states(tokens, 11, 1, blocks).clone()
    assert fused.layers is not made
    assert torch.equal(got, want)


def test_where_the_fused_path_does_not_run(make_tiny_model, monkeypatch) -> None:
    folder, _ = make_tiny_model("llama")
    assert LLM(str(folder), num_kv_blocks=16, block_size=4).engine.runner.model.fused_decode is None  # dense
    monkeypatch.setenv("PAGODA_DISABLE_FUSED_DECODE", "1")
    llm = LLM(str(folder), quantization="int4", quantization_group_size=32, num_kv_blocks=16, block_size=4)
    assert llm.engine.runner.model.fused_decode is None
    monkeypatch.delenv("PAGODA_DISABLE_FUSED_DECODE")
    fused = FusedDecode.of(llm.engine.runner.model, OPS)
    assert fused is not None
    hidden = torch.zeros(2, 64)
    assert fused.fits(hidden)
    assert fused.fits(torch.zeros(4, 64))  # drafts or a short prompt chunk: each token a row
    assert not fused.fits(torch.zeros(17, 64))  # more rows than the kernel takes
    configure_linear(batch_invariant=True)
    try:
        assert not fused.fits(hidden)
    finally:
        configure_linear(batch_invariant=False)


def test_paged_reads_outside_a_block_table_are_refused(make_tiny_model) -> None:
    """A sequence longer than its block table (a bookkeeping fault upstream) is an error from both decode
    kernels, never a read or write outside the cache."""
    folder, _ = make_tiny_model("llama", seed=3, hidden_size=128, intermediate_size=256)
    llm = LLM(str(folder), dtype="float32", quantization="int8", num_kv_blocks=32, block_size=4)
    runner, model = llm.engine.runner, llm.engine.runner.model
    metadata = AttentionMetadata(slot_mapping=torch.tensor([9]), query_lens=np.array([1]), seq_lens=np.array([10]),
                                 block_tables=torch.tensor([[0, 1]]), block_size=4, pad_slot=runner.pad_slot,
                                 device=torch.device("cpu"))
    saved = model.fused_decode
    for fused, kernel in ((saved, "decode_layers"), (None, "paged_decode_attention")):
        model.fused_decode = fused
        runner.attention.prepare(metadata)
        try:
            with pytest.raises(RuntimeError, match=f"{kernel}: sequence 0 has length 10 but its block table holds 8"):
                model(torch.tensor([5]), torch.tensor([9]), runner.kv_caches, runner.attention, metadata)
        finally:
            model.fused_decode = saved


@pytest.mark.skipif(OPS is None or not OPS.amx_available(), reason="no AMX int8 here (CPU, OS or build)")
def test_a_token_and_its_drafts_on_amx_tiles_as_on_vnni(bundled_gguf, monkeypatch) -> None:
    """PAGODA_TILE_MIN_ROWS: a step of that many rows runs the Q4_1 projections on AMX tiles of its own rows.
    Only the order of the fp32 sums differs from the VNNI kernel's, which bf16 outputs round apart through
    30 layers: every row's final hidden state points the same way."""
    monkeypatch.setenv("PAGODA_TILE_MIN_ROWS", "6")
    llm = LLM(str(bundled_gguf), num_kv_blocks=16, block_size=16)
    runner, fused = llm.engine.runner, llm.engine.runner.model.fused_decode
    assert fused is not None and fused.tile_min_rows == 6
    tokens = list(range(1000, 1030))
    runner.hidden_states(tokens, 0, 20, [0, 1])

    def chunk(tile_min_rows: int) -> torch.Tensor:
        fused.tile_min_rows = tile_min_rows
        return runner.hidden_states(tokens, 20, 6, [0, 1]).clone()

    tiles, vnni = chunk(6), chunk(0)
    assert not torch.equal(tiles, vnni)  # the tiles ran
    cosine = torch.nn.functional.cosine_similarity(tiles.float(), vnni.float(), dim=-1)
    assert cosine.min() > 0.999, cosine  # ~0.9998 here; a block scaled wrong is far off
