"""A request's usage record, and the sums the stores keep of them: per hour by key, tenant and model (the
usage table), per UTC day and month by key and tenant (budgets)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

GROUP_BY = ("key", "tenant", "model")
HOUR_S = 3600


@dataclass
class UsageRecord:
    ts: float
    request_id: str
    key_id: str
    tenant: str
    model: str
    upstream: str
    prompt_tokens: int
    completion_tokens: int
    cost: float
    latency_ms: float
    status: int


@dataclass
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0

    def add(self, record: UsageRecord) -> None:
        self.requests += 1
        self.prompt_tokens += record.prompt_tokens
        self.completion_tokens += record.completion_tokens
        self.cost += record.cost

    def merge(self, other: Totals) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cost += other.cost

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def day_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y%m%d")


def month_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y%m")


def aggregate(records: list[UsageRecord]) -> tuple[dict[tuple[int, str, str], Totals], dict[tuple[str, str], Totals]]:
    """(hour, dimension, value) -> totals for the usage table, and (period, scope) -> totals for budgets,
    where a period is "d<YYYYMMDD>" or "m<YYYYMM>" and a scope "key:<id>" or "tenant:<name>"."""
    hourly: dict[tuple[int, str, str], Totals] = {}
    spend: dict[tuple[str, str], Totals] = {}
    for r in records:
        hour = int(r.ts // HOUR_S)
        for dim, value in (("key", r.key_id), ("tenant", r.tenant), ("model", r.model)):
            hourly.setdefault((hour, dim, value), Totals()).add(r)
        for period in ("d" + day_of(r.ts), "m" + month_of(r.ts)):
            for scope in (f"key:{r.key_id}", f"tenant:{r.tenant}"):
                spend.setdefault((period, scope), Totals()).add(r)
    return hourly, spend
