"""Speculative decoding with a draft model: the bundled model as its own draft keeps every greedy draft (the
draft's KV, mirrored on the target's blocks, follows the sequence through catch-up, prefix-cache hits and
preemption), outputs equal the non-speculative ones, and a draft that does not fit is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pagoda import LLM, SamplingParams
from tests.engine.test_spec_decode import TEXT, all_blocks_free, grounded_prompts, outputs

SELF_DRAFT = {"method": "draft_model", "model": "smollm2-135m", "num_speculative_tokens": 3, "adaptive": False}
# Batch-invariant kernels: the draft computes each position exactly as the target does, whatever the rows.
EXACT = {"dtype": "float32", "batch_invariant": True, "kv_cache_gib": 0.5, "max_model_len": 1024}


def drafts_kept(llm: LLM) -> tuple[int, int]:
    policy = llm.engine.scheduler.spec
    return policy.num_accepted_tokens, policy.num_draft_tokens


@pytest.fixture(scope="module")
def exact_pair() -> tuple[LLM, LLM]:
    return LLM(**EXACT), LLM(speculative_config=SELF_DRAFT, **EXACT)


@pytest.mark.slow
def test_the_model_as_its_own_draft_keeps_every_greedy_draft(exact_pair: tuple[LLM, LLM]) -> None:
    off, on = exact_pair
    prompts = grounded_prompts(6)
    params = SamplingParams(temperature=0.0, max_tokens=40)
    expected = outputs(off, prompts, params)
    assert [outputs(on, [p], params)[0] for p in prompts[:2]] == expected[:2]  # batch 1
    assert outputs(on, prompts, params) == expected  # drafts batched across requests
    accepted, proposed = drafts_kept(on)
    assert proposed > 200 and accepted == proposed
    # Stops and limits inside the drafts, and an opt-out, end where they would without them.
    tokens = expected[0]
    for p in (SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[tokens[10]]),
              SamplingParams(temperature=0.0, max_tokens=6),
              SamplingParams(temperature=0.0, max_tokens=40, speculative_decoding=False)):
        assert outputs(on, [prompts[0]], p) == outputs(off, [prompts[0]], p), p
    assert drafts_kept(on)[0] == drafts_kept(on)[1]
    assert all_blocks_free(on)


@pytest.mark.slow
def test_the_draft_catches_up_through_prefix_hits_budgets_and_preemption() -> None:
    """A request that starts from prefix-cached blocks computes its prompt in the draft; a prompt longer than
    the step's budget is caught up over several steps; a preempted request's draft KV goes with its blocks and
    is recomputed: every greedy draft is still kept, and every block comes back."""
    shared = grounded_prompts(1)[0] * 3  # 216 tokens, more than three 64-token steps
    prompts = [shared + TEXT[1000 + 400 * i : 1300 + 400 * i] for i in range(4)]  # and about 70 of its own
    params = SamplingParams(temperature=0.0, max_tokens=32)
    off = LLM(**EXACT)
    expected = outputs(off, prompts, params)
    # Each request needs 7 blocks of 16 beside 13 shared ones: 33 blocks hold three at once, not four.
    tight = {**{k: v for k, v in EXACT.items() if k != "kv_cache_gib"}, "num_kv_blocks": 33,
             "max_num_batched_tokens": 64, "max_model_len": 512}
    on = LLM(speculative_config=SELF_DRAFT, **tight)
    assert outputs(on, prompts[:1], params) == expected[:1]  # fills the prefix cache
    assert outputs(on, prompts, params) == expected
    assert on.engine.scheduler.num_preemptions > 0
    assert on.engine.scheduler.kv.prefix_hits > 0
    accepted, proposed = drafts_kept(on)
    assert proposed > 50 and accepted == proposed
    assert all_blocks_free(on)


@pytest.mark.slow
def test_seeded_sampling_with_a_draft_model_draws_the_same_tokens(exact_pair: tuple[LLM, LLM]) -> None:
    """The draft proposes its argmax, a deterministic proposal, and each position draws its number from (seed,
    position): every seed gives the tokens it gives without speculation, so the distribution over seeds is the
    target's (unseeded draws go through the same verification: tests/engine/test_spec_decode.py)."""
    off, on = exact_pair
    prompts = grounded_prompts(3)[:3]
    seeded = [SamplingParams(temperature=t, top_p=p, top_k=k, seed=s, max_tokens=32, repetition_penalty=r)
              for t, p, k, s, r in [(0.7, 1.0, 0, 1, 1.0), (1.0, 0.9, 50, 2, 1.1), (0.5, 1.0, 0, 3, 1.0)]]
    before = drafts_kept(on)[0]
    assert outputs(on, prompts, seeded) == outputs(off, prompts, seeded)
    assert drafts_kept(on)[0] > before
    assert all_blocks_free(on)


