"""Block accounting survives finish, abort, preemption and errors; the engine outlives bad steps."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from pagoda.api.outputs import FinishReason


@pytest.fixture()
def tiny_llm(make_tiny_model) -> LLM:
    folder, _ = make_tiny_model("llama", seed=3)
    # 24 blocks of 4 tokens: far fewer than the batch below needs at once, so it must preempt.
    return LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=24, max_num_batched_tokens=32)


def _all_free(llm: LLM) -> bool:
    kv = llm.engine.scheduler.kv
    return kv.pool.num_free_blocks == kv.num_blocks and all(b.ref_cnt == 0 for b in kv.pool.blocks)


def test_finish_abort_preempt_error_leave_no_blocks(tiny_llm: LLM, monkeypatch) -> None:
    engine = tiny_llm.engine
    params = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True, seed=0)
    for i in range(8):
        engine.add_request(f"r{i}", [100 + i] * 18 + [7, 8], params)
    engine.add_request("n2", [5] * 10, SamplingParams(n=2, temperature=1.0, max_tokens=12, ignore_eos=True))
    finished: dict[str, str | None] = {}
    calls = {"n": 0}
    real_execute = engine.core.executor.execute_model

    def flaky_execute(scheduler_output):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("injected failure")
        return real_execute(scheduler_output)

    monkeypatch.setattr(engine.core.executor, "execute_model", flaky_execute)
    step = 0
    while engine.has_unfinished_requests():
        step += 1
        if step == 3:
            engine.abort_request(["r1", "does-not-exist"])
        if step == 10:
            engine.abort_request("r7")
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].finish_reason
        assert step < 2000
    assert engine.scheduler.num_preemptions > 0
    assert finished["r1"] == FinishReason.ABORT.value
    assert FinishReason.ERROR.value in finished.values()
    assert FinishReason.LENGTH.value in finished.values()
    assert len(finished) == 9
    assert _all_free(tiny_llm)
    # The engine is still healthy after the failed step.
    out = tiny_llm.generate(["hello"], SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 5 and _all_free(tiny_llm)


def test_preempted_request_output_equals_unpreempted(make_tiny_model) -> None:
    folder, _ = make_tiny_model("llama", seed=4)
    prompts = [{"prompt_token_ids": [200 + i] * 15} for i in range(6)]
    greedy = SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True)
    roomy = LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=256)
    tight = LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=20)
    a = roomy.generate(prompts, greedy, use_tqdm=False)
    b = tight.generate(prompts, greedy, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert _all_free(roomy) and _all_free(tight)


def test_output_processing_error_fails_one_request(tiny_llm: LLM, monkeypatch) -> None:
    engine = tiny_llm.engine
    real = engine.output_processor._take_tokens

    def take_tokens(child, core_output):
        if core_output.request_id == "bad":
            raise UnicodeError("injected")
        return real(child, core_output)

    monkeypatch.setattr(engine.output_processor, "_take_tokens", take_tokens)
    engine.add_request("bad", "one two", SamplingParams(max_tokens=4, ignore_eos=True))
    engine.add_request("good", "three four", SamplingParams(max_tokens=4, ignore_eos=True))
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out
    assert results["bad"].outputs[0].finish_reason == "error" and "injected" in results["bad"].error
    assert results["good"].outputs[0].finish_reason == "length"
    assert _all_free(tiny_llm)


def test_priority_runs_first(make_tiny_model) -> None:
    folder, _ = make_tiny_model("llama", seed=5)
    llm = LLM(str(folder), dtype="float32", max_num_seqs=1)
    engine = llm.engine
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    engine.add_request("low", "a b c", params, priority=5)
    engine.add_request("high", "d e f", params, priority=-1)
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["high", "low"]


def test_n_children_share_the_prompt_blocks(make_tiny_model) -> None:
    folder, _ = make_tiny_model("llama", seed=7)
    llm = LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=128)
    prompt = {"prompt_token_ids": list(range(300, 341))}  # 41 tokens: 10 full blocks + 1
    out = llm.generate([prompt], SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=5, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs) == 4 and all(len(o.token_ids) == 5 for o in out.outputs)
    # The first child computes the prompt; the other three reuse its 10 full blocks and compute
    # only the last prompt token.
    assert llm.engine.stats.prompt_tokens == 41 + 3 * 1
    assert _all_free(llm)


def test_a_recomputed_prompt_reports_its_logprobs_once() -> None:
    """After preemption the prompt is prefilled again; only positions not yet reported give logprobs."""
    from pagoda.api.params import SamplingParams as Params
    from pagoda.engine.step import NewRequestData
    from pagoda.engine.worker.input_batch import CachedRequestState
    from pagoda.engine.worker.model_runner import prompt_positions

    req = CachedRequestState.from_new(NewRequestData("r", list(range(30)), Params(prompt_logprobs=1), frozenset(), [], 0))
    assert prompt_positions(req, 0, 16) == (0, 16)
    req.num_prompt_logprobs = 16  # reported, then preempted: the prompt is computed again from 0
    assert prompt_positions(req, 0, 16) == (16, 0)
    assert prompt_positions(req, 16, 14) == (0, 13)  # the last prompt position predicts output
    req.num_prompt_logprobs = 20
    assert prompt_positions(req, 16, 14) == (4, 9)
