"""kv_cache_dtype int8 / fp8 through the whole engine: more tokens in the same budget, decoding that stays
close to the unquantized cache, the prefix cache and block accounting unchanged, a checkpoint's per-tensor
fp8 scales, and errors that name the setting."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagoda import LLM, SamplingParams
from tests.model.test_gguf_native import top1_agreement


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_a_quantized_cache_holds_more_and_decodes_close_to_bf16(kind: str, bundled_gguf, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="pagoda.engine.worker.worker"):
        quantized = LLM(str(bundled_gguf), dtype="bfloat16", kv_cache_dtype=kind, kv_cache_gib=0.05, max_model_len=1024)
    dense = LLM(str(bundled_gguf), dtype="bfloat16", kv_cache_gib=0.05, max_model_len=1024)
    fp32 = LLM(str(bundled_gguf), dtype="float32", num_kv_blocks=64)
    assert quantized.engine.num_blocks > 1.8 * dense.engine.num_blocks  # the same 0.05 GiB
    assert "the tokens bfloat16 would hold in the same memory" in caplog.text
    quantized_agreement, dense_agreement = top1_agreement(fp32, quantized, dense)
    assert quantized_agreement >= dense_agreement - 0.1, (quantized_agreement, dense_agreement)


def test_the_prefix_cache_and_block_accounting_work_over_int8_rows(make_tiny_model) -> None:
    folder, _ = make_tiny_model("llama")
    llm = LLM(str(folder), kv_cache_dtype="int8", num_kv_blocks=32, block_size=4, dtype="float32")
    prompt = {"prompt_token_ids": list(range(100, 130))}
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    first = llm.generate([prompt], params)[0]
    second = llm.generate([prompt], params)[0]
    assert second.num_cached_tokens >= 24  # the stored int8 rows were reused
    assert first.outputs[0].token_ids == second.outputs[0].token_ids
    pool = llm.engine.scheduler.kv
    assert pool.pool.num_free_blocks == pool.num_blocks


def test_a_checkpoints_fp8_scales_are_read(make_tiny_model, tmp_path) -> None:
    folder, _ = make_tiny_model("llama", seed=6)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.1.self_attn.k_scale"] = torch.tensor(2.0)
    tensors["model.layers.1.self_attn.v_scale"] = torch.tensor([0.5])
    save_file(tensors, str(folder / "model.safetensors"))
    llm = LLM(str(folder), kv_cache_dtype="fp8", num_kv_blocks=16, block_size=4, dtype="float32")
    layers = llm.engine.runner.model.layers
    assert layers[0].kv_scales == (1.0, 1.0) and layers[1].kv_scales == (2.0, 0.5)
    tensors["model.layers.1.self_attn.k_scale"] = torch.tensor(-1.0)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="'model.layers.1.self_attn.k_scale' is not one positive scale"):
        LLM(str(folder), num_kv_blocks=16, block_size=4, dtype="float32")


def test_an_unknown_kv_cache_dtype_is_named_with_the_supported_ones() -> None:
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of auto, int8, fp8, fp8_e4m3, got 'int4'"):
        LLM("smollm2-135m", kv_cache_dtype="int4")
