"""The policy on a request's path: who sent it (its key), whether its role may use the route and its model,
and whether its key's and tenant's windows take it (with OpenAI's x-ratelimit-* headers either way)."""

from __future__ import annotations

import hmac
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from pagoda.gateway.config import GatewayConfig, PolicyConfig
from pagoda.gateway.errors import GatewayError
from pagoda.gateway.policy.keys import Limits, Principal, Role, digest
from pagoda.gateway.policy.store import (
    KIND_CONCURRENCY,
    KIND_REQUESTS,
    KIND_TOKENS,
    MemoryStore,
    RedisStore,
    Scope,
    Store,
    StoreUnavailable,
    Verdict,
)

ADMIN_TENANT = "admin"
# What each role may reach: inference (the OpenAI POST routes), reading (GET routes, admin views included),
# administering (every admin route).
ROLE_RIGHTS: dict[Role, frozenset[str]] = {
    "admin": frozenset({"infer", "read", "administer"}),
    "user": frozenset({"infer", "models"}),
    "read-only": frozenset({"read", "models"}),
}


def open_store(config: PolicyConfig) -> Store:
    if config.redis_url is None:
        return MemoryStore()
    return RedisStore(config.redis_url, config.redis_prefix, config.redis_timeout_s)


@dataclass
class Ticket:
    """An admitted request: what to settle and release when it ends."""

    request_id: str
    scopes: list[Scope]
    headers: dict[str, str]


class Guard:
    def __init__(self, settings: Callable[[], GatewayConfig], store: Store) -> None:
        self.settings = settings  # the live config (reloads change tenants' limits and the admin key)
        self.store = store

    @property
    def config(self) -> PolicyConfig:
        return self.settings().policy

    @property
    def lease_s(self) -> float:
        """A request in flight longer than its total timeout has been given up: its slot frees itself."""
        return self.settings().timeouts.total_s + 60

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
        try:
            record = await self.store.key_for(digest(key))
        except StoreUnavailable as exc:
            raise self._unavailable(exc) from None
        if record is None or record.revoked is not None:
            raise GatewayError(401, "the API key is not valid (unknown or revoked)", code="invalid_api_key")
        return Principal.of(record)

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

    def scopes(self, principal: Principal) -> list[Scope]:
        scopes = []
        if _limited(principal.limits):
            scopes.append(Scope(f"key:{principal.key_id}", principal.limits))
        tenant = self.config.tenants.get(principal.tenant)
        if tenant is not None and _limited(tenant):
            scopes.append(Scope(f"tenant:{principal.tenant}", tenant))
        return scopes

    def estimate_tokens(self, body: dict[str, Any], prompt: str) -> int:
        """Tokens charged at admission: the prompt's by its length, and the completion's limit."""
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        completion = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 \
            else self.config.estimate_max_tokens
        n = body.get("n", 1)
        choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
        return math.ceil(len(prompt) / self.config.chars_per_token) + completion * choices

    async def admit(self, principal: Principal, cost: int) -> Ticket:
        scopes = self.scopes(principal)
        ticket = Ticket(uuid.uuid4().hex, scopes, {})
        if not scopes:
            return ticket
        try:
            verdict = await self.store.admit(ticket.request_id, scopes, cost, time.time(), self.lease_s)
        except StoreUnavailable as exc:
            raise self._unavailable(exc) from None
        ticket.headers = rate_limit_headers(scopes, verdict)
        if not verdict.allowed:
            raise _refusal(scopes, verdict, cost, ticket.headers)
        return ticket

    async def finish(self, ticket: Ticket, used_tokens: int | None) -> None:
        """The request ended: its tokens corrected to what it used (when known) and its slot freed."""
        if not ticket.scopes:
            return
        try:
            if used_tokens is not None:
                await self.store.settle(ticket.request_id, ticket.scopes, used_tokens)
            await self.store.release(ticket.request_id, ticket.scopes)
        except StoreUnavailable:
            pass  # the lease expires on its own; the estimate stands

    def _unavailable(self, exc: StoreUnavailable) -> GatewayError:
        return GatewayError(503, f"the policy store is unavailable ({exc}); try again", code="policy_store_unavailable",
                            headers={"Retry-After": "1"})


def _limited(limits: Limits) -> bool:
    return limits.rpm is not None or limits.tpm is not None or limits.max_concurrency is not None


def duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes = int(seconds // 60)
    return f"{minutes}m{seconds - 60 * minutes:.0f}s"


def rate_limit_headers(scopes: list[Scope], verdict: Verdict) -> dict[str, str]:
    """The x-ratelimit-* trios of whichever scope has the least left of each kind."""
    headers: dict[str, str] = {}
    for kind, limit_of, used_of, reset_of in (
            ("requests", lambda s: s.limits.rpm, lambda st: st.requests, lambda st: st.requests_reset_s),
            ("tokens", lambda s: s.limits.tpm, lambda st: st.tokens, lambda st: st.tokens_reset_s)):
        tightest = None
        for scope, state in zip(scopes, verdict.states):
            limit = limit_of(scope)
            if limit is not None:
                left = max(0, limit - used_of(state))
                if tightest is None or left < tightest[1]:
                    tightest = (limit, left, reset_of(state))
        if tightest is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(tightest[0])
            headers[f"x-ratelimit-remaining-{kind}"] = str(tightest[1])
            headers[f"x-ratelimit-reset-{kind}"] = duration(tightest[2])
    return headers


def _refusal(scopes: list[Scope], verdict: Verdict, cost: int, headers: dict[str, str]) -> GatewayError:
    assert verdict.denied_scope is not None and verdict.denied_kind is not None
    scope, state = scopes[verdict.denied_scope], verdict.states[verdict.denied_scope]
    who = scope.name.split(":", 1)[0]
    retry = verdict.retry_after_s
    if verdict.denied_kind == KIND_REQUESTS:
        detail = f"requests per minute: limit {scope.limits.rpm}, used {state.requests}, requested 1"
    elif verdict.denied_kind == KIND_TOKENS:
        detail = f"tokens per minute: limit {scope.limits.tpm}, used {state.tokens}, requested {cost}"
        if scope.limits.tpm is not None and cost > scope.limits.tpm:
            detail += " (more than the limit: lower max_tokens or the prompt)"
    else:
        assert verdict.denied_kind == KIND_CONCURRENCY
        detail = f"requests in flight: limit {scope.limits.max_concurrency}, in flight {state.in_flight}"
    return GatewayError(429, f"Rate limit reached for this {who}'s {detail}. Please try again in {duration(retry)}.",
                        None, "rate_limit_exceeded",
                        {**headers, "Retry-After": str(max(1, math.ceil(retry)))})


def used_tokens(reply: web.StreamResponse) -> int | None:
    """The tokens an answer reports in its usage (a whole JSON answer; a stream's usage is not seen here)."""
    if not isinstance(reply, web.Response) or not reply.body or reply.content_type != "application/json":
        return None
    try:
        usage = orjson.loads(reply.body).get("usage")  # type: ignore[arg-type]
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        return None
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    return total if isinstance(total, int) and total >= 0 else None
