"""Client-side latency statistics for serving benchmarks, defined as vLLM's benchmark_serving defines them.

- TTFT: request sent -> first chunk that carries output.
- E2E latency: request sent -> last byte of the response.
- TPOT (time per output token): per request, (e2e - ttft) / (output_tokens - 1); only requests with more
  than one output token have one. The reported TPOT statistics are over requests.
- ITL (inter-token latency): every gap between consecutive output-carrying chunks of every request,
  pooled over requests (a chunk that carries several tokens is still one gap).
Percentiles interpolate linearly between order statistics (numpy's default).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """One request as the client saw it; times are seconds on one monotonic clock."""

    prompt_tokens: int
    start: float
    status: str = ""  # HTTP status as text, or "error:<exception name>" when no response came
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk that carried output
    end: float = 0.0
    output_tokens: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "200" and not self.error

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        ttft = self.ttft
        if ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


@dataclass
class Distribution:
    count: int
    mean: float
    std: float
    min: float
    max: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: list[float]) -> Distribution | None:
        if not values:
            return None
        array = np.asarray(values, dtype=np.float64)
        p50, p90, p99 = (float(np.percentile(array, q)) for q in PERCENTILES)
        return cls(len(values), float(array.mean()), float(array.std()), float(array.min()), float(array.max()),
                   p50, p90, p99)

    def scaled(self, factor: float) -> dict[str, float]:
        """The statistics times ``factor`` (seconds -> milliseconds), rounded for reports."""
        return {k: (v if k == "count" else round(v * factor, 3)) for k, v in asdict(self).items()}


@dataclass
class ServeSummary:
    duration_s: float
    completed: int
    failed: int
    status_counts: dict[str, int]
    prompt_tokens: int
    output_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (prompt + output) tokens / s of completed requests
    ttft_ms: dict[str, float] | None
    tpot_ms: dict[str, float] | None
    itl_ms: dict[str, float] | None
    e2e_ms: dict[str, float] | None


def _ms(dist: Distribution | None) -> dict[str, float] | None:
    return dist.scaled(1e3) if dist is not None else None


def summarize(records: list[RequestRecord], duration_s: float) -> ServeSummary:
    """Aggregate the measured requests of one run; ``duration_s`` is the wall time of the measured phase."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    done = [r for r in records if r.ok]
    status_counts: dict[str, int] = {}
    for r in records:
        key = r.status if not r.error or r.status != "200" else "200-broken-stream"
        status_counts[key] = status_counts.get(key, 0) + 1
    prompt = sum(r.prompt_tokens for r in done)
    output = sum(r.output_tokens for r in done)
    return ServeSummary(
        duration_s=round(duration_s, 3),
        completed=len(done),
        failed=len(records) - len(done),
        status_counts=dict(sorted(status_counts.items())),
        prompt_tokens=prompt,
        output_tokens=output,
        request_throughput=round(len(done) / duration_s, 3),
        output_throughput=round(output / duration_s, 2),
        total_token_throughput=round((prompt + output) / duration_s, 2),
        ttft_ms=_ms(Distribution.of([t for r in done if (t := r.ttft) is not None])),
        tpot_ms=_ms(Distribution.of([t for r in done if (t := r.tpot) is not None])),
        itl_ms=_ms(Distribution.of([gap for r in done for gap in r.itls])),
        e2e_ms=_ms(Distribution.of([r.e2e for r in done])),
    )


def throughput_timeline(records: list[RequestRecord], origin: float, bin_s: float = 1.0) -> list[tuple[float, float]]:
    """Output tokens per second in bins of ``bin_s`` from ``origin``: each request's tokens are spread evenly
    over its output chunks (a server may pack several tokens in one chunk)."""
    events: list[tuple[float, float]] = []
    for r in records:
        if r.ok and r.chunk_times:
            weight = r.output_tokens / len(r.chunk_times)
            events.extend((t - origin, weight) for t in r.chunk_times)
    if not events:
        return []
    bins = int(max(t for t, _ in events) // bin_s) + 1
    totals = [0.0] * bins
    for t, weight in events:
        totals[max(0, int(t // bin_s))] += weight
    return [(round(i * bin_s, 3), total / bin_s) for i, total in enumerate(totals)]
