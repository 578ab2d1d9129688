"""Our forward pass against transformers' on tiny random checkpoints (fp32, max abs diff <= 1e-4)."""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM
from pagoda.api.params import SamplingParams
from pagoda.engine.core.request import Request

ARCH_CASES = {
    "llama": {},
    "llama-tied": {"tie_word_embeddings": True},
    "llama3-rope": {
        "rope_parameters": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0,
        }
    },
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {},
}


def _arch(case: str) -> str:
    return case.split("-")[0].replace("llama3", "llama")


def _all_logits(llm: LLM, request: Request, num_new: int) -> torch.Tensor:
    """Logits of every token this step computes (the runner itself keeps only the last row)."""
    engine = llm.engine
    assert engine.scheduler.kv.allocate(request, num_new)
    runner = engine.runner
    hidden = runner.hidden_states(request.token_ids, request.num_computed_tokens, num_new, request.block_ids)
    with torch.inference_mode():
        logits = runner.model.compute_logits(hidden)
    request.num_computed_tokens += num_new
    return logits


@pytest.mark.parametrize("case", sorted(ARCH_CASES))
def test_logits_match_transformers(case: str, make_tiny_model) -> None:
    folder, hf = make_tiny_model(_arch(case), **ARCH_CASES[case])
    llm = LLM(str(folder), dtype="float32", num_kv_blocks=64, block_size=4)
    torch.manual_seed(1)
    prompt = torch.randint(100, 49000, (37,)).tolist()
    extra = torch.randint(100, 49000, (3,)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + extra])).logits[0].float()

    req = Request("r", prompt, SamplingParams(), frozenset())
    # Prefill in two chunks (the second attends to the paged cache), then decode token by token.
    first = _all_logits(llm, req, 20)
    second = _all_logits(llm, req, 17)
    got = [first, second]
    for token in extra:
        req.token_ids.append(token)
        got.append(_all_logits(llm, req, 1))
    ours = torch.cat(got)
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4, f"{case}: max abs logit diff {diff}"
