"""The scheduler's side of the data-only step contract: payloads, per-step diffs, and a variable number of
tokens accepted per request per step (draft tokens), with the KV blocks and the prefix cache kept right."""

from __future__ import annotations

from pagoda.api.outputs import FinishReason
from pagoda.api.params import SamplingParams
from pagoda.config import CacheConfig, SchedulerConfig
from pagoda.engine.core.request import Request
from pagoda.engine.core.scheduler import Scheduler
from pagoda.engine.step import ModelRunnerOutput, SchedulerOutput

EOS = 2
BLOCK = 4
PROMPT = [100, 101, 102, 103, 104, 105]


def _scheduler(budget: int = 64) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget), CacheConfig(block_size=BLOCK), 16, 256)


def _request(rid: str = "r", max_tokens: int = 32) -> Request:
    return Request(rid, list(PROMPT), SamplingParams(max_tokens=max_tokens), frozenset({EOS}))


def _result(out: SchedulerOutput, tokens: dict[str, list[int]]) -> ModelRunnerOutput:
    return ModelRunnerOutput(list(out.req_ids), [tokens.get(rid, []) for rid in out.req_ids])


def _published(sched: Scheduler) -> list[tuple[int, ...]]:
    return sorted(b.token_ids for b in sched.kv.pool.blocks if b.block_hash is not None)


def test_a_new_request_goes_out_once_then_only_its_changes() -> None:
    sched = _scheduler()
    req = _request()
    sched.add_request(req)
    first = sched.schedule()
    assert [n.req_id for n in first.new_requests] == ["r"] and first.new_requests[0].block_ids == req.block_ids
    assert first.num_scheduled_tokens == [6] and first.num_computed_tokens == [0] and first.num_prompt_tokens == 6
    sched.update(first, _result(first, {"r": [10]}))
    second = sched.schedule()  # decode at position 6: room in the second block, nothing new to say
    assert second.new_requests == [] and second.cached.new_block_ids == {}
    assert second.num_scheduled_tokens == [1] and second.num_computed_tokens == [6]
    sched.update(second, _result(second, {"r": [11]}))
    sched.update(third := sched.schedule(), _result(third, {"r": [12]}))
    fourth = sched.schedule()  # position 8 starts a third block: only that block is sent
    assert fourth.cached.new_block_ids == {"r": [req.block_ids[2]]}


def test_fewer_accepted_drafts_keep_the_blocks_and_cache_only_verified_tokens() -> None:
    sched = _scheduler()
    req = _request()
    sched.add_request(req)
    out = sched.schedule()
    sched.update(out, _result(out, {"r": [10]}))  # tokens: prompt + [10]; 6 computed
    req.spec_token_ids = [11, 12, 13, 14]
    out = sched.schedule()
    assert out.num_scheduled_tokens == [5] and out.spec_token_ids == {"r": [11, 12, 13, 14]}
    assert len(req.block_ids) == 3  # room for positions 6..10
    held = list(req.block_ids)
    free_before = sched.kv.pool.num_free_blocks
    # Two drafts accepted, then the target's own token 99: three tokens in one step.
    (output,) = sched.update(out, _result(out, {"r": [11, 12, 99]}))
    assert output.new_token_ids == [11, 12, 99]
    assert req.token_ids == PROMPT + [10, 11, 12, 99]
    assert req.num_computed_tokens == 9  # positions 0..8 hold verified KV; 9 and 10 held rejected drafts
    assert req.spec_token_ids == []
    assert req.block_ids == held and sched.kv.pool.num_free_blocks == free_before  # kept for the next tokens
    # Two full blocks of verified tokens are cached; the third, with rejected slots, is not.
    assert _published(sched) == [tuple(PROMPT[:4]), (104, 105, 10, 11)]
    out = sched.schedule()  # the next step computes position 9 in the kept third block
    assert out.num_scheduled_tokens == [1] and out.num_computed_tokens == [9] and out.cached.new_block_ids == {}
    sched.update(out, _result(out, {"r": [20]}))
    # A request with the same tokens finds only verified blocks.
    twin = Request("twin", PROMPT + [10, 11, 12, 99, 20], SamplingParams(), frozenset({EOS}))
    assert len(sched.kv.find_cached_prefix(twin)) == 2


def test_a_stop_among_accepted_tokens_ends_the_request_there_and_frees_its_blocks() -> None:
    sched = _scheduler()
    req = _request()
    sched.add_request(req)
    out = sched.schedule()
    sched.update(out, _result(out, {"r": [10]}))
    req.spec_token_ids = [11, EOS, 13]
    out = sched.schedule()
    (output,) = sched.update(out, _result(out, {"r": [11, EOS, 13, 14]}))
    assert output.new_token_ids == [11, EOS] and output.finish_reason == FinishReason.STOP.value
    assert req.token_ids == PROMPT + [10, 11, EOS]
    assert sched.kv.pool.num_free_blocks == sched.kv.num_blocks
    assert sched.schedule().finished_req_ids == ["r"]  # the worker is told to forget it


def test_max_tokens_cuts_a_multi_token_step() -> None:
    sched = _scheduler()
    req = _request(max_tokens=3)
    sched.add_request(req)
    out = sched.schedule()
    sched.update(out, _result(out, {"r": [10]}))
    req.spec_token_ids = [11, 12, 13]
    out = sched.schedule()
    (output,) = sched.update(out, _result(out, {"r": [11, 12, 13, 14]}))
    assert output.new_token_ids == [11, 12] and output.finish_reason == FinishReason.LENGTH.value
    assert sched.kv.pool.num_free_blocks == sched.kv.num_blocks


def test_the_budget_cuts_into_drafts_not_past_the_known_tokens() -> None:
    sched = _scheduler(budget=3)
    req = _request()
    sched.add_request(req)
    for _ in range(2):  # the prompt in budget-sized chunks: 3 + 3
        out = sched.schedule()
        sched.update(out, _result(out, {"r": [10]} if req.num_computed_tokens + 3 == 6 else {}))
    req.spec_token_ids = [11, 12, 13, 14, 15]
    out = sched.schedule()
    assert out.num_scheduled_tokens == [3] and out.spec_token_ids == {"r": [11, 12]}
    # Nothing accepted: only the known token's KV is valid, the bonus token follows it.
    (output,) = sched.update(out, _result(out, {"r": [30]}))
    assert output.new_token_ids == [30] and req.num_computed_tokens == 7


def test_a_preempted_request_resumes_with_its_whole_new_table() -> None:
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), CacheConfig(block_size=BLOCK), 4, 256)
    a, b = _request("a"), _request("b")
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()  # 2 blocks each: the pool is full
    sched.update(out, _result(out, {"a": [10], "b": [10]}))
    for _ in range(2):
        out = sched.schedule()
        sched.update(out, _result(out, {rid: [11] for rid in out.req_ids}))
    out = sched.schedule()  # position 8 needs a third block: the newest request gives its blocks up
    assert out.preempted_req_ids == ["b"] and out.req_ids == ["a"]
    sched.update(out, _result(out, {"a": [12]}))
    while b.status.value != "running":
        sched.finish(a, FinishReason.ABORT)
        out = sched.schedule()
    assert out.cached.resumed_req_ids == ["b"] and out.cached.new_block_ids["b"] == b.block_ids
    assert out.finished_req_ids == ["a"] and out.new_requests == []
