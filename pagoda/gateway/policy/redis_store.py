"""The store in Redis, shared by every gateway that names it: keys and usage through redis-py (hiredis
parsing), and each request's admission and end as one Lua script over a pipelined RESP connection
(``resp.py``), so that a decision over all of a request's scopes is atomic across gateways."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from pagoda.gateway.policy.keys import KeyRecord
from pagoda.gateway.policy.records import Totals, UsageRecord, aggregate
from pagoda.gateway.policy.resp import RespConnection, RespError
from pagoda.gateway.policy.shares import MAX_FRACTION, ROOM_LEFT, SHARE_S, Share, ShareAsk, ShareBook
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

# Settles closed window shares (shares.py), then ended requests (a share's last requests' correction of its slot 1
# comes after its closing). ARGV from ``a``: the shares' count, then per share its id, the request slots used and
# reserved, the tokens reserved and charged now, its number of scopes; the requests' count, then per request its
# id, the tokens charged, the tokens used (-1: unknown: the charge stands) and its number of scopes. KEYS from
# ``k``: per scope its request log, token total and leases. A share's unused slots leave the log and its slot 1
# is charged what its requests were; a request's charge is corrected to what it used and its lease ended.
# Returns where the next arguments and keys start.
SETTLE_LUA = """
local function settle(a, k)
  local count = tonumber(ARGV[a])
  a = a + 1
  for _ = 1, count do
    local sid, used, reserved = ARGV[a], tonumber(ARGV[a+1]), tonumber(ARGV[a+2])
    local reserved_tokens, charged, scopes = tonumber(ARGV[a+3]), tonumber(ARGV[a+4]), tonumber(ARGV[a+5])
    a = a + 6
    for _ = 1, scopes do
      local log, total = KEYS[k], KEYS[k+1]
      for j = math.max(used + 1, 2), reserved do redis.call('ZREM', log, sid .. '.' .. j .. ':0') end
      local first = sid .. '.1:' .. reserved_tokens
      if used == 0 then
        if redis.call('ZREM', log, first) == 1 then redis.call('DECRBY', total, reserved_tokens) end
      elseif charged ~= reserved_tokens then
        local at = redis.call('ZSCORE', log, first)
        if at then
          redis.call('ZREM', log, first)
          redis.call('ZADD', log, at, sid .. '.1:' .. charged)
          redis.call('INCRBY', total, charged - reserved_tokens)
        end
      end
      k = k + 3
    end
  end
  count = tonumber(ARGV[a])
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
  return a, k
end
"""

# Scope i's window (KEYS 3i-2..3i: its request log, zset of "<request id>:<tokens charged>" by arrival ms; its
# token total; its leases, zset of request ids by lease end ms) rid of what left it, and what it holds: requests,
# tokens, requests in flight (counted only where ``concurrency`` is limited). ``states`` appends each scope's
# numbers and the ms until its oldest request leaves.
WINDOW_LUA = """
local function charge(member) return tonumber(string.match(member, ':(%d+)$')) end
local function open_window(i, now, window, concurrency)
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
  local inflight = 0
  if concurrency then
    redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
    inflight = redis.call('ZCARD', leases)
  end
  return redis.call('ZCARD', log), tonumber(redis.call('GET', total) or '0'), inflight
end
local function states(out, n, counts, used, inflight, now, window)
  for i = 1, n do
    local first = redis.call('ZRANGE', KEYS[3*i-2], 0, 0, 'WITHSCORES')
    local reset = 0
    if #first > 0 then reset = math.max(0, tonumber(first[2]) + window - now) end
    table.insert(out, counts[i]); table.insert(out, used[i]); table.insert(out, inflight[i]); table.insert(out, reset)
  end
  return out
end
"""

# Settles (SETTLE_LUA), then admits one request. KEYS: per scope its three window keys, then the settled ones'.
# ARGV: now ms, window ms, request id, lease end ms, its number of scopes n, per scope rpm, tpm, max concurrency
# (-1: none) and the request's tokens, then what to settle. Returns allowed, the refusing scope (1-based, 0:
# none), its kind, the retry ms, then per scope: requests, tokens, in flight, reset ms.
ADMIT_LUA = SETTLE_LUA + WINDOW_LUA + """
local now, window, rid, lease_until = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local n = tonumber(ARGV[5])
settle(6 + 4 * n, 3 * n + 1)
local counts, used, inflight = {}, {}, {}
for i = 1, n do
  counts[i], used[i], inflight[i] = open_window(i, now, window, tonumber(ARGV[4+4*i]) >= 0)
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
  if kind then return states({0, i, kind, retry}, n, counts, used, inflight, now, window) end
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
return states({1, 0, '', 0}, n, counts, used, inflight, now, window)
"""

# Settles (SETTLE_LUA), then grants a window share (shares.py) or not. KEYS: per scope its three window keys,
# then the settled ones'. ARGV: now ms, window ms, share id, its end ms, its concurrency slots' lease end ms, its
# number of scopes n, the share of each limit that must stay unreserved, the most of a limit one share may
# take, the requests, tokens and concurrency slots asked for, per scope rpm, tpm, max concurrency (-1: none), then
# what to settle. Granted, its request slots are logged at its end (slot 1 carrying the tokens) and its
# concurrency slots leased. Returns granted (1/0), then per scope: requests, tokens, in flight, reset ms.
SHARE_LUA = SETTLE_LUA + WINDOW_LUA + """
local now, window, sid, share_end, lease_until = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local n, room, fraction = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local want = {tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])}
settle(12 + 3 * n, 3 * n + 1)
local counts, used, inflight, limits = {}, {}, {}, {}
local granted = 1
for i = 1, n do
  limits[i] = {tonumber(ARGV[9+3*i]), tonumber(ARGV[10+3*i]), tonumber(ARGV[11+3*i])}
  counts[i], used[i], inflight[i] = open_window(i, now, window, limits[i][3] >= 0)
  local have = {counts[i], used[i], inflight[i]}
  for x = 1, 3 do
    if limits[i][x] >= 0 and (have[x] + want[x] > room * limits[i][x] or want[x] > fraction * limits[i][x]) then
      granted = 0
    end
  end
