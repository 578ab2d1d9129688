"""Routing policies: each orders a model group's available upstreams for one request (the first is tried
first, the rest are the failover order)."""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

from pagoda.gateway.config import Policy, PrefixConfig, SessionConfig
from pagoda.gateway.upstream import Upstream


@dataclass
class RouteContext:
    """What a policy may know of a request."""

    session_key: str | None = None
    prefix_hashes: list[bytes] = field(default_factory=list)  # chained hashes of the prompt's leading blocks


class RoutingPolicy(Protocol):
    def order(self, upstreams: list[Upstream], ctx: RouteContext) -> list[Upstream]: ...

    def routed(self, upstream: Upstream, ctx: RouteContext) -> None:
        """The request went to ``upstream`` (and was answered)."""


def by_load(upstreams: list[Upstream]) -> list[Upstream]:
    return sorted(upstreams, key=Upstream.load)


class _Memoryless:
    def routed(self, upstream: Upstream, ctx: RouteContext) -> None:
        """These policies decide from the upstreams' state alone."""


class RoundRobin(_Memoryless):
    def __init__(self) -> None:
        self._next = 0

    def order(self, upstreams: list[Upstream], ctx: RouteContext) -> list[Upstream]:
        start = self._next % len(upstreams)
        self._next += 1
        return upstreams[start:] + upstreams[:start]


class Weighted(_Memoryless):
    """Smooth weighted round robin (as nginx): over any window each upstream gets its share, interleaved."""

    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def order(self, upstreams: list[Upstream], ctx: RouteContext) -> list[Upstream]:
        total = sum(u.weight for u in upstreams)
        for u in upstreams:
            self._current[u.url] = self._current.get(u.url, 0.0) + u.weight
        best = max(upstreams, key=lambda u: self._current[u.url])
        self._current[best.url] -= total
        return [best] + by_load([u for u in upstreams if u is not best])


class LeastOutstanding(_Memoryless):
    def order(self, upstreams: list[Upstream], ctx: RouteContext) -> list[Upstream]:
        return by_load(upstreams)


class PowerOfTwo(_Memoryless):
    """Two upstreams drawn at random, the less loaded first: near least-loaded without a herd on one."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def order(self, upstreams: list[Upstream], ctx: RouteContext) -> list[Upstream]:
        if len(upstreams) < 2:
            return list(upstreams)
        a, b = self._rng.sample(upstreams, 2)
        first = a if a.load() <= b.load() else b
        return [first] + by_load([u for u in upstreams if u is not first])


def _point(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class SessionAffinity(_Memoryless):
    """Consistent hashing with bounded load: a session keeps its upstream while that upstream holds no more
    than ``load_bound`` times the mean in-flight count; past it the ring's next upstream takes the request.
    Adding or removing an upstream moves only the sessions that hashed to it."""

    VIRTUAL_NODES = 64

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self._ring: list[tuple[int, str]] = []
        self._ring_urls: frozenset[str] = frozenset()
        self._fallback = LeastOutstanding()

    def _rebuild(self, upstreams: list[Upstream]) -> None:
        self._ring = sorted((_point(f"{u.url}#{i}"), u.url) for u in upstreams for i in range(self.VIRTUAL_NODES))
        self._ring_urls = frozenset(u.url for u in upstreams)

    def order(self, upstreams: list[Upstream], ctx: RouteContext) -> list[Upstream]:
        if ctx.session_key is None:
            return self._fallback.order(upstreams, ctx)
        if frozenset(u.url for u in upstreams) != self._ring_urls:
            self._rebuild(upstreams)
        by_url = {u.url: u for u in upstreams}
        bound = math.ceil(self.config.load_bound * (sum(u.in_flight for u in upstreams) + 1) / len(upstreams))
        start = bisect.bisect(self._ring, (_point(ctx.session_key), ""))
        walk: list[Upstream] = []
        for k in range(len(self._ring)):
            url = self._ring[(start + k) % len(self._ring)][1]
            if by_url[url] not in walk:
                walk.append(by_url[url])
                if len(walk) == len(upstreams):
                    break
        within = [u for u in walk if u.in_flight + 1 <= bound]
        return within + [u for u in walk if u not in within]


class PrefixAware:
    """Send a prompt to the upstream that last served its longest known leading run of blocks (its KV is
    probably still in that replica's prefix cache), unless that upstream's load is over the bound or its KV
    cache nearly full; else the least loaded. Remembers what it routed in an LRU table of block hashes."""

    def __init__(self, config: PrefixConfig) -> None:
        self.config = config
        self._owner: OrderedDict[bytes, str] = OrderedDict()

    def order(self, upstreams: list[Upstream], ctx: RouteContext) -> list[Upstream]:
        ranked = by_load(upstreams)
        by_url = {u.url: u for u in upstreams}
        for h in reversed(ctx.prefix_hashes):
            url = self._owner.get(h)
            if url is not None and url in by_url:
                owner = by_url[url]
                if (owner.load() <= self.config.load_factor * ranked[0].load() + self.config.load_slack
                        and owner.kv_usage <= self.config.max_kv_usage):
                    return [owner] + [u for u in ranked if u is not owner]
                break
        return ranked

    def routed(self, upstream: Upstream, ctx: RouteContext) -> None:
        for h in ctx.prefix_hashes:
            self._owner[h] = upstream.url
            self._owner.move_to_end(h)
        while len(self._owner) > self.config.table_size:
            self._owner.popitem(last=False)


def prefix_hashes(text: str, config: PrefixConfig) -> list[bytes]:
    """Chained hashes of ``text``'s full leading blocks: hash i covers characters ``[0, (i + 1) * block)``."""
    out: list[bytes] = []
    previous = b""
    size = config.block_chars
    for i in range(min(len(text) // size, config.max_blocks)):
        previous = hashlib.blake2b(previous + text[i * size:(i + 1) * size].encode(), digest_size=16).digest()
        out.append(previous)
    return out


def make_policy(name: Policy, prefix: PrefixConfig, session: SessionConfig) -> RoutingPolicy:
    if name == "round_robin":
        return RoundRobin()
    if name == "weighted":
        return Weighted()
    if name == "least_outstanding":
        return LeastOutstanding()
    if name == "power_of_two":
        return PowerOfTwo()
    if name == "session":
        return SessionAffinity(session)
    return PrefixAware(prefix)
