"""Where keys, rate-limit windows and usage sums live: in this process (``MemoryStore``, one gateway), or in
Redis (``redis_store.RedisStore``, several gateways, each admission one atomic Lua call, so the limits hold
across processes).

Limits are sliding windows over the last minute, kept as logs: a scope (a key, a tenant) remembers when each
admitted request came and how many tokens it was charged, so "N requests a minute" admits exactly N in any
60 seconds, however the requests bunch up, and a request's estimated tokens can later be corrected to what it
used. Requests in flight are leases that expire on their own, so a gateway that dies does not hold its slots.
Both stores run the same decision (``_decide`` here, the Lua script in redis_store.py) on the same numbers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pagoda.gateway.policy.keys import KeyRecord, Limits
from pagoda.gateway.policy.records import HOUR_S, Totals, UsageRecord, aggregate, day_of, month_of

WINDOW_S = 60.0
KIND_REQUESTS, KIND_TOKENS, KIND_CONCURRENCY = "requests", "tokens", "concurrency"


class StoreUnavailable(Exception):
    """The store could not be reached (Redis down): the guard applies the configured failure mode."""


@dataclass(frozen=True)
class Scope:
    name: str  # "key:<key id>" or "tenant:<name>"
    limits: Limits


@dataclass
class ScopeState:
    """A scope's window after the admission (counting the request when it was admitted)."""

    requests: int
    tokens: int
    in_flight: int
    requests_reset_s: float  # until the oldest counted request leaves the window
    tokens_reset_s: float  # until the oldest counted tokens leave it


@dataclass(frozen=True)
class Ended:
    """A request that ended, to settle in its scopes: its charge corrected to the tokens it used (None: unknown,
    the estimate stands) and its lease ended."""

    request_id: str
    scopes: list[Scope]
    charged: int
    tokens: int | None


@dataclass
class Verdict:
    allowed: bool
    states: list[ScopeState]
    denied_scope: int | None = None  # which scope refused (index into the scopes asked)
    denied_kind: str | None = None
    retry_after_s: float = 0.0


def _decide(limits: Limits, requests: int, tokens: int, in_flight: int, cost: int) -> str | None:
    """The kind of limit one more request of ``cost`` tokens would break, or None."""
    if limits.rpm is not None and requests + 1 > limits.rpm:
        return KIND_REQUESTS
    if limits.tpm is not None and tokens + cost > limits.tpm:
        return KIND_TOKENS
    if limits.max_concurrency is not None and in_flight + 1 > limits.max_concurrency:
        return KIND_CONCURRENCY
    return None


def _retry_after(kind: str, limits: Limits, entries: list[tuple[float, int]], tokens: int, cost: int,
                 now: float) -> float:
    """Seconds until the window would take the request: the oldest entries that must leave first."""
    if kind == KIND_REQUESTS and limits.rpm is not None:
        return max(0.0, entries[len(entries) - limits.rpm][0] + WINDOW_S - now)
    if kind == KIND_TOKENS and limits.tpm is not None:
        if cost > limits.tpm:
            return WINDOW_S  # never fits: the client must ask for fewer tokens
        need, freed = tokens + cost - limits.tpm, 0
        for at, spent in entries:
            freed += spent
            if freed >= need:
                return max(0.0, at + WINDOW_S - now)
    return 1.0  # concurrency: until a request in flight ends


class Store(Protocol):
    async def save_key(self, record: KeyRecord) -> None: ...
    async def key_for(self, digest: str) -> KeyRecord | None: ...
    async def key_by_id(self, key_id: str) -> KeyRecord | None: ...
    async def keys(self) -> list[KeyRecord]: ...
    def admit_here(self, request_id: str, scopes: list[Scope], cost: int, now: float, lease_s: float) -> Verdict | None:
        """The decision where it needs no round trip (this process's windows, a window share), else None:
        then ``admit`` decides."""
        ...

    async def admit(self, request_id: str, scopes: list[Scope], cost: int, now: float, lease_s: float) -> Verdict:
        """Admit the request or not, atomically over all scopes (what waits to be settled settled first)."""
        ...

    def settle(self, ended: Sequence[Ended]) -> None:
        """Requests that ended, settled now or with the store's next call (each charge corrected to the tokens
        used, each lease ended)."""
        ...

    async def finish(self, ended: Sequence[Ended]) -> None:
        """Settle ``ended`` and what waits to be settled, now."""
        ...

    async def add_usage(self, records: list[UsageRecord]) -> None: ...
    async def usage(self, group_by: str, start: float, end: float) -> dict[str, Totals]: ...
    async def spent(self, scopes: list[str], now: float) -> list[tuple[Totals, Totals]]: ...
    async def close(self) -> None: ...


