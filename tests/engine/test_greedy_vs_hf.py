"""Greedy decoding of the bundled model equals HF transformers token for token (fp32, same weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagoda import LLM, SamplingParams

MAX_NEW = 24
SHARED_PREFIX = (
    "You are a careful assistant. Answer briefly and precisely. "
    + "Here is some background about the solar system, rivers, mountains and cities. " * 20
)
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4, 5,",
    "The three primary colors are",
    "Water boils at",
    "In machine learning, a neural network",
    "The quick brown fox",
    "Q: What is the largest planet?\nA:",
    "import numpy as np\n",
    "中国的首都是",
    "请用一句话介绍长城：",
    "我喜欢吃苹果，因为",
    "Translate to French: Good morning ->",
    "A haiku about autumn:\n",
    "Hi",
    SHARED_PREFIX + "Question: which planet is red?",
    SHARED_PREFIX + "Question: which river is the longest?",
    SHARED_PREFIX + "Question: which mountain is the tallest?",
    "List of fruits: apple, banana,",
    "The theory of relativity was developed by",
    "<|im_start|>user\nWhat is 7 times 8?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def hf_model(bundled_gguf: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(bundled_gguf.parent), gguf_file=bundled_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.mark.slow
def test_greedy_matches_transformers(hf_model) -> None:
    # A 256-token step budget: the shared-prefix prompts (> 256 tokens) are prefilled in chunks,
    # and later ones hit the prefix cache that earlier ones filled.
    llm = LLM("smollm2-135m", dtype="float32", max_num_batched_tokens=256, max_num_seqs=8)
    tok = llm.get_tokenizer()
    prompt_ids = [tok.encode(p) for p in PROMPTS]
    assert max(len(p) for p in prompt_ids) > 256
    outputs = llm.generate(
        [{"prompt_token_ids": ids} for ids in prompt_ids],
        SamplingParams(temperature=0.0, max_tokens=MAX_NEW),
        use_tqdm=False,
    )
    assert any(o.num_cached_tokens > 0 for o in outputs), "expected prefix-cache hits on the shared prefix"
    eos = hf_model.generation_config.eos_token_id
    for ids, out in zip(prompt_ids, outputs):
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos, pad_token_id=eos,
            )[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == ref, f"prompt {tok.decode(ids)[:60]!r}"
    assert llm.engine.scheduler.kv.pool.num_free_blocks == llm.engine.num_blocks


@pytest.mark.slow
def test_prompt_logprobs_match_transformers(hf_model) -> None:
    """Prompt logprobs (None at position 0) equal HF's log-softmax over the prompt: prefilled in chunks
    across steps, with the prefix already cached by an earlier request (it must be computed, not read), and
    with n=2 (the first child computes them)."""
    llm = LLM("smollm2-135m", dtype="float32", max_num_batched_tokens=64)
    tok = llm.get_tokenizer()
    prompt = SHARED_PREFIX + "Question: which city is the oldest?"
    ids = tok.encode(prompt)
    llm.generate([SHARED_PREFIX + "Question: which sea is the saltiest?"], SamplingParams(max_tokens=1), use_tqdm=False)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2, n=2, prompt_logprobs=3),
                       use_tqdm=False)[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    positions = out.prompt_logprobs
    assert positions is not None and len(positions) == len(ids) and positions[0] is None
    for j in range(1, len(ids)):
        entry = positions[j]
        assert entry[ids[j]].logprob == pytest.approx(ref[j - 1, ids[j]].item(), abs=2e-3)
        assert entry[ids[j]].rank == int((ref[j - 1] > ref[j - 1, ids[j]]).sum()) + 1
        top = [t for t, lp in sorted(entry.items(), key=lambda kv: kv[1].rank) if lp.rank <= 3]
        assert top == ref[j - 1].topk(3).indices.tolist()
    assert [len(o.token_ids) for o in out.outputs] == [2, 2]
    assert llm.engine.scheduler.kv.pool.num_free_blocks == llm.engine.num_blocks
