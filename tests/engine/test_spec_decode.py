"""Speculative decoding by prompt lookup: the output is the output without it, the KV and the prefix cache stay
consistent, and the drafts a step verifies follow measured acceptance and cost."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pagoda import LLM, SamplingParams
from pagoda.config import EngineConfig
from pagoda.engine.core.draft_policy import EXPLORE_EVERY, MIN_STEPS, DraftPolicy, StepCost
from pagoda.engine.core.request import Request
from pagoda.engine.worker.ngram_proposer import NgramProposer
from pagoda.engine.worker.verify import Verification

TEXT = (Path(__file__).parents[2] / "pagoda" / "data" / "eval_text.txt").read_text()
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "adaptive": False}


def grounded_prompts(count: int) -> list[str]:
    """Prompts whose answers repeat their own text (where lookup finds drafts), and a few where it does not."""
    prompts = []
    for i in range(count):
        passage = TEXT[200 * i : 200 * i + 260]
        task = ("Repeat the following text exactly.", "Copy this passage, then stop.",
                "Rewrite the text below without changing a word.")[i % 3]
        prompts.append(f"<|im_start|>user\n{task}\n\n{passage}<|im_end|>\n<|im_start|>assistant\n")
    return prompts + ["The capital of France is", "def fibonacci(n):\n", "1, 2, 3, 4, 5, 6, 7,"]


def outputs(llm: LLM, prompts: list[str], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def all_blocks_free(llm: LLM) -> bool:
    kv = llm.engine.scheduler.kv
    return kv.pool.num_free_blocks == kv.num_blocks


# ---- parts ---------------------------------------------------------------------------------------


def test_config_is_vllms_and_names_what_is_wrong() -> None:
    spec = EngineConfig.from_kwargs(speculative_config='{"method": "ngram", "num_speculative_tokens": 4}').speculative_config
    assert (spec.method, spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max) == ("ngram", 4, 2, 5)
    spec = EngineConfig.from_kwargs(speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                                        "prompt_lookup_max": 3}).speculative_config
    assert (spec.prompt_lookup_min, spec.prompt_lookup_max) == (3, 3)
    assert EngineConfig.from_kwargs(speculative_config=NGRAM).to_kwargs()["speculative_config"]["method"] == "ngram"
    for bad, named in [
        ({"method": "medusa", "num_speculative_tokens": 2}, "speculative_config.method"),
        ({"method": "ngram"}, "speculative_config.num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
         "speculative_config.prompt_lookup_min"),
        ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "'lookahead'"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.model"),
        ("{not json", "speculative_config is not valid JSON"),
    ]:
        with pytest.raises(ValueError, match=named.replace(".", r"\.")):
            EngineConfig.from_kwargs(speculative_config=bad)


def test_ngram_lookup_takes_the_longest_latest_match() -> None:
    proposer = NgramProposer(min_n=1, max_n=3, num_tokens=3)
    tokens = np.array([5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 6, 7])
    assert proposer.propose(tokens, limit=10) == [2, 3, 6]  # "6 7" last seen before "2 3"; no "x 6 7" repeats
    tokens = np.array([4, 6, 7, 8, 9, 1, 6, 7, 2, 4, 6, 7])
    assert proposer.propose(tokens, limit=10) == [8, 9, 1]  # "4 6 7" outranks the later "6 7"
    assert proposer.propose(tokens, limit=2) == [8, 9]
    assert proposer.propose(np.array([1, 2, 3, 4]), limit=3) == []
    assert NgramProposer(2, 2, 3).propose(np.array([1, 2, 1, 2]), limit=3) == [1, 2]  # runs into the suffix


def test_verification_keeps_drafts_while_they_match_the_samples() -> None:
    plan = Verification.plan(np.array([0, 5, 9]), [[], [7, 8, 9], [4]])
    assert plan.logit_rows.tolist() == [0, 2, 3, 4, 5, 8, 9]
    assert plan.owners == [0, 1, 1, 1, 1, 2, 2] and plan.pending == [[], [], [7], [7, 8], [7, 8, 9], [], [4]]
    assert plan.accept([11, 7, 8, 1, 9, 4, 5]) == [[11], [7, 8, 1], [4, 5]]
    assert plan.accept([11, 3, 8, 9, 9, 6, 5]) == [[11], [3], [6]]


def test_step_cost_fit_and_the_policy_it_drives() -> None:
    cost = StepCost()
    for step in range(60):
        rows = 1 + step % 4
        cost.observe(rows, 0.010 + 0.002 * rows)
    assert cost.fixed == pytest.approx(0.010, rel=1e-6) and cost.per_row == pytest.approx(0.002, rel=1e-6)

    def trimmed(per_row: float, batch: int, accepted: int, rejected: int) -> list[int]:
        policy = DraftPolicy(adaptive=True)
        policy.cost = StepCost(fixed=0.010, per_row=per_row, steps=100)
        running = [Request(str(i), [1, 2], SamplingParams(), frozenset()) for i in range(batch)]
        for r in running:
            r.spec_token_ids = [3, 4, 5, 6]
            r.num_accepted_drafts, r.num_rejected_drafts = accepted, rejected
        policy.trim(running)
        return [len(r.spec_token_ids) for r in running]

    assert trimmed(0.002, batch=1, accepted=90, rejected=10) == [4]  # cheap rows, good drafts: all of them
    assert trimmed(0.002, batch=1, accepted=10, rejected=90) == [0]  # mostly wrong: not worth a row
    assert trimmed(0.0008, batch=64, accepted=80, rejected=20) == [0] * 64  # a row costs its share at batch 64
    assert trimmed(0.0, batch=64, accepted=50, rejected=50) == [4] * 64  # rows for free: verify everything
    # Steps that always verify as many rows leave a row's cost a guess: now and then a step verifies none.
    policy = DraftPolicy(adaptive=True)
    for _ in range(MIN_STEPS):
        policy.observe_step(4, 0.012)
    cleared = []
    for _ in range(2 * EXPLORE_EVERY):
        running = [Request("r", [1, 2], SamplingParams(), frozenset())]
        running[0].spec_token_ids = [3, 4, 5]
        policy.trim(running)
        cleared.append(not running[0].spec_token_ids)
    assert sum(cleared) == 2
    policy.observe_step(1, 0.006)
    assert policy.cost.slope_measured and policy.cost.per_row > 0.0015

    fixed = DraftPolicy(adaptive=False)  # "adaptive": false verifies every draft, whatever it costs
    fixed.cost = StepCost(fixed=0.010, per_row=0.01, steps=100)
    running = [Request("r", [1, 2], SamplingParams(), frozenset())]
    running[0].spec_token_ids = [3, 4, 5]
    fixed.trim(running)
    assert running[0].spec_token_ids == [3, 4, 5] and fixed.draft_limit(running) is None


def test_a_draft_models_forwards_decide_how_deep_it_drafts() -> None:
    """A draft model's forwards are timed apart from the target's step; the proposal depth is the one with
    the most expected tokens per second: all of them for a cheap draft that is often right, none for a draft
    as costly as the target (the bundled model as its own draft on a CPU), fewer in a large batch."""

    def depth(draft_seconds: float, batch: int, accepted: int = 90, rejected: int = 10) -> int | None:
        policy = DraftPolicy(adaptive=True, max_drafts=5)
        for step in range(40):
            rows = batch + (step % 3) * batch
            policy.observe_step(rows, 0.006 + 0.0018 * rows + draft_seconds, [(batch, draft_seconds)])
        assert policy.cost.fixed == pytest.approx(0.006, rel=1e-3)  # the draft's time is not the target's
        running = [Request(str(i), [1, 2], SamplingParams(), frozenset()) for i in range(batch)]
        for r in running:
            r.num_accepted_drafts, r.num_rejected_drafts = accepted, rejected
        return policy.draft_limit(running)

    assert depth(0.0005, batch=1) == 5
    assert depth(0.0065, batch=1) == 0  # as costly as a target step
    assert depth(0.0005, batch=1, accepted=10, rejected=90) == 0
    assert 0 < depth(0.0005, batch=4) < 5


# ---- the engine ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp32_pair() -> tuple[LLM, LLM]:
    common = {"dtype": "float32", "kv_cache_gib": 0.5, "max_model_len": 1024}
    return LLM(**common), LLM(speculative_config=NGRAM, **common)


@pytest.mark.slow
def test_greedy_output_identical_with_and_without_speculation(fp32_pair: tuple[LLM, LLM]) -> None:
    off, on = fp32_pair
    prompts = grounded_prompts(12)
    params = SamplingParams(temperature=0.0, max_tokens=48)
    alone = [outputs(on, [p], params)[0] for p in prompts[:3]]  # batch 1: every draft verified
    expected = outputs(off, prompts, params)
    assert outputs(on, prompts, params) == expected
    assert alone == expected[:3]
    policy = on.engine.scheduler.spec
    assert policy.num_accepted_tokens > 0.5 * policy.num_draft_tokens > 0  # the prompts do ground the drafts
    assert all_blocks_free(on)


@pytest.mark.slow
def test_logprobs_stops_and_limits_under_speculation(fp32_pair: tuple[LLM, LLM]) -> None:
    off, on = fp32_pair
    prompt = grounded_prompts(1)[0]
    plain = off.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, logprobs=2), use_tqdm=False)[0]
    spec = on.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, logprobs=2), use_tqdm=False)[0]
    assert spec.outputs[0].token_ids == plain.outputs[0].token_ids
    for a, b in zip(plain.outputs[0].logprobs, spec.outputs[0].logprobs):
        assert list(a) == list(b)
        assert all(math.isclose(a[t].logprob, b[t].logprob, abs_tol=1e-3) for t in a)
    tokens = plain.outputs[0].token_ids
    stop = tokens[12]  # a token inside what the drafts propose: the output ends there all the same
    for params in (SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[stop]),
                   SamplingParams(temperature=0.0, max_tokens=7),
                   SamplingParams(temperature=0.0, max_tokens=30, min_tokens=20, stop_token_ids=[tokens[3]])):
        assert outputs(on, [prompt], params) == outputs(off, [prompt], params), params
    opted_out = on.engine.scheduler.spec.num_drafts
    assert outputs(on, [prompt], SamplingParams(temperature=0.0, max_tokens=30, speculative_decoding=False)) == \
        [tokens]
    assert on.engine.scheduler.spec.num_drafts == opted_out  # no drafts were verified for it
    assert all_blocks_free(on)


@pytest.mark.slow
def test_penalties_and_grammars_see_the_drafts_before_each_position(fp32_pair: tuple[LLM, LLM]) -> None:
    """A verified position's penalties count the drafts before it as output, and its grammar mask is the
    matcher's after them (advanced, then rolled back): the same tokens as without speculation."""
    off, on = fp32_pair
    prompt = grounded_prompts(2)[1]
    for params in (SamplingParams(temperature=0.0, max_tokens=40, repetition_penalty=1.05),
                   SamplingParams(temperature=0.0, max_tokens=40, frequency_penalty=0.1, presence_penalty=0.1),
                   SamplingParams(temperature=0.0, max_tokens=40, min_tokens=30)):
        before = on.engine.scheduler.spec.num_accepted_tokens
        assert outputs(on, [prompt], params) == outputs(off, [prompt], params), params
        assert on.engine.scheduler.spec.num_accepted_tokens > before, params  # drafts survived the penalties
    words = TEXT.split()[:12]
    regex = " ".join(words[:6]) + "( " + "| ".join(words[6:]) + ")+"
    listing = "<|im_start|>user\nRepeat: " + " ".join(words) + " " + " ".join(words) + "<|im_end|>\n<|im_start|>assistant\n"
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    for constraint in ({"regex": regex}, {"json": schema}):
        params = SamplingParams(temperature=0.0, max_tokens=48, structured_outputs=constraint)
        before = on.engine.scheduler.spec.num_draft_tokens
        assert outputs(on, [listing], params) == outputs(off, [listing], params), constraint
        assert on.engine.scheduler.spec.num_draft_tokens > before, constraint
    assert all_blocks_free(on)


