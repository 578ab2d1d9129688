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
