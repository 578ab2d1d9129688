"""Window shares (pagoda.gateway.policy.shares): a gateway reserves room for a busy key's next requests in one
Redis call and admits them without a round trip; Redis counts the reservation from the start, gives the unused
part back when the share closes, and the limits stay exact across gateways."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pagoda.gateway.policy.keys import Limits
from pagoda.gateway.policy.local_redis import LocalRedis
from pagoda.gateway.policy.redis_store import FLUSH_AFTER_S, RedisStore
from pagoda.gateway.policy.shares import MIN_DEMAND, MIN_REQUESTS, SHARE_S, Share, ShareAsk, ShareBook
from pagoda.gateway.policy.store import Ended, Scope, ScopeState, StoreUnavailable
from tests.gateway.conftest import Gateway, responder

LEASE_S = 30.0


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    with LocalRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server


async def _busy(store: RedisStore, scopes: list[Scope], cost: int, prefix: str) -> None:
    """Enough admissions through Redis for the key to be worth a share, and the share's grant awaited."""
    for i in range(MIN_DEMAND):
        assert (await store.admit(f"{prefix}-{i}", scopes, cost, time.time(), LEASE_S)).allowed
    await asyncio.gather(*store._background)


PROBES: dict[str, int] = {}


async def _window(store: RedisStore, scope: Scope) -> ScopeState:
    """The scope's window as Redis holds it, less the probes that read it (each a request of no tokens, its
    lease ended at once)."""
    PROBES[scope.name] = PROBES.get(scope.name, 0) + 1
    probe = f"probe-{PROBES[scope.name]}"
    verdict = await store.admit(probe, [scope], 0, time.time(), LEASE_S)
    if not verdict.allowed:  # a full window: not counted
        PROBES[scope.name] -= 1
    await store.finish([Ended(probe, [scope], 0, None)])
    state = verdict.states[0]
    return ScopeState(state.requests - PROBES[scope.name], state.tokens, state.in_flight - verdict.allowed, 0.0, 0.0)


def test_a_share_is_counted_in_redis_from_its_grant_and_its_unused_part_given_back(redis_server: LocalRedis) -> None:
    key = Scope("key:shared", Limits(rpm=10_000, tpm=10_000_000, max_concurrency=1_000))

    async def scenario() -> None:
        here, other = RedisStore(redis_server.url, "give-back"), RedisStore(redis_server.url, "give-back")
        try:
            await _busy(here, [key], 100, "warm")
            for i in range(MIN_DEMAND):
                await here.finish([Ended(f"warm-{i}", [key], 100, None)])
            share = here.shares.open[(key.name,)]
            reserved = share.ask
            assert reserved.requests >= MIN_REQUESTS and reserved.tokens == 100 * reserved.requests
            assert (await _window(other, key)) == ScopeState(MIN_DEMAND + reserved.requests,
                                                             100 * (MIN_DEMAND + reserved.requests),
                                                             reserved.concurrency, 0.0, 0.0)
            verdicts = [here.admit_here(f"local-{i}", [key], 100, time.time(), LEASE_S) for i in range(4)]
            assert all(v is not None and v.allowed for v in verdicts)
            assert verdicts[-1] is not None and verdicts[-1].states[0].requests == MIN_DEMAND + 4  # the headers' view
            assert reserved.concurrency == 4  # and all four are in flight: the next one asks Redis
            assert here.admit_here("local-4", [key], 100, time.time(), LEASE_S) is None
            await here.finish([Ended(f"local-{i}", [key], 100, 40) for i in range(2)])  # used less than charged
            here.shares.close(share)
            await here.finish([])
            # Closed: its 4 used slots stay, the rest left; slot 1 carries 2 x 40 + 2 x 100; the concurrency
            # slots of the 2 requests in flight stay.
            assert (await _window(other, key)) == ScopeState(MIN_DEMAND + 4, 100 * MIN_DEMAND + 280, 2, 0.0, 0.0)
            await here.finish([Ended("local-2", [key], 100, 10)])
            assert (await _window(other, key)).in_flight == 1
            await here.finish([Ended("local-3", [key], 100, 10)])
            assert (await _window(other, key)) == ScopeState(MIN_DEMAND + 4, 100 * MIN_DEMAND + 100, 0, 0.0, 0.0)
        finally:
            await here.close()
            await other.close()

    asyncio.run(scenario())


def test_a_share_closed_and_ended_in_one_call_is_settled_in_order(redis_server: LocalRedis) -> None:
    """Its closing and its last request's correction reach Redis in the same script call."""
    key = Scope("key:once", Limits(tpm=10_000_000))

    async def scenario() -> ScopeState:
        here, other = RedisStore(redis_server.url, "once"), RedisStore(redis_server.url, "once")
        try:
            await _busy(here, [key], 100, "warm")
            share = here.shares.open[(key.name,)]
            assert here.admit_here("local", [key], 100, time.time(), LEASE_S) is not None
            here.shares.close(share)
            await here.finish([Ended("local", [key], 100, 7)])
            return await _window(other, key)
        finally:
            await here.close()
            await other.close()

    assert asyncio.run(scenario()).tokens == 100 * MIN_DEMAND + 7


