"""Where keys and rate-limit windows live: in this process (one gateway), or in Redis (several gateways, each
admission one atomic Lua call, so the limits hold across processes).

Limits are sliding windows over the last minute, kept as logs: a scope (a key, a tenant) remembers when each
admitted request came and how many tokens it was charged, so "N requests a minute" admits exactly N in any
60 seconds, however the requests bunch up, and a request's estimated tokens can later be corrected to what it
used. Requests in flight are leases that expire on their own, so a gateway that dies does not hold its slots.
Both stores run the same decision (``_decide`` here, the Lua script below) on the same numbers.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from pagoda.gateway.policy.keys import KeyRecord, Limits
from pagoda.gateway.policy.resp import RespConnection, RespError
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
    async def admit(self, request_id: str, scopes: list[Scope], cost: int, now: float, lease_s: float) -> Verdict: ...
    async def finish(self, request_id: str, scopes: list[Scope], charged: int, tokens: int | None) -> None: ...
    async def add_usage(self, records: list[UsageRecord]) -> None: ...
    async def usage(self, group_by: str, start: float, end: float) -> dict[str, Totals]: ...
    async def spent(self, scopes: list[str], now: float) -> list[tuple[Totals, Totals]]: ...
    async def close(self) -> None: ...


def _hours(start: float, end: float) -> range:
    """The hour buckets a time range touches (usage is kept per hour)."""
    return range(int(start // HOUR_S), int(-(-end // HOUR_S)))


def _periods(now: float) -> tuple[str, str]:
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

    async def finish(self, request_id: str, scopes: list[Scope], charged: int, tokens: int | None) -> None:
        """The request ended: its charge corrected to ``tokens`` (None: unknown, the estimate stands) and its
        lease ended."""
        for scope in scopes:
            w = self.windows.get(scope.name)
            if w is None:
                continue
            if tokens is not None and request_id in w.costs:
                w.tokens += tokens - w.costs[request_id]
                w.costs[request_id] = tokens
            w.leases.pop(request_id, None)

    async def add_usage(self, records: list[UsageRecord]) -> None:
        hourly, spend = aggregate(records)
        for table, sums in ((self.hourly, hourly), (self.spend, spend)):
            for k, t in sums.items():
                table.setdefault(k, Totals()).merge(t)  # type: ignore[arg-type]

    async def usage(self, group_by: str, start: float, end: float) -> dict[str, Totals]:
        hours = _hours(start, end)
        out: dict[str, Totals] = {}
        for (hour, dim, value), t in self.hourly.items():
            if dim == group_by and hour in hours:
                out.setdefault(value, Totals()).merge(t)
        return out

    async def spent(self, scopes: list[str], now: float) -> list[tuple[Totals, Totals]]:
        day, month = _periods(now)
        return [(self.spend.get((day, s), Totals()), self.spend.get((month, s), Totals())) for s in scopes]

    async def close(self) -> None:
        return None


# KEYS: per scope its request log (zset of "<request id>:<tokens charged>" by arrival ms), its token total and
# its leases (zset: request id by lease end ms). ARGV: now ms, window ms, request id, lease end ms, then per
# scope rpm, tpm, max concurrency (-1: none) and the request's tokens. Returns allowed, the refusing scope
# (1-based, 0: none), its kind, the retry ms, then per scope: requests, tokens, in flight, reset ms.
ADMIT_LUA = """
local now, window, rid, lease_until = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local n = #KEYS / 3
local counts, used, inflight = {}, {}, {}
local function charge(member) return tonumber(string.match(member, ':(%d+)$')) end
for i = 1, n do
  local log, total, leases = KEYS[3*i-2], KEYS[3*i-1], KEYS[3*i]
  while true do  -- the entries that left the window, oldest first
    local old = redis.call('ZRANGEBYSCORE', log, '-inf', now - window, 'LIMIT', 0, 1000)
    if #old == 0 then break end
    local freed = 0
    for _, m in ipairs(old) do freed = freed + charge(m) end
    redis.call('ZREMRANGEBYRANK', log, 0, #old - 1)
    redis.call('DECRBY', total, freed)
    if #old < 1000 then break end
  end
  counts[i] = redis.call('ZCARD', log)
  used[i] = tonumber(redis.call('GET', total) or '0')
  inflight[i] = 0
  if tonumber(ARGV[3+4*i]) >= 0 then
    redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
    inflight[i] = redis.call('ZCARD', leases)
  end
end
local function states(out)
  for i = 1, n do
    local first = redis.call('ZRANGE', KEYS[3*i-2], 0, 0, 'WITHSCORES')
    local reset = 0
    if #first > 0 then reset = math.max(0, tonumber(first[2]) + window - now) end
    table.insert(out, counts[i]); table.insert(out, used[i]); table.insert(out, inflight[i]); table.insert(out, reset)
  end
  return out
end
for i = 1, n do
  local rpm, tpm, conc, cost = tonumber(ARGV[1+4*i]), tonumber(ARGV[2+4*i]), tonumber(ARGV[3+4*i]), tonumber(ARGV[4+4*i])
  local kind, retry = nil, 1000
  local log = KEYS[3*i-2]
  if rpm >= 0 and counts[i] + 1 > rpm then
    kind = 'requests'
    local nth = redis.call('ZRANGE', log, counts[i] - rpm, counts[i] - rpm, 'WITHSCORES')
    retry = math.max(0, tonumber(nth[2]) + window - now)
  elseif tpm >= 0 and used[i] + cost > tpm then
    kind = 'tokens'
    if cost > tpm then
      retry = window
    else
      local need, freed = used[i] + cost - tpm, 0
      local entries = redis.call('ZRANGE', log, 0, -1, 'WITHSCORES')
      for j = 1, #entries, 2 do
        freed = freed + charge(entries[j])
        if freed >= need then retry = math.max(0, tonumber(entries[j+1]) + window - now); break end
      end
    end
  elseif conc >= 0 and inflight[i] + 1 > conc then
    kind = 'concurrency'
  end
  if kind then return states({0, i, kind, retry}) end
end
for i = 1, n do
  local rpm, tpm, conc, cost = tonumber(ARGV[1+4*i]), tonumber(ARGV[2+4*i]), tonumber(ARGV[3+4*i]), tonumber(ARGV[4+4*i])
  local log, total, leases = KEYS[3*i-2], KEYS[3*i-1], KEYS[3*i]
  if rpm >= 0 or tpm >= 0 then
    redis.call('ZADD', log, now, rid .. ':' .. cost)
    redis.call('INCRBY', total, cost)
    redis.call('PEXPIRE', log, window + 1000)
    redis.call('PEXPIRE', total, window + 1000)
    counts[i] = counts[i] + 1
    used[i] = used[i] + cost
  end
  if conc >= 0 then
    redis.call('ZADD', leases, lease_until, rid)
    redis.call('PEXPIRE', leases, lease_until - now + 1000)
    inflight[i] = inflight[i] + 1
  end
end
return states({1, 0, '', 0})
"""

# KEYS: per scope its log, token total and leases. ARGV: request id, the tokens charged, the tokens used (-1:
# unknown: the charge stands).
FINISH_LUA = """
local rid, charged, used = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, #KEYS / 3 do
  if used >= 0 and used ~= charged then
    local member = rid .. ':' .. charged
    local at = redis.call('ZSCORE', KEYS[3*i-2], member)
    if at then
      redis.call('ZREM', KEYS[3*i-2], member)
      redis.call('ZADD', KEYS[3*i-2], at, rid .. ':' .. used)
      redis.call('INCRBY', KEYS[3*i-1], used - charged)
    end
  end
  redis.call('ZREM', KEYS[3*i], rid)
end
return 0
"""


class RedisStore:
    """Keys and windows in Redis (redis-py's asyncio client; hiredis parses the replies). ``prefix`` names
    this deployment's keys."""

    def __init__(self, url: str, prefix: str = "pagoda", timeout_s: float = 1.0) -> None:
        import redis.asyncio as redis

        self.errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError, asyncio.TimeoutError)
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.prefix = prefix
        self.fast = RespConnection(url, timeout_s)  # the per-request scripts

    async def _script(self, script: str, keys: list[str], args: list[int | str]) -> Any:
        """Run one of the scripts by its SHA-1 (sent whole the first time after Redis lost it)."""
        sha = SCRIPT_SHAS[script]
        try:
            try:
                return await self.fast.call("EVALSHA", sha, len(keys), *keys, *args)
            except RespError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
                return await self.fast.call("EVAL", script, len(keys), *keys, *args)
        except (OSError, ConnectionError, asyncio.TimeoutError, RespError) as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from None

    async def _call(self, coroutine):  # type: ignore[no-untyped-def]
        try:
            return await coroutine
        except self.errors as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from None

    def _record_key(self, digest: str) -> str:
        return f"{self.prefix}:key:{digest}"

    async def save_key(self, record: KeyRecord) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self._record_key(record.digest), orjson.dumps(record.to_dict()))
        pipe.hset(f"{self.prefix}:key_ids", record.key_id, record.digest)
        await self._call(pipe.execute())

    async def key_for(self, digest: str) -> KeyRecord | None:
        raw = await self._call(self.client.get(self._record_key(digest)))
        return None if raw is None else KeyRecord.from_dict(orjson.loads(raw))

    async def key_by_id(self, key_id: str) -> KeyRecord | None:
        digest = await self._call(self.client.hget(f"{self.prefix}:key_ids", key_id))
        return None if digest is None else await self.key_for(digest.decode())

    async def keys(self) -> list[KeyRecord]:
        digests = await self._call(self.client.hvals(f"{self.prefix}:key_ids"))
        if not digests:
            return []
        raws = await self._call(self.client.mget([self._record_key(d.decode()) for d in digests]))
        return sorted((KeyRecord.from_dict(orjson.loads(r)) for r in raws if r is not None), key=lambda r: r.created)

    def _scope_keys(self, scope: Scope) -> list[str]:
        base = f"{self.prefix}:rl:{scope.name}"
        return [f"{base}:log", f"{base}:tokens", f"{base}:leases"]

    async def admit(self, request_id: str, scopes: list[Scope], cost: int, now: float, lease_s: float) -> Verdict:
        keys = [k for s in scopes for k in self._scope_keys(s)]
        args: list[int | str] = [int(now * 1000), int(WINDOW_S * 1000), request_id, int((now + lease_s) * 1000)]
        for s in scopes:
            lim = s.limits
            args += [-1 if lim.rpm is None else lim.rpm, -1 if lim.tpm is None else lim.tpm,
                     -1 if lim.max_concurrency is None else lim.max_concurrency, cost]
        out = await self._script(ADMIT_LUA, keys, args)
        states = [ScopeState(int(out[i]), int(out[i + 1]), int(out[i + 2]), int(out[i + 3]) / 1000,
                             int(out[i + 3]) / 1000) for i in range(4, len(out), 4)]
        if int(out[0]):
            return Verdict(True, states)
        kind = out[2].decode() if isinstance(out[2], bytes) else str(out[2])
        return Verdict(False, states, int(out[1]) - 1, kind, int(out[3]) / 1000)

    async def finish(self, request_id: str, scopes: list[Scope], charged: int, tokens: int | None) -> None:
        keys = [k for s in scopes for k in self._scope_keys(s)]
        await self._script(FINISH_LUA, keys, [request_id, charged, -1 if tokens is None else tokens])

    async def add_usage(self, records: list[UsageRecord]) -> None:
        """The batch's sums added in one transaction (so a failed flush adds nothing and can be retried)."""
        hourly, spend = aggregate(records)
        pipe = self.client.pipeline(transaction=True)
        for (hour, dim, value), t in hourly.items():
            key = f"{self.prefix}:usage:{hour}:{dim}:{value}"
            _add_totals(pipe, key, t)
            pipe.sadd(f"{self.prefix}:usage:{hour}:{dim}", value)
            pipe.expire(f"{self.prefix}:usage:{hour}:{dim}", RETAIN_S)
        for (period, scope), t in spend.items():
            _add_totals(pipe, f"{self.prefix}:spend:{period}:{scope}", t)
        await self._call(pipe.execute())

    async def usage(self, group_by: str, start: float, end: float) -> dict[str, Totals]:
        hours = list(_hours(start, end))
        pipe = self.client.pipeline(transaction=False)
        for hour in hours:
            pipe.smembers(f"{self.prefix}:usage:{hour}:{group_by}")
        members = await self._call(pipe.execute())
        keys = [(v.decode(), f"{self.prefix}:usage:{hour}:{group_by}:{v.decode()}")
                for hour, values in zip(hours, members) for v in values]
        pipe = self.client.pipeline(transaction=False)
        for _, key in keys:
            pipe.hgetall(key)
        out: dict[str, Totals] = {}
        for (value, _), fields in zip(keys, await self._call(pipe.execute())):
            out.setdefault(value, Totals()).merge(_totals(fields))
        return out

    async def spent(self, scopes: list[str], now: float) -> list[tuple[Totals, Totals]]:
        day, month = _periods(now)
        pipe = self.client.pipeline(transaction=False)
        for s in scopes:
            pipe.hgetall(f"{self.prefix}:spend:{day}:{s}")
            pipe.hgetall(f"{self.prefix}:spend:{month}:{s}")
        fields = await self._call(pipe.execute())
        return [(_totals(fields[2 * i]), _totals(fields[2 * i + 1])) for i in range(len(scopes))]

    async def close(self) -> None:
        await self.fast.close()
        await self.client.aclose()


SCRIPT_SHAS = {script: hashlib.sha1(script.encode()).hexdigest() for script in (ADMIT_LUA, FINISH_LUA)}
RETAIN_S = 40 * 86400  # usage and spend kept in Redis this long after their last change


def _add_totals(pipe, key: str, t: Totals) -> None:  # type: ignore[no-untyped-def]
    pipe.hincrby(key, "requests", t.requests)
    pipe.hincrby(key, "prompt_tokens", t.prompt_tokens)
    pipe.hincrby(key, "completion_tokens", t.completion_tokens)
    pipe.hincrbyfloat(key, "cost", t.cost)
    pipe.expire(key, RETAIN_S)


def _totals(fields: dict[bytes, bytes]) -> Totals:
    return Totals(int(fields.get(b"requests", 0)), int(fields.get(b"prompt_tokens", 0)),
                  int(fields.get(b"completion_tokens", 0)), float(fields.get(b"cost", 0.0)))