end
if granted == 1 then
  for i = 1, n do
    local log, total, leases = KEYS[3*i-2], KEYS[3*i-1], KEYS[3*i]
    if limits[i][1] >= 0 or limits[i][2] >= 0 then
      redis.call('ZADD', log, share_end, sid .. '.1:' .. want[2])
      for j = 2, want[1] do redis.call('ZADD', log, share_end, sid .. '.' .. j .. ':0') end
      redis.call('INCRBY', total, want[2])
      redis.call('PEXPIRE', log, share_end - now + window + 1000)
      redis.call('PEXPIRE', total, share_end - now + window + 1000)
      counts[i] = counts[i] + want[1]
      used[i] = used[i] + want[2]
    end
    if limits[i][3] >= 0 then
      for j = 1, want[3] do redis.call('ZADD', leases, lease_until, sid .. '.c' .. j) end
      redis.call('PEXPIRE', leases, lease_until - now + 1000)
      inflight[i] = inflight[i] + want[3]
    end
  end
end
return states({granted}, n, counts, used, inflight, now, window)
"""

FINISH_LUA = SETTLE_LUA + """
settle(1, 1)
return 0
"""
# What waits to be settled (requests ended here, closed shares) waits at most this long for the next script
# call to carry it: until then other gateways still count those leases, estimates and reservations.
FLUSH_AFTER_S = 0.005


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
        self.unsent: list[Ended] = []  # ended requests to settle with the next script call
        self.shares = ShareBook()
        self.instance = secrets.token_hex(6)  # share ids unique across gateways
        self._share_ids = itertools.count()
        self._background: set[asyncio.Future[None]] = set()
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.on_share: Callable[[str], None] | None = None  # told "granted" or "declined" (metrics)

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

    def admit_here(self, request_id: str, scopes: list[Scope], cost: int, now: float, lease_s: float) -> Verdict | None:
        """Admitted from the key's window share without a round trip, or None (``admit`` asks Redis)."""
        verdict = self.shares.admit(request_id, scopes, cost, now)
        if verdict is not None:
            self._note(scopes, cost, now, lease_s)
        return verdict

    async def admit(self, request_id: str, scopes: list[Scope], cost: int, now: float, lease_s: float) -> Verdict:
        keys = [k for s in scopes for k in self._scope_keys(s)]
        args: list[int | str] = [int(now * 1000), int(WINDOW_S * 1000), request_id, int((now + lease_s) * 1000),
                                 len(scopes)]
        for s in scopes:
            lim = s.limits
            args += [-1 if lim.rpm is None else lim.rpm, -1 if lim.tpm is None else lim.tpm,
                     -1 if lim.max_concurrency is None else lim.max_concurrency, cost]
        self._settling(keys, args)
        out = await self._script(ADMIT_LUA, keys, args)
        states = _states(out, 4)
        if int(out[0]):
            self._note(scopes, cost, now, lease_s)
            return Verdict(True, states)
        kind = out[2].decode() if isinstance(out[2], bytes) else str(out[2])
        return Verdict(False, states, int(out[1]) - 1, kind, int(out[3]) / 1000)

    async def finish(self, ended: Sequence[Ended]) -> None:
        """Settle ``ended``: those admitted from a share here, the others (and closed shares) in Redis."""
        self.settle(ended)
        if not self.unsent and not self.shares.pending:
            return
        keys: list[str] = []
        args: list[int | str] = []
        self._settling(keys, args)
        await self._script(FINISH_LUA, keys, args)

    def settle(self, ended: Sequence[Ended]) -> None:
        """Those admitted from a share here; the others with the next script call (within FLUSH_AFTER_S)."""
        self.unsent += [e for e in ended if not self.shares.end(e)]
        self._flush_soon()

    def _settling(self, keys: list[str], args: list[int | str]) -> None:
        """SETTLE_LUA's part of a script call's keys and arguments: what waits to be settled, taken (a call that
        fails loses it: leases expire, estimates and reservations stand until they leave the window)."""
        withdrawals, releases = self.shares.take_pending()
        ended, self.unsent = self.unsent + releases, []
        args.append(len(withdrawals))
        for w in withdrawals:
            args += [w.share_id, w.used, w.reserved, w.reserved_tokens, w.charged, len(w.scopes)]
            keys += [k for s in w.scopes for k in self._scope_keys(s)]
        args.append(len(ended))
        for e in ended:
            args += [e.request_id, e.charged, -1 if e.tokens is None else e.tokens, len(e.scopes)]
            keys += [k for s in e.scopes for k in self._scope_keys(s)]

    # ---- window shares (shares.py) ----------------------------------------------------------------------
    def _note(self, scopes: list[Scope], cost: int, now: float, lease_s: float) -> None:
        """An admission counted towards the key's demand; a share asked for in the background when it is due."""
        ask = self.shares.note(scopes, cost, now)
        if ask is not None:
            task = asyncio.ensure_future(self._take_share(scopes, ask, lease_s))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _take_share(self, scopes: list[Scope], ask: ShareAsk, lease_s: float) -> None:
        share_id = f"s{self.instance}-{next(self._share_ids)}"
        now = time.time()
        until = now + SHARE_S
        keys = [k for s in scopes for k in self._scope_keys(s)]
        args: list[int | str] = [int(now * 1000), int(WINDOW_S * 1000), share_id, int(until * 1000),
                                 int((until + lease_s) * 1000), len(scopes), 1 - ROOM_LEFT, MAX_FRACTION,
                                 ask.requests, ask.tokens, ask.concurrency]
        for s in scopes:
            lim = s.limits
            args += [-1 if lim.rpm is None else lim.rpm, -1 if lim.tpm is None else lim.tpm,
                     -1 if lim.max_concurrency is None else lim.max_concurrency]
        self._settling(keys, args)
        previous = self.shares.open_share(scopes)  # open: its withdrawal is not in this call
        granted = False
        try:
            out = await self._script(SHARE_LUA, keys, args)
            granted = bool(int(out[0]))
        except StoreUnavailable:
            pass
        finally:
            if not granted:  # (whatever went wrong: the key may ask again after SHARE_S)
                self.shares.declined(scopes, time.time())
        if not granted:
            self._count_share("declined")
            return
        share = Share(share_id, scopes, ask, until, _states(out, 1))
        self.shares.granted(share, previous)
        self._count_share("granted")
        if self._closed:  # granted while the store closed: given back at once
            self.shares.close(share)
        else:
            asyncio.get_running_loop().call_later(max(0.0, until - time.time()), self._expired, share)
        self._flush_soon()  # the share it replaced, if any, closed

    def _count_share(self, outcome: str) -> None:
        if self.on_share is not None:
            self.on_share(outcome)

    def _expired(self, share: Share) -> None:
        self.shares.close(share)
        self._flush_soon()

    def _flush_soon(self) -> None:
        """What waits to be settled (ended requests, closed shares) goes with the next script call, or alone
        within FLUSH_AFTER_S."""
        if not self.unsent and not self.shares.pending:
            return
        loop = asyncio.get_running_loop()
        if self._flush_timer is None or self._flush_loop is not loop:  # (a timer of a finished loop never fires)
            self._flush_timer, self._flush_loop = loop.call_later(FLUSH_AFTER_S, self._flush), loop

    def _flush(self) -> None:
        self._flush_timer = None
        if self._closed:
            return
        task = asyncio.ensure_future(self._finish_quietly())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _finish_quietly(self) -> None:
        try:
            await self.finish(())
        except StoreUnavailable:
            pass  # the reservations leave the window on their own

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
        """Give the shares back (the gateway's requests have ended), then close the connections."""
        self._closed = True
        await asyncio.gather(*self._background, return_exceptions=True)
        self.shares.close_all()
        await self._finish_quietly()
        await self.fast.close()
        await self.client.aclose()