def test_shares_are_declined_near_a_limit_and_for_small_limits(redis_server: LocalRedis) -> None:
    async def scenario(limits: Limits, before: int) -> tuple[ShareBook, int]:
        prefix = f"decline-{time.monotonic_ns()}"
        store, other = RedisStore(redis_server.url, prefix), RedisStore(redis_server.url, prefix)
        scope = Scope("key:k", limits)
        try:
            for i in range(before):  # another gateway's
                await other.admit(f"pre-{i}", [scope], 1, time.time(), LEASE_S)
            await _busy(store, [scope], 1, "busy")
            return store.shares, len(store.shares.open)
        finally:
            await store.close()
            await other.close()

    assert asyncio.run(scenario(Limits(rpm=10_000), 0))[1] == 1
    assert asyncio.run(scenario(Limits(rpm=200), 0))[1] == 0  # 16 requests would be 8% of the limit
    assert asyncio.run(scenario(Limits(tpm=300), 0))[1] == 0  # 16 requests' tokens would be 5%
    assert asyncio.run(scenario(Limits(rpm=1_000), 730))[1] == 0  # over 75% of the window would be held
    assert asyncio.run(scenario(Limits(rpm=10_000, max_concurrency=10), 0))[1] == 0  # not one slot is 5% of 10
    book, _ = asyncio.run(scenario(Limits(rpm=200), 0))
    assert book.declined_until  # not asked again within SHARE_S


def test_two_gateways_with_shares_admit_exactly_the_limit(redis_server: LocalRedis) -> None:
    """Two stores (as two gateways) take turns with 10 x the limit; shares decide many of the admissions, and
    exactly the limit is admitted; once the shares closed Redis counts exactly what was admitted."""
    limit = 400
    scope = Scope("tenant:burst", Limits(rpm=limit))

    async def scenario() -> tuple[int, int, int]:
        stores = [RedisStore(redis_server.url, "exact-shares") for _ in range(2)]
        allowed = here = 0
        try:
            for i in range(10 * limit):
                store = stores[i % 2]
                verdict = store.admit_here(f"r{i}", [scope], 1, time.time(), LEASE_S)
                here += verdict is not None
                if verdict is None:
                    verdict = await store.admit(f"r{i}", [scope], 1, time.time(), LEASE_S)
                allowed += verdict.allowed
                await asyncio.sleep(0)  # the shares' grants come in
            await asyncio.sleep(SHARE_S + 0.2)  # the shares' ends: their unused slots given back
            counted = (await _window(stores[0], scope)).requests
        finally:
            for store in stores:
                await store.close()
        return allowed, here, counted

    allowed, here, counted = asyncio.run(scenario())
    assert allowed == limit and counted == limit
    assert here >= MIN_REQUESTS  # shares did decide


