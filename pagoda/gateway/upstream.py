"""One upstream's live state: its circuit breaker, health, load and counters. The proxy and the health
prober update it; the routing policies read it."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pagoda.gateway.config import BreakerConfig, UpstreamConfig


class BreakerState(enum.Enum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


@dataclass
class CircuitBreaker:
    """closed -> open after ``consecutive_failures``; open -> half-open after ``open_s``; half-open lets
    ``half_open_requests`` trials through at once: a success closes it, a failure opens it again."""

    config: BreakerConfig
    clock: Callable[[], float] = time.monotonic
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    trials: int = 0

    def allows(self) -> bool:
        """Whether a request may be sent now (without taking a trial slot)."""
        if self.state is BreakerState.OPEN and self.clock() - self.opened_at >= self.config.open_s:
            self.state, self.trials = BreakerState.HALF_OPEN, 0
        if self.state is BreakerState.HALF_OPEN:
            return self.trials < self.config.half_open_requests
        return self.state is BreakerState.CLOSED

    def on_send(self) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self.trials += 1

    def on_success(self) -> None:
        self.failures = 0
        if self.state is not BreakerState.CLOSED:
            self.state = BreakerState.CLOSED

    def on_failure(self) -> None:
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.config.consecutive_failures:
            self.state, self.opened_at = BreakerState.OPEN, self.clock()

    def on_abandoned(self) -> None:
        """A trial that ended without a verdict (the client left): give its slot back."""
        if self.state is BreakerState.HALF_OPEN and self.trials > 0:
            self.trials -= 1


@dataclass
class Upstream:
    config: UpstreamConfig
    breaker: CircuitBreaker
    group_key: str
    model: str  # the upstream's own model name, put into forwarded bodies
    healthy: bool = True
    draining: bool = False
    in_flight: int = 0
    probe_failures: int = 0
    probe_successes: int = 0
    # From the replica's /metrics (a pagoda serve or vLLM; zero for servers that export neither): the
    # requests it held beyond this gateway's own at the last scrape (other clients' work), and its KV usage.
    external_load: float = 0.0
    kv_usage: float = 0.0
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.config.base_url

    @property
    def weight(self) -> float:
        return self.config.weight

    def available(self) -> bool:
        """May take a new request: healthy, not draining, under its concurrency limit, breaker permitting."""
        return (self.healthy and not self.draining and self.in_flight < self.config.max_concurrency
                and self.breaker.allows())

    def load(self) -> float:
        """Outstanding requests per unit of weight: in flight at this gateway (live) plus other clients' (scraped).
        A scrape also counts this gateway's own requests; adding it whole would count them twice, and for a
        whole probe interval, so that every request herds to whichever replica looked idlest at the scrape."""
        return (self.in_flight + self.external_load) / self.weight

    def observe_replica(self, requests: float, kv_usage: float) -> None:
        self.external_load = max(0.0, requests - self.in_flight)
        self.kv_usage = kv_usage

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
