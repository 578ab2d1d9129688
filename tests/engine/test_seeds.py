"""Same seed + same request -> same output, whatever else is in the batch (batch_invariant=True).

A 48-token step budget makes the prompt's prefill split differently depending on its neighbours,
so chunking is covered too.
"""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("smollm2-135m", batch_invariant=True, max_num_batched_tokens=48)


@pytest.mark.slow
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, seed=1234, max_tokens=24),
    SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.02, seed=7, max_tokens=24, repetition_penalty=1.1),
])
def test_seeded_sampling_independent_of_batch(llm: LLM, params: SamplingParams) -> None:
    prompt = "Write a short story about a robot who learns to paint."
    alone = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [f"Tell me fact number {i} about the ocean." for i in range(7)]
    unseeded = SamplingParams(temperature=1.0, max_tokens=40)
    mixed = llm.generate(others[:3] + [prompt] + others[3:], [unseeded] * 3 + [params] + [unseeded] * 4, use_tqdm=False)
    assert mixed[3].outputs[0].token_ids == alone
    # And again later, after the prefix cache has changed what gets computed.
    again = llm.generate([others[0], prompt], [unseeded, params], use_tqdm=False)[1].outputs[0].token_ids
    assert again == alone


@pytest.mark.slow
def test_different_seeds_differ_and_n_children_differ(llm: LLM) -> None:
    prompt = "Name a color:"
    a = llm.generate([prompt], SamplingParams(temperature=1.0, seed=1, max_tokens=16), use_tqdm=False)[0]
    b = llm.generate([prompt], SamplingParams(temperature=1.0, seed=2, max_tokens=16), use_tqdm=False)[0]
    assert a.outputs[0].token_ids != b.outputs[0].token_ids
    multi = llm.generate([prompt], SamplingParams(temperature=1.0, seed=1, n=3, max_tokens=16), use_tqdm=False)[0]
    assert [o.index for o in multi.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in multi.outputs}) == 3
    # Child 0 of an n=3 request with seed 1 draws like a single request with seed 1.
    assert multi.outputs[0].token_ids == a.outputs[0].token_ids


@pytest.mark.slow
def test_logits_rows_are_bit_identical_across_batches(llm: LLM) -> None:
    """The mechanism under the guarantee: a request's logits do not move by one bit."""
    engine = llm.engine
    captured: dict[str, list] = {}
    real = engine.runner.sampler.__call__

    def spy(logits, requests, offsets=None):
        for row, req in zip(logits, requests):
            captured.setdefault(req.req_id, []).append(row.clone())
        return real(logits, requests, offsets)

    sampler = engine.runner.sampler
    engine.runner.sampler = type("Spy", (), {"__call__": staticmethod(spy)})()
    try:
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        engine.add_request("alone", "The history of the printing press begins", params)
        while engine.has_unfinished_requests():
            engine.step()
        for i in range(5):
            engine.add_request(f"other{i}", f"Some unrelated text number {i} that is long enough to chunk", params)
        engine.add_request("mixed", "The history of the printing press begins", params)
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        engine.runner.sampler = sampler
    assert len(captured["alone"]) == len(captured["mixed"]) == 6
    for a, b in zip(captured["alone"], captured["mixed"]):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_seeded_text_same_whether_its_prefix_was_cached_or_not() -> None:
    """Without batch-invariant kernels a prefill that starts after a cached prefix rounds differently from
    a full one, so a seeded request reads no cached prefix (its own blocks are still published); unseeded
    and greedy requests keep their hits."""
    llm = LLM("smollm2-135m")
    prompt = ("The history of the lighthouse keepers on the northern coast is long and full of storms, "
              "shipwrecks, rescues and lonely winters. Tell it: (01)")
    for seed in range(4):  # with the cached prefix read, each of these drew other text on the repeat
        seeded = SamplingParams(temperature=0.8, seed=seed, max_tokens=48, ignore_eos=True)
        first, again = (llm.generate([prompt], seeded, use_tqdm=False)[0] for _ in range(2))
        assert again.outputs[0].token_ids == first.outputs[0].token_ids, f"seed {seed}"
        assert again.num_cached_tokens == 0
    # n > 1: the siblings take the first child's own prompt blocks, not the cache's.
    multi = SamplingParams(n=3, temperature=0.8, seed=5, max_tokens=24, ignore_eos=True)
    first, again = (llm.generate([prompt], multi, use_tqdm=False)[0] for _ in range(2))
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in first.outputs]
    unseeded = llm.generate([prompt], SamplingParams(temperature=0.8, max_tokens=4), use_tqdm=False)[0]
    greedy = llm.generate([prompt], SamplingParams(temperature=0.0, seed=11, max_tokens=4), use_tqdm=False)[0]
    assert unseeded.num_cached_tokens > 0 and greedy.num_cached_tokens > 0
