"""Decode through the CUDA-graph path's fixed buffers and padding, on the CPU.

CI has no GPU, so the graphs run in their eager form (``use_cuda_graphs=False``: the captured function is
called instead of replayed) with the triton backend under TRITON_INTERPRET=1. That checks the buffer
refills, the padding rows and the logits slicing against the ordinary eager step; the capture itself is
checked on a GPU by scripts/bench_gpu.sh.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, i.e. on import

import pytest

pytest.importorskip("triton")

from pagoda import LLM, SamplingParams  # noqa: E402
from pagoda.engine.worker.cuda_graphs import DecodeGraphs, capture_sizes  # noqa: E402
from pagoda.model.attention import get_backend  # noqa: E402
from pagoda.model.attention.kv_format import KVCacheFormat  # noqa: E402


def test_capture_sizes_cover_every_batch_up_to_the_bound() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(4096)[-1] == 512


def _llm(folder: str) -> LLM:
    return LLM(folder, dtype="float32", attention_backend="triton", num_kv_blocks=64, max_num_seqs=8, seed=3)


def test_padded_graph_decode_matches_the_eager_step(make_tiny_model) -> None:
    folder, _ = make_tiny_model("llama", seed=5)
    prompts = [{"prompt_token_ids": list(range(100 + i, 100 + i + n))} for i, n in enumerate([3, 17, 9, 30, 5])]
    # Different lengths, so the decode batch shrinks 5 -> 4 -> 3 -> 2 -> 1 and pads to 8, 4, 4, 2, 1.
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (3, 7, 5, 9, 8)]
    expected = [o.outputs[0].token_ids for o in _llm(str(folder)).generate(prompts, params, use_tqdm=False)]

    llm = _llm(str(folder))
    core, runner = llm.engine.core, llm.engine.runner
    graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.attention, 16, 8, core.max_model_len,
                          use_cuda_graphs=False)
    assert graphs.sizes == [1, 2, 4, 8]
    replayed: list[tuple[int, int]] = []
    run = graphs.run

    def counting_run(input_ids, *rest):  # type: ignore[no-untyped-def]
        replayed.append((len(input_ids), graphs.padded_size(len(input_ids))))
        return run(input_ids, *rest)

    graphs.run = counting_run  # type: ignore[method-assign]
    runner.graphs = graphs
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    assert {(5, 8), (4, 4), (3, 4), (2, 2), (1, 1)} <= set(replayed)
    assert llm.engine.scheduler.kv.pool.num_free_blocks == core.num_blocks  # no block leaked


def test_sampled_decode_with_seeds_matches_the_eager_step(make_tiny_model) -> None:
    folder, _ = make_tiny_model("llama", seed=6)
    prompts = [{"prompt_token_ids": [7, 8, 9, 10 + i]} for i in range(3)]
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=6, ignore_eos=True, logprobs=2)
    eager = _llm(str(folder)).generate(prompts, params, use_tqdm=False)
    llm = _llm(str(folder))
    core, runner = llm.engine.core, llm.engine.runner
    runner.graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.attention, 16, 8,
                                 core.max_model_len, use_cuda_graphs=False)
    graphed = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(eager, graphed):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for lp_a, lp_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert lp_a.keys() == lp_b.keys()
            for tid in lp_a:
                assert lp_a[tid].logprob == pytest.approx(lp_b[tid].logprob, abs=1e-4)


def test_only_a_capturable_backend_is_accepted(make_tiny_model) -> None:
    folder, _ = make_tiny_model("llama", seed=5)
    runner = _llm(str(folder)).engine.runner
    with pytest.raises(ValueError, match="cannot be captured"):
        DecodeGraphs(runner.model, runner.kv_caches, get_backend("torch", "cpu", KVCacheFormat.of("auto", runner.model.dtype)), 16, 8, 64, use_cuda_graphs=False)


def test_the_whole_gpu_path_emulated_matches_the_cpu_engine(make_tiny_model, monkeypatch) -> None:
    """Everything a GPU decode runs, on the CPU: triton attention (decode and multi-block prefill programs),
    the Triton fused elementwise kernels, the graph buffers and padding; greedy tokens as the CPU engine's
    (torch attention, C++ kernels)."""
    from pagoda.model import fused_ops
    from pagoda.model.layers import triton_elementwise

    folder, _ = make_tiny_model("qwen3", seed=7)
    prompts = [{"prompt_token_ids": list(range(200 + i, 200 + i + n))} for i, n in enumerate([70, 4, 33])]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    cpu = LLM(str(folder), dtype="float32", num_kv_blocks=64, max_num_seqs=8)
    expected = [o.outputs[0].token_ids for o in cpu.generate(prompts, params, use_tqdm=False)]

    monkeypatch.setattr(fused_ops, "for_tensor",
                        lambda x: triton_elementwise if x.dtype in fused_ops.FUSED_DTYPES else None)
    llm = _llm(str(folder))
    core, runner = llm.engine.core, llm.engine.runner
    assert runner.attention.prefill_block_q < 70  # the long prompt spans several prefill programs
    runner.graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.attention, 16, 8,
                                 core.max_model_len, use_cuda_graphs=False)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    assert llm.engine.scheduler.kv.pool.num_free_blocks == core.num_blocks
