"""The policy on a request's path: who sent it (its key), whether its role may use the route and its model,
whether its budgets have room and its key's and tenant's windows take it (with OpenAI's x-ratelimit-*
headers either way); then what it used and cost, recorded, and every decision in the audit log.

When the store cannot be reached the configured mode applies: "closed" answers 503; "open" goes on with keys
seen in the last lookups and this gateway's own windows, and the usage records wait in the buffer.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from pagoda.gateway.config import BudgetConfig, GatewayConfig, PolicyConfig
from pagoda.gateway.errors import GatewayError
from pagoda.gateway.metrics import GatewayMetrics
from pagoda.gateway.policy.answers import rate_limit_headers, refusal
from pagoda.gateway.policy.audit import AuditLog
from pagoda.gateway.policy.fair_queue import FairQueue
from pagoda.gateway.policy.keys import KeyRecord, Limits, Principal, Role, digest
from pagoda.gateway.policy.records import Totals, UsageRecord
from pagoda.gateway.policy.redis_store import RedisStore
from pagoda.gateway.policy.room import RoomSeen
from pagoda.gateway.policy.store import Ended, MemoryStore, Scope, Store, StoreUnavailable
from pagoda.gateway.policy.usage import CostModel, UsageLedger
from pagoda.gateway.proxy import OwnHeaders, StreamUsage, prompt_text
from pagoda.gateway.router import ModelGroup, RoutingTable

ADMIN_TENANT = "admin"
# What each role may reach: inference (the OpenAI POST routes), reading (GET routes, admin views included),
# administering (every admin route).
ROLE_RIGHTS: dict[Role, frozenset[str]] = {
    "admin": frozenset({"infer", "read", "administer", "models"}),
    "user": frozenset({"infer", "models"}),
    "read-only": frozenset({"read", "models"}),
}


def open_store(config: PolicyConfig) -> Store:
    if config.redis_url is None:
        return MemoryStore()
    return RedisStore(config.redis_url, config.redis_prefix, config.redis_timeout_s)


@dataclass
class Ticket:
    """An admitted request: what to settle and release when it ends, and where (the shared store, or this
    gateway's own when it was admitted with the store away)."""

    request_id: str
    scopes: list[Scope]
    charged: int  # tokens, at admission
    headers: dict[str, str]
    store: Store


class Guard:
    def __init__(self, settings: Callable[[], GatewayConfig], store: Store, metrics: GatewayMetrics | None = None) -> None:
        self.settings = settings  # the live config (reloads change tenants, prices and the admin key)
        self.store = store
        self.metrics = metrics
        self.local = MemoryStore()  # the windows of "open" mode while the store is away
        self.ledger = UsageLedger(store)
        self.costs = CostModel(lambda: self.config.prices)
        audit = settings().policy.audit
        self.audit = AuditLog(audit) if audit is not None else None
        self.key_cache: dict[str, tuple[KeyRecord, Principal, float]] = {}  # by digest: record, principal, when
        self.queues: dict[str, FairQueue] = {}  # by model group
        self.room = RoomSeen()
        self._scopes_of: PolicyConfig | None = None
        self._tenant_scopes: dict[str, Scope] = {}
        self._decided_here = metrics.admissions.labels("here") if metrics is not None else None
        self._decided_in_store = metrics.admissions.labels("store") if metrics is not None else None
        if metrics is not None and isinstance(store, RedisStore):
            store.on_share = lambda outcome: metrics.shares.labels(outcome).inc()
        # Request ids unique across gateways sharing a store: this process's random prefix and a count.
        self.instance = secrets.token_hex(6)
        self.request_ids = itertools.count()

    @property
    def config(self) -> PolicyConfig:
        return self.settings().policy

    @property
    def lease_s(self) -> float:
        """A request in flight longer than its total timeout has been given up: its slot frees itself."""
        return self.settings().timeouts.total_s + 60

    def start(self) -> None:
        self.ledger.start()

    async def stop(self) -> None:
        await self.ledger.stop()
        if self.audit is not None:
            self.audit.close()

    # ---- who, and what they may do ------------------------------------------------------------------
    async def principal(self, request: web.Request) -> Principal:
        """The request's key, or 401. Any text after "Bearer " is hashed and looked up once: a malformed key
        takes the same path as an unknown one."""
        given = request.headers.get("Authorization", "")
        if not given.startswith("Bearer ") or len(given) > 512:
            raise GatewayError(401, "an API key is required (Authorization: Bearer …)", code="invalid_api_key")
        key = given[7:]
        admin_key = self.settings().resolved_admin_key()
        if admin_key is not None and hmac.compare_digest(key.encode(), admin_key.encode()):
            return Principal("admin", ADMIN_TENANT, "admin")
        known = await self._known(digest(key))
        if known is None or known[0].revoked is not None:
            raise GatewayError(401, "the API key is not valid (unknown or revoked)", code="invalid_api_key")
        return known[1]

    async def _known(self, key_digest: str) -> tuple[KeyRecord, Principal] | None:
        """The key's record and principal (built once per lookup, not per request)."""
        cached = self.key_cache.get(key_digest)
        now = time.monotonic()
        if cached is not None and now - cached[2] < self.config.key_cache_s:
            return cached[0], cached[1]
        try:
            record = await self.store.key_for(key_digest)
        except StoreUnavailable as exc:
            if self.config.on_store_error == "open" and cached is not None:
                return cached[0], cached[1]  # known before the store went away
            raise self._unavailable(exc) from None
        if record is None:
            return None
        if len(self.key_cache) > 100_000:
            self.key_cache.clear()
        principal = Principal.of(record)
        self.key_cache[key_digest] = (record, principal, now)
        return record, principal

    def forget_key(self, record: KeyRecord) -> None:
        """A key revoked through this gateway stops here at once (elsewhere within key_cache_s)."""
        self.key_cache.pop(record.digest, None)

    @staticmethod
    def authorize(principal: Principal, right: str) -> None:
        if right not in ROLE_RIGHTS[principal.role]:
            raise GatewayError(403, f"a key of role {principal.role} may not use this route", code="permission_denied")

    @staticmethod
    def check_model(principal: Principal, names: set[str]) -> None:
        """``names``: what the requested model is called (as asked, its group's name and key)."""
        if principal.models is not None and not names & set(principal.models):
            raise GatewayError(403, f"this key may not use the model {sorted(names)[0]!r}; its models: "
                                    f"{', '.join(principal.models)}", "model", "model_not_allowed")

    # ---- admission ---------------------------------------------------------------------------------
    def scopes(self, principal: Principal) -> list[Scope]:
        scopes = []
        if _limited(principal.limits):
            scopes.append(Scope(f"key:{principal.key_id}", principal.limits))
        tenant = self._tenant_scope(principal.tenant)
        if tenant is not None:
            scopes.append(tenant)
        return scopes

    def _tenant_scope(self, tenant: str) -> Scope | None:
        """The tenant's limits as a scope, built once per config version."""
        config = self.config
        if config is not self._scopes_of:
            self._scopes_of, self._tenant_scopes = config, {}
            for name, t in config.tenants.items():
                limits = Limits(rpm=t.rpm, tpm=t.tpm, max_concurrency=t.max_concurrency)
                if _limited(limits):
                    self._tenant_scopes[name] = Scope(f"tenant:{name}", limits)
        return self._tenant_scopes.get(tenant)

    def estimate_tokens(self, body: dict[str, Any], prompt: str) -> int:
        """Tokens charged at admission: the prompt's by its length, and the completion's limit."""
        return self.prompt_tokens(prompt) + self._completion_limit(body)

    def prompt_tokens(self, prompt: str) -> int:
        return math.ceil(len(prompt) / self.config.chars_per_token)

    def _completion_limit(self, body: dict[str, Any]) -> int:
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        completion = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 \
            else self.config.estimate_max_tokens
        n = body.get("n", 1)
        return completion * (n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1)

    async def check_budgets(self, principal: Principal) -> None:
        """429 insufficient_quota once a key's or its tenant's day or month is spent."""
        tenant = self.config.tenants.get(principal.tenant)
        budgets = [(f"key:{principal.key_id}", "key", principal.budget),
                   (f"tenant:{principal.tenant}", "tenant", tenant.budget if tenant is not None else None)]
        budgets = [b for b in budgets if b[2] is not None]
        if not budgets:
            return
        try:
            spent = await self.store.spent([scope for scope, _, _ in budgets], time.time())
        except StoreUnavailable as exc:
            if self.config.on_store_error == "open":
                return
            raise self._unavailable(exc) from None
        for (_, who, budget), (day, month) in zip(budgets, spent):
            assert budget is not None
            over = _over_budget(budget, day, month)
            if over:
                raise GatewayError(429, f"You exceeded your current quota: this {who}'s {over}. Ask an admin to "
                                        "raise the budget, or wait for the next period.", None,
                                   "insufficient_quota", kind="insufficient_quota")

    def admit_now(self, principal: Principal, scopes: list[Scope], cost: int) -> Ticket | None:
        """Admitted, or refused (429), where the store decides without a round trip (its windows are in this
        process, or a window share it holds has room); None: the store must be asked."""
        ticket = Ticket(f"{self.instance}-{next(self.request_ids)}", scopes, cost, {}, self.store)
        if not scopes:
            return ticket
        verdict = self.store.admit_here(ticket.request_id, scopes, cost, time.time(), self.lease_s)
        if verdict is None:
            return None
        if self._decided_here is not None:
            self._decided_here.inc()
        ticket.headers = rate_limit_headers(scopes, verdict)
        if not verdict.allowed:
            raise refusal(scopes, verdict, cost, ticket.headers)
        return ticket

    async def admit(self, principal: Principal, scopes: list[Scope], cost: int) -> Ticket:
        ticket = self.admit_now(principal, scopes, cost)
        return ticket if ticket is not None else await self._admit_in_store(principal, scopes, cost)

    async def _admit_in_store(self, principal: Principal, scopes: list[Scope], cost: int) -> Ticket:
        ticket = Ticket(f"{self.instance}-{next(self.request_ids)}", scopes, cost, {}, self.store)
        now = time.time()
        try:
            verdict = await self.store.admit(ticket.request_id, scopes, cost, now, self.lease_s)
        except StoreUnavailable as exc:
            self.room.forget()
            if self.config.on_store_error != "open":
                raise self._unavailable(exc) from None
            ticket.store = self.local
            verdict = await self.local.admit(ticket.request_id, scopes, cost, now, self.lease_s)
        else:
            if self._decided_in_store is not None:
                self._decided_in_store.inc()
            self.room.hear(scopes, verdict.states, time.monotonic())
        ticket.headers = rate_limit_headers(scopes, verdict)
        if not verdict.allowed:
            raise refusal(scopes, verdict, cost, ticket.headers)
        return ticket

    async def _admitted(self, admission: asyncio.Task[Ticket], forwarding: asyncio.Task[Any] | None) -> Ticket:
        """The admission's ticket. A refusal closes the request forwarded meanwhile; a client gone before the
        decision closes it too, and frees the slot the decision may still take."""
        try:
            return await asyncio.shield(admission)
        except BaseException:
            if forwarding is not None:
                forwarding.cancel()
                await asyncio.gather(forwarding, return_exceptions=True)
            if not admission.done():
                admission.add_done_callback(self._release_abandoned)
            raise

    def _release_abandoned(self, admission: asyncio.Task[Ticket]) -> None:
        if not admission.cancelled() and admission.exception() is None:
            self.settle(admission.result(), None)

    def settle(self, ticket: Ticket, used_tokens: int | None) -> None:
        """The request ended: its tokens corrected to what it used (when known) and its slot freed, by the store
        that admitted it (Redis: with this gateway's next script call, which settles before it decides, so a
        client's next request finds its slot free)."""
        if ticket.scopes:
            ticket.store.settle([Ended(ticket.request_id, ticket.scopes, ticket.charged, used_tokens)])

    def _unavailable(self, exc: StoreUnavailable) -> GatewayError:
        return GatewayError(503, f"the policy store is unavailable ({exc}); try again", code="policy_store_unavailable",
                            headers={"Retry-After": "1"})

    # ---- one request, start to end --------------------------------------------------------------------
    async def handle(self, request: web.Request, read_body: Callable[[], Awaitable[dict[str, Any]]],
                     table: RoutingTable,
                     forward: Callable[[dict[str, Any], OwnHeaders], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        """Authenticate and authorize (before the body is read), check budgets, admit, wait for a fair share
        of a saturated group; forward (while the admission is decided, when the windows have ample room); then
        settle, record and audit."""
        started = time.perf_counter()
        model, prompt = "", ""
        principal: Principal | None = None
        forwarding: asyncio.Task[web.StreamResponse] | None = None
        try:
            principal = await self.principal(request)
            self.authorize(principal, "infer")
            body = await read_body()
            model = body["model"] if isinstance(body.get("model"), str) else ""
            prompt = prompt_text(body)
            group = table.resolve(model) if model else None
            if group is not None:
                self.check_model(principal, {model, group.config.name, group.config.key})
            await self.check_budgets(principal)
            estimate = self.estimate_tokens(body, prompt)
            scopes = self.scopes(principal)
            decided = self.admit_now(principal, scopes, estimate)
            if decided is None:
                admission: asyncio.Task[Ticket] | None = None
                if self._overlaps(scopes, estimate, group):
                    forwarding = asyncio.ensure_future(self._forward(
                        principal, estimate, group, forward, body, lambda: _headers_of(admission)))
                admission = asyncio.ensure_future(self._admit_in_store(principal, scopes, estimate))
                decided = await self._admitted(admission, forwarding)
                if forwarding is not None and self.metrics is not None:
                    self.metrics.overlaps.labels("admitted").inc()
            ticket = decided
        except GatewayError as exc:
            if forwarding is not None and self.metrics is not None:
                self.metrics.overlaps.labels("refused" if exc.status == 429 else "unavailable").inc()
            decision = "limited" if exc.status == 429 else "denied"
            self._decided(request, principal, model, exc.status, decision, exc.code, prompt)
            raise
        reply: web.StreamResponse | None = None
        status = 500
        try:
            if forwarding is None:
                reply = await self._forward(principal, estimate, group, forward, body, lambda: _ready(ticket.headers))
            else:
                reply = await forwarding
            status = reply.status
            return reply
        except GatewayError as exc:
            status = exc.status
            raise
        finally:
            # The bookkeeping runs once the answer is on its way (the next turn of the event loop).
            asyncio.get_running_loop().call_soon(self._ended, request, reply, status, ticket, principal, model,
                                                 prompt, table, (time.perf_counter() - started) * 1000)

    async def _forward(self, principal: Principal, estimate: int, group: ModelGroup | None,
                       forward: Callable[[dict[str, Any], OwnHeaders], Awaitable[web.StreamResponse]],
                       body: dict[str, Any], headers: OwnHeaders) -> web.StreamResponse:
        """Forward, holding a fair share of the model group's upstreams."""
        if group is None:
            return await forward(body, headers)  # the proxy names the unknown model
        tenant = self.config.tenants.get(principal.tenant)
        async with self._queue(group).slot(
                _capacity(group), principal.tenant, tenant.weight if tenant is not None else 1.0, principal.priority,
                estimate, self.config.max_queued, self.config.queue_timeout_s):
            return await forward(body, headers)

    def _queue(self, group: ModelGroup) -> FairQueue:
        return self.queues.setdefault(group.config.key, FairQueue())

    def _overlaps(self, scopes: list[Scope], estimate: int, group: ModelGroup | None) -> bool:
        """Whether to forward while the admission is decided: the windows had ample room when this gateway
        last admitted into them (so a refusal is rare: other gateways must have used the room since), and the
        group has a free slot (nothing waits in its fair queue)."""
        if not scopes or group is None or not self.config.overlap_admission:
            return False
        queue = self._queue(group)
        if queue.waiting or queue.in_flight >= _capacity(group):
            return False
        return self.room.ample(scopes, estimate, time.monotonic())

    def _ended(self, request: web.Request, reply: web.StreamResponse | None, status: int, ticket: Ticket,
               principal: Principal, model: str, prompt: str, table: RoutingTable, latency_ms: float) -> None:
        """An admitted request ended: its tokens settled in the store, its usage recorded, its decision audited."""
        prompt_tokens, completion_tokens = self._usage(request, reply, prompt, status)
        self.settle(ticket, prompt_tokens + completion_tokens)
        group = table.resolve(model)
        replicas = len(group.upstreams) if group is not None else 1
        name = group.config.name if group is not None else model
        cost = self.costs.cost(name, prompt_tokens, completion_tokens, replicas, time.time())
        record = UsageRecord(time.time(), ticket.request_id, principal.key_id, principal.tenant, name,
                             request.get("upstream", ""), prompt_tokens, completion_tokens, cost, round(latency_ms, 3),
                             status)
        self.ledger.add(record)
        if self.metrics is not None:
            self.metrics.tenant_usage(principal.tenant, prompt_tokens, completion_tokens, cost)
        self._decided(request, principal, model, status, "allowed", None, prompt, record)

    def _usage(self, request: web.Request, reply: web.StreamResponse | None, prompt: str,
               status: int) -> tuple[int, int]:
        """(prompt, completion) tokens: as the answer reports them, else estimated (a stream's events, the
        prompt's length; nothing generated for an error)."""
        reported = reply_usage(reply) if reply is not None else None
        stream: StreamUsage | None = request.get("stream_usage")
        if reported is None and stream is not None and stream.usage is not None:
            reported = _usage_pair(stream.usage)
        if reported is not None:
            return reported
        if status >= 400:
            return 0, 0
        return self.prompt_tokens(prompt), stream.events if stream is not None else 0

    def _decided(self, request: web.Request, principal: Principal | None, model: str, status: int, decision: str,
                 reason: str | None, prompt: str, record: UsageRecord | None = None) -> None:
        if self.metrics is not None:
            self.metrics.tenant_decision(principal.tenant if principal else "unknown", decision)
        if self.audit is None:
            return
        fields: dict[str, Any] = {
            "key_id": principal.key_id if principal else None, "tenant": principal.tenant if principal else None,
            "route": request.path, "model": model, "status": status, "decision": decision}
        if reason:
            fields["reason"] = reason
        if record is not None:
            fields.update(prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens,
                          cost=round(record.cost, 8), latency_ms=record.latency_ms, upstream=record.upstream)
        if self.audit.config.include_prompts:
            fields["prompt"] = prompt
        self.audit.append("request", **fields)

    def audit_admin(self, request: web.Request, principal: Principal | None, status: int, **detail: Any) -> None:
        if self.audit is not None:
            self.audit.append("admin", key_id=principal.key_id if principal else None,
                              tenant=principal.tenant if principal else None, method=request.method,
                              route=request.path, status=status, **detail)


async def _headers_of(admission: asyncio.Task[Ticket] | None) -> dict[str, str]:
    assert admission is not None  # created before the forwarded request can be answered
    return (await admission).headers


async def _ready(headers: dict[str, str]) -> dict[str, str]:
    return headers


def _capacity(group: ModelGroup) -> int:
    return max(1, sum(u.config.max_concurrency for u in group.upstreams if u.healthy))


def _limited(limits: Limits) -> bool:
    return limits.rpm is not None or limits.tpm is not None or limits.max_concurrency is not None


def _over_budget(budget: BudgetConfig, day: Totals, month: Totals) -> str | None:
    for spent, limit, what in ((day.tokens, budget.daily_tokens, "daily tokens"),
                               (month.tokens, budget.monthly_tokens, "monthly tokens"),
                               (day.cost, budget.daily_cost, "daily cost"),
                               (month.cost, budget.monthly_cost, "monthly cost")):
        if limit is not None and spent >= limit:
            return f"{what}: {spent:g} of {limit:g} spent"
    return None


def _usage_pair(usage: Any) -> tuple[int, int] | None:
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (prompt, completion)):
        return None
    return prompt, completion


def reply_usage(reply: web.StreamResponse) -> tuple[int, int] | None:
    """(prompt, completion) tokens a whole JSON answer reports in its usage."""
    if not isinstance(reply, web.Response) or not reply.body or reply.content_type != "application/json":
        return None
    try:
        return _usage_pair(orjson.loads(reply.body).get("usage"))  # type: ignore[arg-type]
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        return None
