"""The sampler's logit processing on hand-made logits."""

from __future__ import annotations

import torch

from pagoda.engine.request import Request, SamplingParams
from pagoda.engine.sampler import Sampler


def _request(prompt: list[int], output: list[int], **params) -> Request:
    req = Request("r", prompt, SamplingParams(**params), frozenset({0}))
    req.token_ids.extend(output)
    return req


def test_penalties_follow_vllm_definitions() -> None:
    logits = torch.tensor([[1.0, 2.0, -2.0, 4.0, 0.5]])
    sampler = Sampler()
    rep = sampler._process(logits, [_request([1], [2, 2], repetition_penalty=2.0)])
    assert rep.tolist() == [[1.0, 1.0, -4.0, 4.0, 0.5]]  # seen: positive divided, negative multiplied
    freq = sampler._process(logits, [_request([1], [2, 2, 3], frequency_penalty=0.5)])
    assert freq.tolist() == [[1.0, 2.0, -3.0, 3.5, 0.5]]  # output counts only, not the prompt
    pres = sampler._process(logits, [_request([1], [2, 2, 3], presence_penalty=0.5)])
    assert pres.tolist() == [[1.0, 2.0, -2.5, 3.5, 0.5]]
    bias = sampler._process(logits, [_request([1], [], logit_bias={4: 10.0})])
    assert bias[0, 4].item() == 10.5
    min_tok = sampler._process(logits, [_request([1], [3], min_tokens=3, stop_token_ids=[3])])
    assert min_tok[0, 0].item() == float("-inf") and min_tok[0, 3].item() == float("-inf")
    assert logits.tolist() == [[1.0, 2.0, -2.0, 4.0, 0.5]]  # the input is never modified


def test_top_k_top_p_min_p_masks() -> None:
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler(seed=0)
    for params, allowed in [
        ({"top_k": 2}, {0, 1}),
        ({"top_p": 0.7}, {0, 1}),
        ({"top_p": 0.85}, {0, 1, 2}),
        ({"min_p": 0.5}, {0, 1}),
    ]:
        seen = set()
        for seed in range(200):
            req = _request([1], [], temperature=1.0, seed=seed, **params)
            seen.add(sampler(logits, [req]).token_ids[0])
        assert seen == allowed, params
