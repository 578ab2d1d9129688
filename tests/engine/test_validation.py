"""Bad arguments raise errors that name the parameter."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from pagoda.api.limits import AdmissionError


@pytest.mark.parametrize("kwargs, name", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": 0.0}, "top_p"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_k": -5}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"n": 0}, "n"),
    ({"logprobs": 21}, "logprobs"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"frequency_penalty": -3.0}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": 5e-324}, "repetition_penalty"),  # found by the fuzz: logits / it overflow to inf
    ({"stop": ["x"] * 17}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"logit_bias": {1: 500.0}}, "logit_bias"),
    ({"logit_bias": {i: 1.0 for i in range(2000)}}, "logit_bias"),
])
def test_sampling_params_name_the_parameter(kwargs, name) -> None:
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_unknown_engine_kwarg() -> None:
    with pytest.raises(TypeError, match="max_num_seq_typo"):
        LLM("smollm2-135m", max_num_seq_typo=4)


@pytest.mark.parametrize("kwargs, name", [
    ({"block_size": 12}, "block_size"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"kv_cache_gib": 0}, "kv_cache_gib"),
    ({"dtype": "int3"}, "dtype"),
    ({"tensor_parallel_size": 2}, "tensor_parallel_size"),
])
def test_bad_engine_values(kwargs, name) -> None:
    with pytest.raises(ValueError, match=name):
        LLM("smollm2-135m", **kwargs)


@pytest.fixture(scope="module")
def small_llm(make_tiny_model) -> LLM:
    folder, _ = make_tiny_model("llama", seed=6)
    return LLM(str(folder), dtype="float32", max_model_len=64, num_kv_blocks=8, block_size=4)


def test_prompt_too_long(small_llm: LLM) -> None:
    with pytest.raises(AdmissionError, match="maximum context length is 64 tokens"):
        small_llm.generate([{"prompt_token_ids": [5] * 80}], use_tqdm=False)
    with pytest.raises(AdmissionError, match=r"requested 80 tokens \(20 in the prompt, 60 in the completion\)"):
        small_llm.generate([{"prompt_token_ids": [5] * 20}], SamplingParams(max_tokens=60), use_tqdm=False)
    # Fits max_model_len but can never fit the 8-block (32-token) cache.
    with pytest.raises(AdmissionError, match="KV blocks"):
        small_llm.generate([{"prompt_token_ids": [5] * 30}], SamplingParams(max_tokens=20), use_tqdm=False)
    assert not small_llm.engine.has_unfinished_requests()


def test_bad_prompts_and_vocab_ids(small_llm: LLM) -> None:
    with pytest.raises(ValueError, match="prompt_token_ids"):
        small_llm.generate([{"prompt_token_ids": [10**9]}], use_tqdm=False)
    with pytest.raises(ValueError, match="logit_bias"):
        small_llm.generate(["hi"], SamplingParams(logit_bias={10**9: 1.0}), use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params"):
        small_llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False)
    with pytest.raises(AdmissionError, match="at least one token"):
        small_llm.generate([{"prompt_token_ids": []}], use_tqdm=False)
    # A rejected batch leaves nothing behind, and the engine still serves.
    assert not small_llm.engine.has_unfinished_requests()
    assert small_llm.generate(["ok"], SamplingParams(max_tokens=2), use_tqdm=False)[0].finished
