"""A request sharing a 512-token prefix computes only its suffix and matches a cache-off run."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=16)


@pytest.fixture(scope="module")
def prompts() -> tuple[list[int], list[int]]:
    prefix = [(i * 7919) % 40000 + 100 for i in range(512)]
    return prefix + [501, 502, 503, 504, 505], prefix + [911, 912, 913]


def _run(llm: LLM, prompt: list[int]):
    return llm.generate([{"prompt_token_ids": prompt}], GREEDY, use_tqdm=False)[0]


@pytest.mark.slow
def test_shared_prefix_computes_only_suffix(prompts) -> None:
    first, second = prompts
    llm = LLM("smollm2-135m", dtype="float32")
    _run(llm, first)
    before = llm.engine.stats.prompt_tokens
    cached = _run(llm, second)
    computed = llm.engine.stats.prompt_tokens - before
    assert cached.num_cached_tokens == 512
    assert computed == len(second) - 512

    uncached_llm = LLM("smollm2-135m", dtype="float32", enable_prefix_caching=False)
    uncached = _run(uncached_llm, second)
    assert uncached.num_cached_tokens == 0
    assert uncached_llm.engine.stats.prompt_tokens == len(second)
    assert cached.outputs[0].token_ids == uncached.outputs[0].token_ids
    for engine in (llm.engine, uncached_llm.engine):
        assert engine.scheduler.kv.pool.num_free_blocks == engine.num_blocks
