"""The sampler's logit processing on hand-made logits."""

from __future__ import annotations

import pytest
import torch

from pagoda.api.params import SamplingParams

from pagoda.engine.step import NewRequestData
from pagoda.model.cpu_kernels import load_cpu_kernels
from pagoda.engine.worker.input_batch import CachedRequestState
from pagoda.engine.worker.sampler import Sampler, _sample_rows_torch


def _request(prompt: list[int], output: list[int], **params) -> CachedRequestState:
    req = CachedRequestState.from_new(NewRequestData("r", prompt, SamplingParams(**params), frozenset({0}), [], 0))
    req.output_token_ids.extend(output)
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


def test_penalties_of_a_batch_equal_each_row_alone() -> None:
    """The processing is batched across rows (one indexed update per kind): no row's edits reach another."""
    torch.manual_seed(0)
    logits = torch.randn(5, 40)
    requests = [
        _request([1, 2, 3], [4, 4, 5], repetition_penalty=1.5, frequency_penalty=0.3, presence_penalty=0.2),
        _request([7], [], temperature=0.0),  # nothing to apply
        _request([9, 9], [11], logit_bias={11: -3.0, 12: 2.5}, min_tokens=4, stop_token_ids=[13]),
        _request([4], [4, 6, 6, 6], frequency_penalty=-0.5, repetition_penalty=0.7),
        _request([20], [21], logit_bias={4: 1.0}, presence_penalty=1.0),
    ]
    sampler = Sampler()
    batched = sampler._process(logits, requests)
    for i, r in enumerate(requests):
        assert torch.equal(batched[i], sampler._process(logits[i:i + 1], [r])[0]), i
    assert torch.equal(batched[1], logits[1])


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


def _kernel_inputs(rows: int, vocab: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * 3
    logits[0, : vocab // 2] = float("-inf")  # masked tokens (min_tokens, logit bias) are never drawn
    idx = torch.arange(rows, dtype=torch.int64)
    temperature = torch.rand(rows, generator=gen) * 1.5 + 0.2
    top_k = torch.randint(0, 40, (rows,), generator=gen) * (torch.arange(rows) % 3 == 0)
    top_p = torch.where(torch.arange(rows) % 2 == 0, torch.rand(rows, generator=gen) * 0.9 + 0.05, torch.ones(rows))
    min_p = torch.where(torch.arange(rows) % 5 == 0, torch.rand(rows, generator=gen) * 0.2, torch.zeros(rows))
    uniform = torch.rand(rows, generator=gen, dtype=torch.float64)
    return logits, idx, temperature, top_k.to(torch.int64), top_p, min_p, uniform


@pytest.mark.skipif(load_cpu_kernels() is None, reason="C++ kernels not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_kernel_matches_torch_formulation(dtype: torch.dtype) -> None:
    """The C++ draw and the torch one pick the same token for the same uniform number."""
    ops = load_cpu_kernels()
    logits, *rest = _kernel_inputs(64, 3000, seed=1)
    logits = logits.to(dtype)
    got = ops.sample_rows(logits, *rest)
    want = _sample_rows_torch(logits, *rest)
    compared = torch.ones(len(got), dtype=torch.bool)
    if dtype == torch.bfloat16:
        # bf16 logits tie often; at a top-k/top-p cut the kernel keeps every tied token while a sort keeps
        # an arbitrary subset, so only the rows without those filters must agree.
        _, _, top_k, top_p, _, _ = rest
        compared = (top_k == 0) & (top_p >= 1.0)
    assert (got == want)[compared].all()
    assert bool((logits[0, got[0]] > float("-inf")).item())


@pytest.mark.parametrize("use_kernel", [True, False])
def test_draws_follow_the_filtered_distribution(use_kernel: bool) -> None:
    ops = load_cpu_kernels()
    if use_kernel and ops is None:
        pytest.skip("C++ kernels not built")
    sample = ops.sample_rows if use_kernel else _sample_rows_torch
    probs = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])
    draws = 20000
    logits = probs.log().repeat(draws, 1)
    ones = torch.ones(draws)
    uniform = torch.rand(draws, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = torch.arange(draws, dtype=torch.int64)
    # top_p=0.85 keeps the first three (mass above the third is 0.7 < 0.85); renormalised to 0.4/0.9 etc.
    tokens = sample(logits, rows, ones, torch.zeros(draws, dtype=torch.int64), ones * 0.85, ones * 0, uniform)
    freq = torch.bincount(tokens, minlength=5).double() / draws
    expected = torch.tensor([0.4, 0.3, 0.2, 0.0, 0.0], dtype=torch.float64) / 0.9
    assert torch.allclose(freq, expected, atol=0.015), freq
    # temperature 2 flattens: p ∝ sqrt(p)
    tokens = sample(logits, rows, ones * 2, torch.zeros(draws, dtype=torch.int64), ones, ones * 0, uniform)
    freq = torch.bincount(tokens, minlength=5).double() / draws
    flat = probs.double().sqrt()
    assert torch.allclose(freq, flat / flat.sum(), atol=0.015), freq