@pytest.mark.slow
def test_seeded_sampling_draws_the_same_tokens() -> None:
    """A seeded request's number for each position comes from (seed, position), so verifying a position as a
    draft or sampling it alone draws the same token: batch-invariant kernels make the logits equal too, whatever
    the step budget cuts."""
    common = {"batch_invariant": True, "kv_cache_gib": 0.5, "max_model_len": 1024}
    off, on = LLM(**common), LLM(speculative_config=NGRAM, **common)
    prompts = grounded_prompts(4)
    params = [SamplingParams(temperature=t, top_p=p, top_k=k, min_p=m, seed=s, max_tokens=40,
                             logit_bias={13: -5.0})
              for t, p, k, m, s in [(0.7, 1.0, 0, 0.0, 1), (1.0, 0.9, 50, 0.0, 2), (0.5, 1.0, 0, 0.05, 3),
                                    (0.9, 0.95, 20, 0.02, 4)]] + [SamplingParams(temperature=0.0, max_tokens=40)] * 3
    expected = outputs(off, prompts, params)
    assert outputs(on, prompts, params) == expected
    assert on.engine.scheduler.spec.num_accepted_tokens > 0
    # A 48-token budget cuts into the drafts (and splits prefills by what else runs): the same tokens.
    tight = LLM(speculative_config=NGRAM, max_num_batched_tokens=48, **common)
    assert outputs(tight, prompts, params) == expected
    assert tight.engine.scheduler.spec.num_drafts > 0 and all_blocks_free(tight)


