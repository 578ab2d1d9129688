"""Sampling features end to end on the bundled model."""

from __future__ import annotations

import math

import pytest

from pagoda import LLM, SamplingParams

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("smollm2-135m")


def _tokens(llm: LLM, params: SamplingParams, prompt: str = PROMPT) -> list[int]:
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids


def test_top_k_1_and_tiny_top_p_equal_greedy() -> None:
    """fp32 logits: bf16 ones tie now and then (14.5625 twice here once), and top_k=1 keeps every token tied at
    the top (as vLLM's masking does), where argmax takes the first."""
    fp32 = LLM("smollm2-135m", dtype="float32", kv_cache_gib=0.25, max_model_len=1024)
    greedy = _tokens(fp32, SamplingParams(temperature=0.0, max_tokens=12))
    assert _tokens(fp32, SamplingParams(temperature=1.0, top_k=1, seed=3, max_tokens=12)) == greedy
    assert _tokens(fp32, SamplingParams(temperature=1.0, top_p=1e-6, seed=3, max_tokens=12)) == greedy
    assert _tokens(fp32, SamplingParams(temperature=1.0, min_p=1.0, seed=3, max_tokens=12)) == greedy


def test_logit_bias_forces_a_token(llm: LLM) -> None:
    target = llm.get_tokenizer().encode(" banana")[0]
    out = _tokens(llm, SamplingParams(temperature=0.0, max_tokens=4, logit_bias={target: 100.0}))
    assert out == [target] * 4


def test_min_tokens_and_ignore_eos(llm: LLM) -> None:
    eos = sorted(llm.engine.core.eos_token_ids)
    chat = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    short = llm.generate([chat], SamplingParams(temperature=0.0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert short.finish_reason == "stop" and len(short.token_ids) < 64
    longer = _tokens(llm, SamplingParams(temperature=0.0, max_tokens=64, min_tokens=len(short.token_ids) + 5), chat)
    assert len(longer) >= len(short.token_ids) + 5
    assert not set(longer[: len(short.token_ids) + 5]) & set(eos)
    forced = llm.generate([chat], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), use_tqdm=False)[0]
    assert len(forced.outputs[0].token_ids) == 40 and forced.outputs[0].finish_reason == "length"


def test_penalties_reduce_repetition(llm: LLM) -> None:
    prompt = "Repeat after me: la la la la la la la la"
    plain = _tokens(llm, SamplingParams(temperature=0.0, max_tokens=24), prompt)
    for params in (
        SamplingParams(temperature=0.0, max_tokens=24, repetition_penalty=1.8),
        SamplingParams(temperature=0.0, max_tokens=24, frequency_penalty=2.0),
    ):
        penalized = _tokens(llm, params, prompt)
        assert len(set(penalized)) > len(set(plain))


def test_stop_strings_and_stop_token_ids(llm: LLM) -> None:
    full = llm.generate(["1, 2, 3, 4,"], SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)[0].outputs[0]
    assert " 7," in full.text
    cut = llm.generate(["1, 2, 3, 4,"], SamplingParams(temperature=0.0, max_tokens=20, stop=[" 7,"]), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == " 7,"
    assert cut.text == full.text[: full.text.index(" 7,")]
    kept = llm.generate(["1, 2, 3, 4,"], SamplingParams(temperature=0.0, max_tokens=20, stop=[" 7,"],
                        include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == full.text[: full.text.index(" 7,") + 3]
    stop_tok = full.token_ids[3]
    by_id = llm.generate(["1, 2, 3, 4,"], SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[stop_tok]),
                         use_tqdm=False)[0].outputs[0]
    assert by_id.token_ids == full.token_ids[: full.token_ids.index(stop_tok) + 1]
    assert by_id.stop_reason == stop_tok


def test_stream_deltas_hold_back_partial_stop(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=20, stop=[" 7,"])
    deltas = [c.text for o in llm.generate_stream("1, 2, 3, 4,", params) for c in o.outputs]
    final = llm.generate(["1, 2, 3, 4,"], params, use_tqdm=False)[0].outputs[0].text
    assert "".join(deltas) == final and " 7" not in "".join(deltas)


def test_logprobs(llm: LLM) -> None:
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=5, logprobs=5), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 5
    total = 0.0
    for token, position in zip(out.token_ids, out.logprobs):
        assert token in position and position[token].rank == 1  # greedy picks the top token
        ranks = sorted(lp.rank for tid, lp in position.items())
        assert ranks == [1, 2, 3, 4, 5]
        assert all(lp.logprob <= 0 and lp.decoded_token is not None for lp in position.values())
        assert sum(math.exp(lp.logprob) for lp in position.values()) <= 1.0 + 1e-4
        total += position[token].logprob
    assert out.cumulative_logprob == pytest.approx(total)
    sampled = llm.generate([PROMPT], SamplingParams(temperature=1.5, seed=0, max_tokens=8, logprobs=0), use_tqdm=False)[0].outputs[0]
    assert all(len(p) == 1 and t in p for t, p in zip(sampled.token_ids, sampled.logprobs))


def test_prompt_forms_and_per_prompt_params(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    ids = tok.encode(PROMPT)
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    a, b, c = llm.generate([PROMPT, ids, {"prompt_token_ids": ids}], greedy, use_tqdm=False)
    assert a.prompt_token_ids == b.prompt_token_ids == c.prompt_token_ids == ids
    assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids
    short, longer = llm.generate([PROMPT, PROMPT], [SamplingParams(temperature=0.0, max_tokens=2), greedy], use_tqdm=False)
    assert len(short.outputs[0].token_ids) == 2 and len(longer.outputs[0].token_ids) == 6
    chat = llm.chat([{"role": "user", "content": "Hi!"}], greedy, use_tqdm=False)
    assert chat[0].outputs[0].text