def test_a_busy_key_is_admitted_from_shares_at_the_gateway(tmp_path: Path, redis_server: LocalRedis) -> None:
    upstream, process = responder(tmp_path, "echo", "--model", "echo")
    gateway = Gateway(tmp_path, {"models": [{"name": "echo", "upstreams": [{"url": upstream, "model": "echo"}]}],
                                 "policy": {"require_keys": True, "redis_url": redis_server.url,
                                            "redis_prefix": "gw-shares"}})
    try:
        key = gateway.admin("POST", "/admin/keys", json={"tenant": "t", "rpm": 100_000}).json()["key"]
        remaining = []
        with httpx.Client(timeout=10) as client:
            for _ in range(3 * MIN_REQUESTS):
                answer = client.post(f"{gateway.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                     json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]})
                assert answer.status_code == 200
                remaining.append(int(answer.headers["x-ratelimit-remaining-requests"]))
        metrics = gateway.admin("GET", "/metrics").text
    finally:
        gateway.stop()
        process.terminate()
        process.wait(10)
    assert 'pagoda_gateway_window_shares_total{outcome="granted"}' in metrics
    here = next(line for line in metrics.splitlines() if line.startswith('pagoda_gateway_admissions_total{where="here"}'))
    assert float(here.split()[-1]) >= MIN_REQUESTS // 2
    assert remaining == list(range(99_999, 99_999 - 3 * MIN_REQUESTS, -1))  # what was used, not what is reserved


def test_a_share_is_sized_by_recent_demand_and_its_limits() -> None:
    book = ShareBook()
    scopes = [Scope("key:k", Limits(rpm=100_000, max_concurrency=1_000))]
    ask = None
    for i in range(MIN_DEMAND):
        ask = book.note(scopes, 10, 100.0 + i / 100)
    assert ask is not None and (ask.requests, ask.tokens, ask.concurrency) == (MIN_REQUESTS, 10 * MIN_REQUESTS, 4)
    demand = book.demand[("key:k",)]
    demand.in_flight(20, 100.5)
    assert demand.ask(scopes) == ShareAsk(MIN_REQUESTS, 10 * MIN_REQUESTS, 40)
    demand.in_flight(1, 101.5)  # the next second: the last one's peak still counts
    assert demand.ask(scopes) is not None and demand.ask(scopes).concurrency == 40  # type: ignore[union-attr]
    demand.in_flight(1, 102.5)  # two seconds on: forgotten
    assert demand.ask(scopes) is not None and demand.ask(scopes).concurrency == 4  # type: ignore[union-attr]
    small = [Scope("key:k", Limits(rpm=100_000, max_concurrency=200))]
    demand.in_flight(100, 102.6)
    assert demand.ask(small) is not None and demand.ask(small).concurrency == 10  # type: ignore[union-attr]


def test_requests_ended_while_shares_admit_are_settled_within_moments(redis_server: LocalRedis) -> None:
    """A request admitted through Redis ends while the key's later requests are admitted from a share (no script
    call to ride on): its lease still reaches Redis within FLUSH_AFTER_S."""
    key = Scope("key:flush", Limits(rpm=100_000, max_concurrency=1_000))

    async def scenario() -> tuple[int, int]:
        here, other = RedisStore(redis_server.url, "flush"), RedisStore(redis_server.url, "flush")
        try:
            await _busy(here, [key], 1, "warm")
            before = (await _window(other, key)).in_flight
            here.settle([Ended("warm-0", [key], 1, None)])
            assert here.admit_here("local", [key], 1, time.time(), LEASE_S) is not None
            await asyncio.sleep(FLUSH_AFTER_S * 4)
            return before, (await _window(other, key)).in_flight
        finally:
            await here.close()
            await other.close()

    before, after = asyncio.run(scenario())
    assert after == before - 1  # warm-0's lease ended; the share's slots unchanged


def test_a_renewal_counts_what_the_share_before_it_used_even_if_it_closed_meanwhile() -> None:
    """The grant's numbers hold the previous share's whole reservation when its call left; the headers of the
    new share's requests count only what the previous one used, whether it closed before the grant came back
    (its end, on the timer) or at it."""
    scopes = [Scope("key:k", Limits(rpm=100_000))]
    for closed_meanwhile in (False, True):
        book = ShareBook()
        first = Share("s1", scopes, ShareAsk(16, 16, 0), time.time() + SHARE_S, [ScopeState(8 + 16, 8 + 16, 0, 0, 0)])
        book.granted(first, None)
        for i in range(10):
            assert book.admit(f"a{i}", scopes, 1, time.time()) is not None
        if closed_meanwhile:
            book.close(first)
        second = Share("s2", scopes, ShareAsk(32, 32, 0), time.time() + SHARE_S,
                       [ScopeState(8 + 16 + 32, 8 + 16 + 32, 0, 0, 0)])
        book.granted(second, first)
        verdict = book.admit("b", scopes, 1, time.time())
        assert verdict is not None and verdict.states[0].requests == 8 + 10 + 1
        assert [w.used for w in book.withdrawals] == [10]


def test_a_share_in_hand_outlives_a_redis_outage_only_until_its_end(tmp_path: Path) -> None:
    """Redis killed: the key's share keeps admitting until its end, then the store is unavailable (the guard's
    failure mode applies); a share's closing that cannot reach Redis is dropped, not retried forever, and with
    Redis back the key gets shares again."""
    server = LocalRedis(tmp_path / "redis").start()
    key = Scope("key:outage", Limits(rpm=100_000))

    async def scenario() -> tuple[int, bool, bool, int]:
        store = RedisStore(server.url, "outage", timeout_s=0.5)
        try:
            await _busy(store, [key], 1, "warm")
            share = store.shares.open[(key.name,)]
            server.stop(kill=True)
            during = 0
            while time.time() < share.until - 0.05:
                during += store.admit_here(f"d{during}", [key], 1, time.time(), LEASE_S) is not None
                await asyncio.sleep(0.01)
            await asyncio.sleep(max(0.0, share.until - time.time()) + 0.1)  # its end: closed, the flush fails
            after_end = store.admit_here("late", [key], 1, time.time(), LEASE_S) is None
            try:
                await store.admit("late", [key], 1, time.time(), LEASE_S)
                unavailable = False
            except StoreUnavailable:
                unavailable = True
            server.start()
            await asyncio.sleep(SHARE_S)  # the declined ask's pause
            await _busy(store, [key], 1, "back")
            return during, after_end, unavailable, len(store.shares.open)
        finally:
            await store.close()
            server.stop()

    during, after_end, unavailable, shares = asyncio.run(scenario())
    assert during >= 1 and after_end and unavailable and shares == 1
