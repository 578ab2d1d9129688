"""How the gateway answers about rate limits, as OpenAI does: the x-ratelimit-* headers of every admitted
request and the 429 of a refused one."""

from __future__ import annotations

import math

from pagoda.gateway.errors import GatewayError
from pagoda.gateway.policy.store import KIND_CONCURRENCY, KIND_REQUESTS, KIND_TOKENS, Scope, Verdict


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
    requests: tuple[int, int, float] | None = None
    tokens: tuple[int, int, float] | None = None
    for scope, state in zip(scopes, verdict.states):
        rpm, tpm = scope.limits.rpm, scope.limits.tpm
        if rpm is not None and (requests is None or rpm - state.requests < requests[1]):
            requests = (rpm, max(0, rpm - state.requests), state.requests_reset_s)
        if tpm is not None and (tokens is None or tpm - state.tokens < tokens[1]):
            tokens = (tpm, max(0, tpm - state.tokens), state.tokens_reset_s)
    headers: dict[str, str] = {}
    for kind, tightest in (("requests", requests), ("tokens", tokens)):
        if tightest is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(tightest[0])
            headers[f"x-ratelimit-remaining-{kind}"] = str(tightest[1])
            headers[f"x-ratelimit-reset-{kind}"] = duration(tightest[2])
    return headers


def refusal(scopes: list[Scope], verdict: Verdict, cost: int, headers: dict[str, str]) -> GatewayError:
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
