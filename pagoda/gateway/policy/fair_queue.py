"""Fair shares when a model group's upstreams are saturated: a weighted fair queue per group at the gateway.

A group takes as many requests at once as its healthy upstreams' ``max_concurrency`` add up to; past that,
requests wait here instead of being refused. They leave in order of their key's priority (higher first),
then of their virtual finish time (start-time fair queueing): a tenant's request starts, in virtual time, where
its previous one finished or where the queue is now, whichever is later, and finishes its estimated tokens
divided by the tenant's weight later. A tenant that sends a flood only queues behind itself: another
tenant's request gets the next free slot among the floods' own.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from pagoda.gateway.errors import GatewayError


@dataclass(order=True)
class _Waiter:
    priority: int  # negated: heapq pops the smallest
    finish: float
    seq: int
    start: float = field(compare=False)
    ready: asyncio.Future[None] = field(compare=False)


class FairQueue:
    def __init__(self) -> None:
        self.in_flight = 0
        self.waiting: list[_Waiter] = []
        self.virtual_time = 0.0
        self.last_finish: dict[str, float] = {}
        self._seq = itertools.count()

    @asynccontextmanager
    async def slot(self, capacity: int, tenant: str, weight: float, priority: int, cost: int, max_queued: int,
                   timeout_s: float) -> AsyncIterator[None]:
        """Hold one of the group's ``capacity`` slots while the body runs (waiting fairly for one if needed)."""
        start = max(self.virtual_time, self.last_finish.get(tenant, 0.0))
        finish = self.last_finish[tenant] = start + max(1, cost) / weight
        if self.in_flight < capacity and not self.waiting:
            self.in_flight += 1
            self.virtual_time = start
        else:
            if len(self.waiting) >= max_queued:
                raise GatewayError(503, f"the model's upstreams are saturated and {max_queued} requests already wait",
                                   code="queue_full", headers={"Retry-After": "1"})
            waiter = _Waiter(-priority, finish, next(self._seq), start, asyncio.get_running_loop().create_future())
            heapq.heappush(self.waiting, waiter)
            self._dispatch(capacity)
            try:
                await asyncio.wait_for(asyncio.shield(waiter.ready), timeout_s)
            except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
                if waiter.ready.done():  # handed a slot just as it gave up: give it back
                    self._release(capacity)
                else:
                    waiter.ready.cancel()
                    self.waiting.remove(waiter)
                    heapq.heapify(self.waiting)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise GatewayError(503, f"the model's upstreams stayed saturated for {timeout_s:g} s",
                                   code="queue_timeout", headers={"Retry-After": "1"}) from None
        try:
            yield
        finally:
            self._release(capacity)

    def _release(self, capacity: int) -> None:
        self.in_flight -= 1
        self._dispatch(capacity)

    def _dispatch(self, capacity: int) -> None:
        while self.waiting and self.in_flight < capacity:
            waiter = heapq.heappop(self.waiting)
            if waiter.ready.done():
                continue
            self.in_flight += 1
            self.virtual_time = max(self.virtual_time, waiter.start)
            waiter.ready.set_result(None)