@pytest.mark.slow
def test_unseeded_sampling_keeps_the_target_distribution(fp32_pair: tuple[LLM, LLM]) -> None:
    """Many unseeded draws of a continuation the drafts predict: the tokens at the draft positions follow the
    same distribution as without speculation (a chi-square test per position)."""
    off, on = fp32_pair
    prompt = "one two three one two three one two three one two three one two"
    params = SamplingParams(temperature=1.5, max_tokens=4, ignore_eos=True)
    draws = 240
    before = on.engine.scheduler.spec.num_draft_tokens
    with_spec = outputs(on, [prompt] * draws, params)
    without = outputs(off, [prompt] * draws, params)
    assert on.engine.scheduler.spec.num_draft_tokens > before
    for position in range(1, 4):
        a, b = Counter(t[position] for t in with_spec), Counter(t[position] for t in without)
        common = [t for t in set(a) | set(b) if a[t] + b[t] >= 10]
        rest = (sum(a.values()) - sum(a[t] for t in common), sum(b.values()) - sum(b[t] for t in common))
        table = [(a[t], b[t]) for t in common] + ([rest] if sum(rest) else [])
        chi2 = sum((x - y) ** 2 / (x + y) for x, y in table)  # equal totals: the two-sample statistic
        dof = len(table) - 1
        assert chi2 < dof + 5 * math.sqrt(2 * dof) + 10, (position, table)  # far beyond p = 0.001