@pytest.mark.slow
def test_dummy_weight_pairs(tmp_path: Path, make_tiny_model) -> None:
    """Shapes only (load_format dummy): a smaller draft of another architecture verifies to the target's own
    output; the target's config as its own draft (the same seeded weights) keeps every greedy draft."""
    folder, _ = make_tiny_model("qwen3", seed=1, num_hidden_layers=4)
    target = tmp_path / "target.json"
    target.write_text((folder / "config.json").read_text())
    draft_folder, _ = make_tiny_model("llama", seed=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    draft = tmp_path / "draft.json"
    draft.write_text((draft_folder / "config.json").read_text())
    common = {"load_format": "dummy", "dtype": "float32", "tokenizer": str(folder), "num_kv_blocks": 128}
    prompts = [{"prompt_token_ids": [5 + 7 * i + j for j in range(20)]} for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected = outputs(LLM(str(target), **common), prompts, params)
    for model, all_kept in ((str(draft), False), (str(target), True)):
        on = LLM(str(target), speculative_config={**SELF_DRAFT, "model": model}, **common)
        assert outputs(on, prompts, params) == expected, model
        accepted, proposed = drafts_kept(on)
        assert proposed > 0 and (accepted == proposed or not all_kept), model
        assert all_blocks_free(on)


def test_a_draft_that_does_not_fit_is_refused_by_name(tmp_path: Path, make_tiny_model) -> None:
    small_vocab, _ = make_tiny_model("llama", seed=3, vocab_size=96)
    short, _ = make_tiny_model("llama", seed=4, max_position_embeddings=256)
    common = {"dtype": "float32", "kv_cache_gib": 0.25, "max_model_len": 1024}
    for model, message in ((str(small_vocab), "vocabulary of 96 tokens"),
                           (str(tmp_path / "nowhere"), "could not be loaded"),
                           (str(short), "takes up to 256 positions")):
        with pytest.raises(ValueError, match="speculative_config.model") as info:
            LLM(speculative_config={**SELF_DRAFT, "model": model}, **common)
        assert message in str(info.value)
    other = json.loads((small_vocab / "tokenizer.json").read_text())
    vocab = other["model"]["vocab"]
    vocab["the"], vocab["and"] = vocab["and"], vocab["the"]  # the same tokens under other ids
    (short / "tokenizer.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="another tokenizer"):
        LLM(speculative_config={**SELF_DRAFT, "model": str(short)}, **{**common, "max_model_len": 256})


@pytest.mark.slow
def test_triton_backend_runs_the_draft(make_tiny_model) -> None:
    """The draft's forwards go through the Triton kernels too (here under TRITON_INTERPRET=1, tiny sizes)."""
    folder, _ = make_tiny_model("llama", seed=11, vocab_size=96)
    common = {"dtype": "float32", "attention_backend": "triton", "num_kv_blocks": 64, "block_size": 4}
    off = LLM(str(folder), **common)
    on = LLM(str(folder), speculative_config={**SELF_DRAFT, "model": str(folder)}, **common)
    prompts = [{"prompt_token_ids": [30 + (i * 7 + j) % 11 for j in range(20)]} for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    assert outputs(on, prompts, params) == outputs(off, prompts, params)
    accepted, proposed = drafts_kept(on)
    assert proposed > 10 and accepted > 0.9 * proposed
    assert all_blocks_free(on)