def hour_buckets(start: float, end: float) -> range:
    """The hour buckets a time range touches (usage is kept per hour)."""
    return range(int(start // HOUR_S), int(-(-end // HOUR_S)))


def budget_periods(now: float) -> tuple[str, str]:
    return "d" + day_of(now), "m" + month_of(now)


@dataclass
class _Window:
    entries: deque[tuple[float, str]] = field(default_factory=deque)  # (arrival, request id), oldest first
    costs: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    leases: dict[str, float] = field(default_factory=dict)  # request id -> when its lease ends

    def expire(self, now: float) -> None:
        while self.entries and self.entries[0][0] <= now - WINDOW_S:
            _, rid = self.entries.popleft()
            self.tokens -= self.costs.pop(rid, 0)
        for rid in [r for r, until in self.leases.items() if until <= now]:
            del self.leases[rid]

    def state(self, now: float) -> ScopeState:
        oldest = self.entries[0][0] + WINDOW_S - now if self.entries else 0.0
        return ScopeState(len(self.entries), self.tokens, len(self.leases), oldest, oldest)


class MemoryStore:
    """One gateway's store: the same semantics as Redis's, in dicts (no await ever yields, so each call is
    atomic on the event loop)."""

    def __init__(self) -> None:
        self.records: dict[str, KeyRecord] = {}  # by digest
        self.windows: dict[str, _Window] = {}
        self.hourly: dict[tuple[int, str, str], Totals] = {}
        self.spend: dict[tuple[str, str], Totals] = {}

    async def save_key(self, record: KeyRecord) -> None:
        self.records[record.digest] = record

    async def key_for(self, digest: str) -> KeyRecord | None:
        return self.records.get(digest)

    async def key_by_id(self, key_id: str) -> KeyRecord | None:
        return next((r for r in self.records.values() if r.key_id == key_id), None)

    async def keys(self) -> list[KeyRecord]:
        return sorted(self.records.values(), key=lambda r: r.created)

    async def admit(self, request_id: str, scopes: list[Scope], cost: int, now: float, lease_s: float) -> Verdict:
        return self.admit_here(request_id, scopes, cost, now, lease_s)

    def admit_here(self, request_id: str, scopes: list[Scope], cost: int, now: float, lease_s: float) -> Verdict:
        windows = [self.windows.setdefault(s.name, _Window()) for s in scopes]
        for w in windows:
            w.expire(now)
        for i, (scope, w) in enumerate(zip(scopes, windows)):
            kind = _decide(scope.limits, len(w.entries), w.tokens, len(w.leases), cost)
            if kind is not None:
                entries = [(at, w.costs.get(rid, 0)) for at, rid in w.entries]
                return Verdict(False, [x.state(now) for x in windows], i, kind,
                               _retry_after(kind, scope.limits, entries, w.tokens, cost, now))
        for scope, w in zip(scopes, windows):
            if scope.limits.rpm is not None or scope.limits.tpm is not None:
                w.entries.append((now, request_id))
                w.costs[request_id] = cost
                w.tokens += cost
            if scope.limits.max_concurrency is not None:
                w.leases[request_id] = now + lease_s
        return Verdict(True, [w.state(now) for w in windows])

    async def finish(self, ended: Sequence[Ended]) -> None:
        self.settle(ended)

    def settle(self, ended: Sequence[Ended]) -> None:
        for e in ended:
            for scope in e.scopes:
                w = self.windows.get(scope.name)
                if w is None:
                    continue
                if e.tokens is not None and e.request_id in w.costs:
                    w.tokens += e.tokens - w.costs[e.request_id]
                    w.costs[e.request_id] = e.tokens
                w.leases.pop(e.request_id, None)

    async def add_usage(self, records: list[UsageRecord]) -> None:
        hourly, spend = aggregate(records)
        for table, sums in ((self.hourly, hourly), (self.spend, spend)):
            for k, t in sums.items():
                table.setdefault(k, Totals()).merge(t)  # type: ignore[arg-type]

    async def usage(self, group_by: str, start: float, end: float) -> dict[str, Totals]:
        hours = hour_buckets(start, end)
        out: dict[str, Totals] = {}
        for (hour, dim, value), t in self.hourly.items():
            if dim == group_by and hour in hours:
                out.setdefault(value, Totals()).merge(t)
        return out

    async def spent(self, scopes: list[str], now: float) -> list[tuple[Totals, Totals]]:
        day, month = budget_periods(now)
        return [(self.spend.get((day, s), Totals()), self.spend.get((month, s), Totals())) for s in scopes]

    async def close(self) -> None:
        return None