@pytest.mark.slow
def test_native_gguf_verification_matches() -> None:
    """The one-call decode kernel verifies drafts (each draft a row over the keys up to it): greedy output
    equals the non-speculative one."""
    common = {"kv_cache_gib": 0.5, "max_model_len": 1024}
    off, on = LLM(**common), LLM(speculative_config=NGRAM, **common)
    prompts = grounded_prompts(3)
    params = SamplingParams(temperature=0.0, max_tokens=40)
    expected = [outputs(off, [p], params)[0] for p in prompts]
    assert [outputs(on, [p], params)[0] for p in prompts] == expected
    assert on.engine.scheduler.spec.num_accepted_tokens > 0
    assert all_blocks_free(on)


@pytest.mark.slow
def test_triton_backend_verifies_drafts(make_tiny_model) -> None:
    """The Triton paged-attention kernels (here under TRITON_INTERPRET=1, tiny sizes) attend each draft over
    the keys up to it: greedy output equals the output without speculation."""
    folder, _ = make_tiny_model("llama", seed=11, vocab_size=96)  # a small vocabulary: its outputs repeat
    common = {"dtype": "float32", "attention_backend": "triton", "num_kv_blocks": 64, "block_size": 4}
    off, on = LLM(str(folder), **common), LLM(str(folder), speculative_config=NGRAM, **common)
    prompts = [{"prompt_token_ids": [30 + (i * 7 + j) % 11 for j in range(24)]} for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    assert outputs(on, prompts, params) == outputs(off, prompts, params)
    assert on.engine.scheduler.spec.num_draft_tokens > 0
    assert all_blocks_free(on)
