"""What each request used and cost: a record per request, kept in a buffer and flushed to the store, which
adds them up per hour (by key, tenant and model, for ``/admin/usage``) and per day and month (by key and
tenant, for budgets). A record the store cannot take (Redis down) stays in the buffer until it can.

Cost comes from a price table per model group: per million input and output tokens (a cloud model), or per
replica-hour for local replicas, spread over the tokens the group served in the last hour.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pagoda.gateway.config import PriceConfig
from pagoda.gateway.policy.records import HOUR_S, Totals, UsageRecord
from pagoda.gateway.policy.store import Store, StoreUnavailable

logger = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0
MAX_BUFFERED = 1_000_000  # records held while the store is away (about a minute at 500 req/s is 30,000)


class CostModel:
    """Dollars per request from the price table. A replica-hour price spreads the group's replicas' hourly
    cost over the tokens they served in the last hour (minute buckets), so an idle hour's cost falls on
    its few tokens."""

    def __init__(self, prices: Callable[[], dict[str, PriceConfig]]) -> None:
        self.prices = prices
        self.served: dict[str, deque[tuple[int, int]]] = {}  # group -> (minute, tokens), oldest first
        self.first_seen: dict[str, float] = {}

    def cost(self, group: str, prompt_tokens: int, completion_tokens: int, replicas: int, now: float) -> float:
        price = self.prices().get(group)
        if price is None:
            return 0.0
        total = (prompt_tokens * price.input_per_million + completion_tokens * price.output_per_million) / 1e6
        if price.replica_hour:
            tokens = prompt_tokens + completion_tokens
            served = self.served.setdefault(group, deque())
            minute = int(now // 60)
            if served and served[-1][0] == minute:
                served[-1] = (minute, served[-1][1] + tokens)
            else:
                served.append((minute, tokens))
            while served and served[0][0] <= minute - 60:
                served.popleft()
            hours = min(1.0, (now - self.first_seen.setdefault(group, now)) / HOUR_S)
            in_window = sum(t for _, t in served)
            total += tokens * price.replica_hour * replicas * hours / max(in_window, 1)
        return total


@dataclass
class UsageLedger:
    """The gateway's buffer of records, flushed to the store about every second."""

    store: Store
    buffer: list[UsageRecord] = field(default_factory=list)
    dropped: int = 0
    _task: asyncio.Task[None] | None = None
    _flushing: asyncio.Lock = field(default_factory=asyncio.Lock)

    def add(self, record: UsageRecord) -> None:
        self.buffer.append(record)
        if len(self.buffer) > MAX_BUFFERED:
            self.dropped += len(self.buffer) - MAX_BUFFERED
            del self.buffer[: len(self.buffer) - MAX_BUFFERED]
            logger.error("usage buffer full while the store is away: %d records dropped so far", self.dropped)

    async def flush(self) -> bool:
        """Hand the buffer to the store; on failure keep it (with what came meanwhile) for the next try. One
        flush at a time: a reader of the usage (``/admin/usage``) waits for the batch already on its way."""
        async with self._flushing:
            if not self.buffer:
                return True
            batch, self.buffer = self.buffer, []
            try:
                await self.store.add_usage(batch)
                return True
            except StoreUnavailable as exc:
                self.buffer = batch + self.buffer
                logger.warning("usage not flushed, %d records kept: %s", len(self.buffer), exc)
                return False

    def start(self) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(FLUSH_INTERVAL_S)
                await self.flush()
        self._task = asyncio.create_task(loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        await self.flush()


def usage_rows(totals: dict[str, Totals]) -> list[dict[str, object]]:
    return [{"group": value, "requests": t.requests, "prompt_tokens": t.prompt_tokens,
             "completion_tokens": t.completion_tokens, "cost": round(t.cost, 6)}
            for value, t in sorted(totals.items(), key=lambda kv: (-kv[1].cost, -kv[1].requests, kv[0]))]