SCRIPT_SHAS = {script: hashlib.sha1(script.encode()).hexdigest() for script in (ADMIT_LUA, FINISH_LUA, SHARE_LUA)}
RETAIN_S = 40 * 86400  # usage and spend kept in Redis this long after their last change


def _states(out: list[Any], start: int) -> list[ScopeState]:
    """Each scope's requests, tokens, in flight and reset ms, four numbers per scope from ``start``."""
    return [ScopeState(int(out[i]), int(out[i + 1]), int(out[i + 2]), int(out[i + 3]) / 1000, int(out[i + 3]) / 1000)
            for i in range(start, len(out), 4)]


def _add_totals(pipe, key: str, t: Totals) -> None:  # type: ignore[no-untyped-def]
    pipe.hincrby(key, "requests", t.requests)
    pipe.hincrby(key, "prompt_tokens", t.prompt_tokens)
    pipe.hincrby(key, "completion_tokens", t.completion_tokens)
    pipe.hincrbyfloat(key, "cost", t.cost)
    pipe.expire(key, RETAIN_S)


def _totals(fields: dict[bytes, bytes]) -> Totals:
    return Totals(int(fields.get(b"requests", 0)), int(fields.get(b"prompt_tokens", 0)),
                  int(fields.get(b"completion_tokens", 0)), float(fields.get(b"cost", 0.0)))
