"""The hot path: one OpenAI request in, routed to an upstream, its answer passed back (SSE chunk by chunk).

Retries happen only when nothing reached the client yet and the upstream did not act on the request
(a connect error, a timeout before its answer, or a 429/503 answer), within the retry budget; then the next
upstream in the policy's order is tried, then the group's fallback models."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from pagoda.gateway.config import TimeoutConfig
from pagoda.gateway.errors import GatewayError
from pagoda.gateway.metrics import GatewayMetrics
from pagoda.gateway.policies import RouteContext, prefix_hashes
from pagoda.gateway.router import ModelGroup, RoutingTable
from pagoda.gateway.upstream import Upstream

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({429, 503})
# Upstream answer headers the gateway sets itself (hop-by-hop, framing, its own identity); the rest pass.
OWN_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer",
                         "upgrade", "proxy-authenticate", "date", "server", "x-request-id"})
RETRY_AFTER_S = "1"

# The gateway's own headers for the answer (the rate-limit headers), awaited once the upstream answered and
# before anything reaches the client: a request whose admission is still being decided is forwarded meanwhile,
# and its answer held back until it is admitted (a refusal raises, and the upstream request is closed).
OwnHeaders = Callable[[], Awaitable[dict[str, str]]]


@dataclass
class _Retryable:
    """An attempt that failed before anything was sent to the client; ``answer`` holds a 429/503 to pass
    on should no other upstream answer."""

    kind: str
    answer: web.Response | None = None


class Proxy:
    def __init__(self, session: aiohttp.ClientSession, metrics: GatewayMetrics) -> None:
        self.session = session
        self.metrics = metrics

    async def forward(self, request: web.Request, table: RoutingTable, body: dict[str, Any], raw: bytes,
                      headers: OwnHeaders | None = None) -> web.StreamResponse:
        model = body.get("model")
        if not isinstance(model, str):
            raise GatewayError(400, "model must be a string naming one of the gateway's models", "model")
        group = table.resolve(model)
        if group is None:
            raise GatewayError(404, f"the model {model!r} does not exist; models: {', '.join(table.public_names())}",
                               "model", "model_not_found")
        request_id = request.headers.get("x-request-id", "")[:128] or uuid.uuid4().hex
        stream = body.get("stream") is True
        ctx = _route_context(request, body, group, table)
        table.retry_budget.on_request()
        attempts, failures = 0, []
        for candidate_group in table.route_chain(group):
            for upstream in candidate_group.candidates(ctx):
                if attempts >= table.config.retries.max_attempts or (attempts and not table.retry_budget.try_spend()):
                    return self._give_up(failures, request_id)
                if attempts:
                    self.metrics.retries.labels(upstream.url).inc()
                attempts += 1
                outcome = await self._attempt(request, upstream, body, raw, model, stream, request_id,
                                              table.config.timeouts, headers)
                if not isinstance(outcome, _Retryable):
                    candidate_group.policy.routed(upstream, ctx)
                    request["upstream"] = upstream.url  # for the usage record
                    return outcome
                failures.append(outcome)
        return self._give_up(failures, request_id)

    def _give_up(self, failures: list[_Retryable], request_id: str) -> web.StreamResponse:
        answers = [f.answer for f in failures if f.answer is not None]
        if answers:
            return answers[-1]
        tried = ", ".join(f.kind for f in failures) or "none available"
        raise GatewayError(503, f"no healthy upstream could take the request ({tried})", None,
                           "service_unavailable", {"Retry-After": RETRY_AFTER_S, "X-Request-Id": request_id})

    async def _attempt(self, request: web.Request, upstream: Upstream, body: dict[str, Any], raw: bytes, model: str,
                       stream: bool, request_id: str, timeouts: TimeoutConfig,
                       own_headers: OwnHeaders | None) -> web.StreamResponse | _Retryable:
        if upstream.model != model:
            body = dict(body, model=upstream.model)
            raw = orjson.dumps(body)
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        key = upstream.config.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        upstream.in_flight += 1
        upstream.requests += 1
        upstream.breaker.on_send()
        started = time.perf_counter()
        verdict: bool | None = None  # for the breaker: success, failure, or none (the client left)
        try:
            try:
                answer = await asyncio.wait_for(
                    self.session.post(f"{upstream.url}{request.path}", data=raw, headers=headers,
                                      timeout=aiohttp.ClientTimeout(total=timeouts.total_s, connect=timeouts.connect_s)),
                    timeouts.first_byte_s)
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as exc:
                kind = "timeout" if isinstance(exc, asyncio.TimeoutError) else "connect"
                upstream.count_error(kind)
                verdict = False
                logger.warning("upstream %s: %s (%s)", upstream.url, kind, type(exc).__name__)
                return _Retryable(kind)
            async with answer:
                verdict = answer.status < 500
                if answer.status >= 500:
                    upstream.count_error("5xx")
                elif answer.status >= 400:
                    upstream.count_error("4xx")
                self.metrics.responses.labels(upstream.url, f"{answer.status // 100}xx").inc()
                passed = {k: v for k, v in answer.headers.items() if k.lower() not in OWN_HEADERS}
                passed["X-Request-Id"] = request_id
                if own_headers is not None:
                    passed.update(await own_headers())
                if answer.status in RETRYABLE_STATUS or not stream or answer.status != 200:
                    try:
                        content = await answer.read()
                    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                        # Cut before its whole answer: nothing reached the client, so another upstream may try.
                        upstream.count_error("cut")
                        verdict = False
                        logger.warning("upstream %s: answer cut (%s)", upstream.url, type(exc).__name__)
                        return _Retryable("cut")
                    reply = web.Response(status=answer.status, body=content, headers=passed)
                    return _Retryable(str(answer.status), reply) if answer.status in RETRYABLE_STATUS else reply
                reply, verdict = await self._relay_stream(request, answer, passed, upstream, timeouts.first_byte_s)
                return reply
        except asyncio.CancelledError:
            verdict = None  # the client went away: the upstream request is closed with the connection
            raise
        finally:
            upstream.in_flight -= 1
            self.metrics.latency.labels(upstream.url).observe(time.perf_counter() - started)
            if verdict is True:
                upstream.breaker.on_success()
            elif verdict is False:
                upstream.breaker.on_failure()
            else:
                upstream.breaker.on_abandoned()

    async def _relay_stream(self, request: web.Request, answer: aiohttp.ClientResponse, headers: dict[str, str],
                            upstream: Upstream, first_byte_s: float) -> tuple[web.StreamResponse, bool | None]:
        """Pass the upstream's SSE through as its chunks come. Once a byte went out, a failure cannot be retried:
        the client gets an SSE error event and the end of the stream. Returns the reply and the breaker's
        verdict: True (the stream ended), False (the upstream cut it), None (the client left first; the
        upstream request is closed so the replica aborts it)."""
        reply = web.StreamResponse(status=200, headers=headers)
        reply.headers["Cache-Control"] = "no-cache"
        await reply.prepare(request)
        chunks = answer.content.iter_any()
        wait: float | None = first_byte_s
        verdict: bool | None = True
        usage = request["stream_usage"] = StreamUsage()
        while True:
            try:
                chunk = await (asyncio.wait_for(chunks.__anext__(), wait) if wait else chunks.__anext__())
            except StopAsyncIteration:
                break
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                upstream.count_error("stream_cut")
                logger.warning("upstream %s cut a stream: %s", upstream.url, type(exc).__name__)
                event = {"error": {"message": f"the upstream stopped mid-stream ({type(exc).__name__})",
                                   "type": "upstream_error", "param": None, "code": "upstream_disconnected"}}
                chunk, verdict = b"data: " + orjson.dumps(event) + b"\n\n", False
            wait = None
            usage.feed(chunk)
            try:
                await reply.write(chunk)
            except (ConnectionError, RuntimeError):  # the client's connection is closing
                answer.close()
                return reply, None
            if verdict is False:
                break
        try:
            await reply.write_eof()
        except (ConnectionError, RuntimeError):
            return reply, None
        return reply, verdict


class StreamUsage:
    """What a relayed SSE stream says of its tokens: its data events (about one token each) and the usage
    object of its last chunk, when the client asked for one (stream_options.include_usage)."""

    def __init__(self) -> None:
        self.events = 0
        self.usage: dict[str, Any] | None = None
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        *events, self._tail = (self._tail + chunk).split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            self.events += 1
            if b'"usage"' in event:
                try:
                    usage = orjson.loads(event[6:]).get("usage")
                except (orjson.JSONDecodeError, AttributeError):
                    continue
                if isinstance(usage, dict):
                    self.usage = usage


def _route_context(request: web.Request, body: dict[str, Any], group: ModelGroup, table: RoutingTable) -> RouteContext:
    policy = group.config.policy
    if policy == "session":
        key = request.headers.get(table.config.session.header) or body.get("user")
        return RouteContext(session_key=key if isinstance(key, str) and key else None)
    if policy == "prefix":
        return RouteContext(prefix_hashes=prefix_hashes(prompt_text(body), table.config.prefix))
    return RouteContext()


def prompt_text(body: dict[str, Any]) -> str:
    """The request's leading text as the replica will see it (the messages in order), for prefix hashing."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            if isinstance(m, dict):
                content = m.get("content")
                if isinstance(content, list):
                    content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
                parts.append(f"{m.get('role', '')}\x1f{content if isinstance(content, str) else ''}\x1e")
        return "".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of prompts: the first one
    if isinstance(prompt, list):  # token ids
        return ",".join(str(t) for t in prompt)
    return prompt if isinstance(prompt, str) else ""
