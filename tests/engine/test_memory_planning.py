"""Start-up KV sizing: the budget arithmetic, the refusal messages, and the profiled step (run on the CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagoda import LLM
from pagoda.engine.worker.memory import (
    GIB,
    GpuMemoryProfile,
    check_kv_fits,
    check_weights_fit,
    describe_gpu_budget,
    gpu_kv_blocks,
    profile_batch,
    profile_step,
)
from pagoda.model.attention import get_backend
from pagoda.model.attention.kv_format import KVCacheFormat
from pagoda.model.loader import load_model, weight_bytes


def _profile(**overrides: int) -> GpuMemoryProfile:
    values = dict(total_bytes=80 * GIB, weight_bytes=16 * GIB, activation_bytes=2 * GIB,
                  non_torch_bytes=GIB, free_bytes=60 * GIB)
    values.update(overrides)
    return GpuMemoryProfile(**values)


def test_kv_blocks_take_what_the_budget_leaves() -> None:
    # 0.9 * 80 = 72 GiB; 72 - 16 - 2 - 1 = 53 GiB of 2 MiB blocks.
    assert gpu_kv_blocks(_profile(), 0.9, 2 * 2**20) == 53 * 512
    # Another process holds memory: never more than is free (less the activations still needed).
    assert gpu_kv_blocks(_profile(free_bytes=20 * GIB), 0.9, 2 * 2**20) == 18 * 512
    assert gpu_kv_blocks(_profile(weight_bytes=75 * GIB), 0.9, 2 * 2**20) == 0
    # CUDA graphs' pool is held beside the eager steps' activations: it comes out of the budget too.
    assert gpu_kv_blocks(_profile(graph_bytes=GIB), 0.9, 2 * 2**20) == 52 * 512
    assert gpu_kv_blocks(_profile(graph_bytes=GIB, free_bytes=20 * GIB), 0.9, 2 * 2**20) == 17 * 512


def test_weights_that_cannot_fit_are_refused_before_loading() -> None:
    check_weights_fit(16 * GIB, 80 * GIB, 0.9)
    with pytest.raises(ValueError, match=r"weights need 70.00 GiB .* allows 40.00 GiB .*gpu_memory_utilization"):
        check_weights_fit(70 * GIB, 80 * GIB, 0.5)


def test_max_model_len_that_cannot_fit_names_the_tokens_that_fit() -> None:
    check_kv_fits(num_blocks=8, block_size=16, max_model_len=128, budget_hint="")
    hint = describe_gpu_budget(_profile(), 0.9, 8192)
    with pytest.raises(ValueError) as err:
        check_kv_fits(num_blocks=7, block_size=16, max_model_len=128, budget_hint=hint)
    message = str(err.value)
    assert "holds 112 tokens" in message and "max_model_len=128" in message
    assert "set max_model_len to at most 112" in message
    assert "gpu_memory_utilization (now 0.9" in message and "max_num_batched_tokens=8192" in message
    assert "CUDA graphs" not in message
    with_graphs = describe_gpu_budget(_profile(graph_bytes=GIB // 2), 0.9, 8192)
    assert "CUDA graphs 0.50 GiB (--enforce-eager frees them)" in with_graphs


def test_cpu_engine_refuses_a_budget_below_max_model_len(make_tiny_model) -> None:
    folder, _ = make_tiny_model("llama")
    # 2 layers x 2 x 16 slots x 2 heads x 16 dims x 4 bytes = 8 KiB per block.
    with pytest.raises(ValueError, match=r"holds 64 tokens .* max_model_len=1024.*raise kv_cache_gib \(now 3.05176e-05\) to at least 0.0004883"):
        LLM(str(folder), dtype="float32", kv_cache_gib=32 * 2**10 / GIB)
    llm = LLM(str(folder), dtype="float32", kv_cache_gib=32 * 2**10 / GIB, max_model_len=64)
    assert llm.engine.num_blocks == 4


@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_weight_bytes_match_the_loaded_model(make_tiny_model, quantization: str | None) -> None:
    """What the GPU budget checks before loading: the parameters as they will be, quantized ones included."""
    folder, _ = make_tiny_model("qwen3")
    model = load_model(str(folder), torch.bfloat16, quantization=quantization, quantization_group_size=32).model
    expected = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weight_bytes(str(folder), torch.bfloat16, quantization, 32) == expected


def test_weight_bytes_of_a_gptq_checkpoint_count_its_packed_tensors(make_tiny_model, tmp_path) -> None:
    from tests.model.test_gptq_awq import write_quantized

    folder, hf = make_tiny_model("llama", seed=8)
    quantized = write_quantized(folder, hf, tmp_path / "gptq", layout="gptq")
    dense = weight_bytes(str(folder), torch.bfloat16)
    assert weight_bytes(str(quantized), torch.bfloat16) < dense - 0.6 * sum(
        p.numel() * 2 for n, p in hf.named_parameters() if "proj" in n)


def test_weight_bytes_of_a_gguf_file_on_a_gpu_count_the_blocks_it_keeps(bundled_gguf: Path) -> None:
    """On CUDA a GGUF file's Q4_0/Q4_1/Q8_0 layers stay as stored (the Triton kernel): the GPU budget counts
    their blocks, not a dequantized copy; with --dtype set (keep_gguf_quants off) everything is dense."""
    import math

    from pagoda.model.gguf_file import GGUFFile
    from pagoda.model.layers.quantization.gguf import GPU_NATIVE_TYPES

    tensors = GGUFFile(bundled_gguf).tensors.values()
    kept = sum(t.nbytes if t.qtype in GPU_NATIVE_TYPES else 2 * math.prod(t.shape) for t in tensors)
    dense = sum(2 * math.prod(t.shape) for t in tensors)
    assert weight_bytes(str(bundled_gguf), torch.bfloat16, device="cuda", keep_gguf_quants=True) == kept
    assert weight_bytes(str(bundled_gguf), torch.bfloat16, device="cuda") == dense


def test_profile_batch_spends_the_whole_token_budget() -> None:
    assert profile_batch(2048, 8192) == [2048]
    assert profile_batch(2048, 512) == [512] * 4
    assert profile_batch(1000, 384) == [384, 384, 232]


@pytest.mark.parametrize("max_model_len", [64, 100, 1])  # 1: the decode step profiled for CUDA graphs
def test_profiled_step_runs_the_largest_step(make_tiny_model, max_model_len: int) -> None:
    folder, _ = make_tiny_model("llama")
    model = load_model(str(folder), torch.float32).model
    attention = get_backend("torch", "cpu", KVCacheFormat.of("auto", torch.float32))
    cache_bytes = profile_step(model, attention, 16, 200, 8, max_model_len, torch.device("cpu"))
    blocks = sum(-(-n // 16) for n in profile_batch(200, max_model_len))
    per_block = 2 * 2 * (blocks + 1) * 16 * 2 * 16 * 4  # layers x K/V x (blocks + spare) x slots x heads x dim x 4
    assert cache_bytes == per_block


def test_configs_ship_loadable_shapes() -> None:
    root = Path(__file__).resolve().parents[2] / "configs"
    # Llama-3.1-8B in bf16: ~16 GB of weights, the number the GPU budget starts from.
    assert weight_bytes(str(root / "llama-3.1-8b.json"), torch.bfloat16) == 2 * 8_030_261_248
