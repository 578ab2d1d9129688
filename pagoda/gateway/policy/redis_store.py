"""The store in Redis, shared by every gateway that names it: keys and usage through redis-py (hiredis
parsing), and each request's admission and end as one Lua script over a pipelined RESP connection
(``resp.py``), so that a decision over all of a request's scopes is atomic across gateways."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any

import orjson

from pagoda.gateway.policy.keys import KeyRecord
from pagoda.gateway.policy.records import Totals, UsageRecord, aggregate
from pagoda.gateway.policy.resp import RespConnection, RespError
from pagoda.gateway.policy.store import (
    WINDOW_S,
    Ended,
    Scope,
    ScopeState,
    StoreUnavailable,
    Verdict,
    budget_periods,
    hour_buckets,
)

# Settles ended requests: ARGV from ``a``: their count, then per request its id, the tokens charged, the tokens
# used (-1: unknown: the charge stands) and its number of scopes; KEYS from ``k``: per scope its request log,
# token total and leases. The charge is corrected to what was used and the lease ended.
SETTLE_LUA = """
local function settle(a, k)
  local count = tonumber(ARGV[a])
  a = a + 1
  for _ = 1, count do
    local rid, charged, used, scopes = ARGV[a], tonumber(ARGV[a+1]), tonumber(ARGV[a+2]), tonumber(ARGV[a+3])
    a = a + 4
    for _ = 1, scopes do
      if used >= 0 and used ~= charged then
        local member = rid .. ':' .. charged
        local at = redis.call('ZSCORE', KEYS[k], member)
        if at then
          redis.call('ZREM', KEYS[k], member)
          redis.call('ZADD', KEYS[k], at, rid .. ':' .. used)
          redis.call('INCRBY', KEYS[k+1], used - charged)
        end
      end
      redis.call('ZREM', KEYS[k+2], rid)
      k = k + 3
    end
  end
end
"""

# Settles the requests that ended since the last call (as SETTLE_LUA), then admits one. KEYS: per scope its
# request log (zset of "<request id>:<tokens charged>" by arrival ms), its token total and its leases (zset:
# request id by lease end ms), then the ended requests' keys. ARGV: now ms, window ms, request id, lease end ms,
# its number of scopes n, per scope rpm, tpm, max concurrency (-1: none) and the request's tokens, then the
# ended requests. Returns allowed, the refusing scope (1-based, 0: none), its kind, the retry ms, then per
# scope: requests, tokens, in flight, reset ms.
ADMIT_LUA = SETTLE_LUA + """
local now, window, rid, lease_until = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local n = tonumber(ARGV[5])
settle(6 + 4 * n, 3 * n + 1)
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
  if tonumber(ARGV[4+4*i]) >= 0 then
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
  local rpm, tpm, conc, cost = tonumber(ARGV[2+4*i]), tonumber(ARGV[3+4*i]), tonumber(ARGV[4+4*i]), tonumber(ARGV[5+4*i])
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
  local rpm, tpm, conc, cost = tonumber(ARGV[2+4*i]), tonumber(ARGV[3+4*i]), tonumber(ARGV[4+4*i]), tonumber(ARGV[5+4*i])
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

FINISH_LUA = SETTLE_LUA + """
settle(1, 1)
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
        self._keys_of: dict[str, list[str]] = {}  # a scope's Redis keys, by scope name

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
        keys = self._keys_of.get(scope.name)
        if keys is None:
            if len(self._keys_of) > 100_000:
                self._keys_of.clear()
            base = f"{self.prefix}:rl:{scope.name}"
            keys = self._keys_of[scope.name] = [f"{base}:log", f"{base}:tokens", f"{base}:leases"]
        return keys

    async def admit(self, request_id: str, scopes: list[Scope], cost: int, now: float, lease_s: float,
                    ended: Sequence[Ended] = ()) -> Verdict:
        keys = [k for s in scopes for k in self._scope_keys(s)]
        args: list[int | str] = [int(now * 1000), int(WINDOW_S * 1000), request_id, int((now + lease_s) * 1000),
                                 len(scopes)]
        for s in scopes:
            lim = s.limits
            args += [-1 if lim.rpm is None else lim.rpm, -1 if lim.tpm is None else lim.tpm,
                     -1 if lim.max_concurrency is None else lim.max_concurrency, cost]
        self._settling(ended, keys, args)
        out = await self._script(ADMIT_LUA, keys, args)
        states = [ScopeState(int(out[i]), int(out[i + 1]), int(out[i + 2]), int(out[i + 3]) / 1000,
                             int(out[i + 3]) / 1000) for i in range(4, len(out), 4)]
        if int(out[0]):
            return Verdict(True, states)
        kind = out[2].decode() if isinstance(out[2], bytes) else str(out[2])
        return Verdict(False, states, int(out[1]) - 1, kind, int(out[3]) / 1000)

    async def finish(self, ended: Sequence[Ended]) -> None:
        keys: list[str] = []
        args: list[int | str] = []
        self._settling(ended, keys, args)
        await self._script(FINISH_LUA, keys, args)

    def _settling(self, ended: Sequence[Ended], keys: list[str], args: list[int | str]) -> None:
        """SETTLE_LUA's part of a script call's keys and arguments."""
        args.append(len(ended))
        for e in ended:
            args += [e.request_id, e.charged, -1 if e.tokens is None else e.tokens, len(e.scopes)]
            keys += [k for s in e.scopes for k in self._scope_keys(s)]

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
        hours = list(hour_buckets(start, end))
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
        day, month = budget_periods(now)
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
