"""Serving-benchmark statistics on synthetic timings, and the workload generators."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pagoda.bench import workloads
from pagoda.bench.serve import LoadShape, format_table
from pagoda.bench.stats import Distribution, RequestRecord, summarize, throughput_timeline


def _record(start: float, chunks: list[float], end: float, tokens: int, prompt: int = 10,
            status: str = "200") -> RequestRecord:
    return RequestRecord(prompt_tokens=prompt, start=start, status=status, chunk_times=chunks, end=end,
                         output_tokens=tokens)


def test_per_request_definitions() -> None:
    r = _record(start=1.0, chunks=[1.5, 1.6, 1.8, 2.1], end=2.2, tokens=4)
    assert r.ttft == pytest.approx(0.5)
    assert r.e2e == pytest.approx(1.2)
    # vLLM: TPOT = (e2e - ttft) / (output tokens - 1), which includes the tail after the last chunk.
    assert r.tpot == pytest.approx((1.2 - 0.5) / 3)
    assert r.itls == pytest.approx([0.1, 0.2, 0.3])


def test_tpot_uses_tokens_not_chunks() -> None:
    # A server that packs two tokens per chunk: 3 chunks, 6 tokens.
    r = _record(start=0.0, chunks=[1.0, 2.0, 3.0], end=3.0, tokens=6)
    assert r.tpot == pytest.approx(2.0 / 5)
    assert r.itls == pytest.approx([1.0, 1.0])


def test_single_token_and_no_output_have_no_tpot() -> None:
    assert _record(0.0, [0.3], 0.4, tokens=1).tpot is None
    empty = _record(0.0, [], 0.4, tokens=0)
    assert empty.ttft is None and empty.tpot is None and empty.itls == []


def test_percentiles_interpolate_linearly() -> None:
    dist = Distribution.of([1.0, 2.0, 3.0, 4.0, 10.0])
    assert dist is not None
    assert dist.p50 == 3.0
    assert dist.p90 == pytest.approx(4.0 + 0.6 * 6.0)  # rank 3.6 between 4 and 10
    assert dist.p99 == pytest.approx(4.0 + 0.96 * 6.0)
    assert dist.mean == 4.0 and dist.min == 1.0 and dist.max == 10.0 and dist.count == 5
    assert Distribution.of([]) is None
    one = Distribution.of([7.0])
    assert one is not None and one.p50 == one.p99 == 7.0


def test_summary_counts_only_successes_in_latency_and_throughput() -> None:
    records = [
        _record(0.0, [0.2, 0.3, 0.4], 0.5, tokens=3, prompt=100),
        _record(0.1, [0.5, 0.7], 0.9, tokens=2, prompt=50),
        _record(0.2, [], 0.25, tokens=0, status="429"),
        RequestRecord(prompt_tokens=10, start=0.3, status="error:ConnectError", end=0.3, error="refused"),
        RequestRecord(prompt_tokens=10, start=0.3, status="200", chunk_times=[0.4], end=0.5, output_tokens=1,
                      error='{"message": "engine died"}'),
    ]
    s = summarize(records, duration_s=2.0)
    assert (s.completed, s.failed) == (2, 3)
    assert s.status_counts == {"200": 2, "200-broken-stream": 1, "429": 1, "error:ConnectError": 1}
    assert s.output_tokens == 5 and s.prompt_tokens == 150
    assert s.request_throughput == 1.0 and s.output_throughput == 2.5 and s.total_token_throughput == 77.5
    assert s.ttft_ms is not None and s.ttft_ms["mean"] == pytest.approx(300.0)  # (200 + 400) / 2
    assert s.itl_ms is not None and s.itl_ms["count"] == 3  # 2 gaps + 1 gap, pooled
    assert s.tpot_ms is not None and s.tpot_ms["p50"] == pytest.approx((150.0 + 400.0) / 2)
    assert s.e2e_ms is not None and s.e2e_ms["max"] == pytest.approx(800.0)
    table = format_table(s)
    assert "TTFT" in table and "429: 1" in table
    with pytest.raises(ValueError, match="duration_s"):
        summarize(records, 0.0)


def test_throughput_timeline_spreads_tokens_over_chunks() -> None:
    records = [_record(10.0, [10.2, 11.5], 11.6, tokens=4), _record(10.0, [12.1], 12.2, tokens=1),
               _record(10.0, [10.5], 10.6, tokens=9, status="503")]
    assert throughput_timeline(records, origin=10.0) == [(0.0, 2.0), (1.0, 2.0), (2.0, 1.0)]
    assert throughput_timeline([], origin=0.0) == []


def test_random_requests_are_seeded_and_in_range() -> None:
    a = workloads.random_requests(20, (5, 9), (3, 4), seed=7)
    b = workloads.random_requests(20, (5, 9), (3, 4), seed=7)
    assert a == b
    assert all(5 <= len(r.prompt) <= 9 and r.prompt_tokens == len(r.prompt) for r in a)  # type: ignore[arg-type]
    assert all(3 <= r.max_tokens <= 4 for r in a)
    assert all(100 <= t <= 49000 for r in a for t in r.prompt)  # type: ignore[union-attr]
    assert workloads.random_requests(20, (5, 9), (3, 4), seed=8) != a
    with pytest.raises(ValueError, match="input_len"):
        workloads.random_requests(2, (9, 5), (3, 4))


def test_shared_prefix_requests_share_their_prefixes() -> None:
    reqs = workloads.shared_prefix_requests(40, num_prefixes=3, prefix_len=16, suffix_len=(2, 5),
                                            output_len=(1, 2), seed=1)
    prefixes = {tuple(r.prompt[:16]) for r in reqs}  # type: ignore[index]
    assert len(prefixes) == 3
    assert all(18 <= len(r.prompt) <= 21 for r in reqs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_prefixes"):
        workloads.shared_prefix_requests(2, 0, 16, (2, 5), (1, 2))


def test_jsonl_requests(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Hi"}) + "\n\n"
                    + json.dumps({"messages": [{"role": "user", "content": "你好"}], "max_tokens": 5}) + "\n")
    reqs = workloads.jsonl_requests(path, default_max_tokens=9)
    assert [(r.prompt, r.max_tokens) for r in reqs] == [("Hi", 9), (None, 5)]
    assert reqs[1].messages == [{"role": "user", "content": "你好"}]
    path.write_text('{"prompt": "a", "messages": []}\n')
    with pytest.raises(ValueError, match="exactly one"):
        workloads.jsonl_requests(path, 9)
    path.write_text('{"prompt": "a", "max_tokens": 0}\n')
    with pytest.raises(ValueError, match="max_tokens"):
        workloads.jsonl_requests(path, 9)
    path.write_text("not json\n")
    with pytest.raises(ValueError, match=":1: not JSON"):
        workloads.jsonl_requests(path, 9)


@pytest.mark.parametrize("kwargs, match", [
    ({"concurrency": None, "request_rate": None}, "exactly one"),
    ({"concurrency": 2, "request_rate": 1.0}, "exactly one"),
    ({"concurrency": 0, "request_rate": None}, "concurrency"),
    ({"concurrency": None, "request_rate": -1.0}, "request_rate"),
    ({"concurrency": 1, "request_rate": None, "num_prompts": 0}, "num_prompts"),
    ({"concurrency": 1, "request_rate": None, "max_duration_s": 0.0}, "max_duration"),
])
def test_load_shape_validation(kwargs: dict, match: str) -> None:
    base = {"num_prompts": 5, "max_duration_s": None, "warmup": 0, "seed": 0}
    with pytest.raises(ValueError, match=match):
        LoadShape(**{**base, **kwargs})
