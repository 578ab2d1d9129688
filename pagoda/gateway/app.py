"""The gateway's HTTP server (aiohttp): the OpenAI routes through the proxy (behind keys and rate limits when
the policy requires keys), its own /health, /metrics and /v1/models, and the admin routes (reload, rollback,
upstreams, drain, keys) behind the admin key or a key with an admin role."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
from aiohttp import web
from pydantic import ValidationError

from pagoda.gateway.config import GatewayConfig, GatewayConfigError, UpstreamConfig, parse_config
from pagoda.gateway.errors import GatewayError
from pagoda.gateway.metrics import GatewayMetrics
from pagoda.gateway.policy.guard import Guard, open_store
from pagoda.gateway.policy.keys import KeyRecord, KeySpec, Principal
from pagoda.gateway.policy.records import GROUP_BY
from pagoda.gateway.policy.store import StoreUnavailable
from pagoda.gateway.policy.usage import usage_rows
from pagoda.gateway.proxy import OwnHeaders, Proxy
from pagoda.gateway.state import GatewayState

logger = logging.getLogger(__name__)
OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
STATE = web.AppKey("state", GatewayState)
T = TypeVar("T")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise GatewayError(413, f"the request body is over {request.app[STATE].config.max_request_body_bytes} "
                                "bytes") from None
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError as exc:
        raise GatewayError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "the body must be a JSON object")
    request["raw_body"] = raw
    return body


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        return exc.response()
    except web.HTTPException as exc:  # aiohttp's own 404/405/413, in OpenAI's error shape
        if exc.status < 400:
            raise
        return GatewayError(exc.status, exc.reason or "error").response()


def build_app(state: GatewayState, proxy: Proxy, metrics: GatewayMetrics, guard: Guard) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=state.config.max_request_body_bytes)
    app[STATE] = state
    started = int(time.time())

    async def caller(request: web.Request, right: str) -> Principal | None:
        """The request's principal when keys are required (None when they are not), allowed ``right``."""
        if not guard.config.require_keys:
            return None
        principal = await guard.principal(request)
        guard.authorize(principal, right)
        return principal

    async def openai_route(request: web.Request) -> web.StreamResponse:
        table = state.table

        def forward(body: dict[str, Any], headers: OwnHeaders | None) -> Awaitable[web.StreamResponse]:
            return proxy.forward(request, table, body, request["raw_body"], headers)

        if guard.config.require_keys:
            reply = await guard.handle(request, lambda: _body(request), table, forward)
        else:
            reply = await forward(await _body(request), None)
        metrics.requests.labels(request.path, str(reply.status)).inc()
        return reply

    async def models(request: web.Request) -> web.Response:
        principal = await caller(request, "models")
        table = state.table
        allowed = None if principal is None or principal.models is None else set(principal.models)
        data = [{"id": name, "object": "model", "created": started, "owned_by": "pagoda-gateway",
                 "root": table.names[name]} for name in table.public_names()
                if allowed is None or name in allowed or table.names[name] in allowed]
        return _json({"object": "list", "data": data})

    async def health(request: web.Request) -> web.Response:
        groups = {g.key: sum(u.available() for u in g.upstreams) for g in state.table.groups.values()}
        ok = any(groups.values())
        return _json({"status": "ok" if ok else "unavailable", "available_upstreams": groups}, 200 if ok else 503)

    async def metrics_page(request: web.Request) -> web.Response:
        await caller(request, "read")
        return web.Response(body=metrics.render(state.table.all_upstreams()),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def admin(handler: Callable[[web.Request], Awaitable[web.Response]],
              right: str = "administer") -> Callable[[web.Request], Awaitable[web.Response]]:
        """An /admin/ route: the gateway's admin key, or a key whose role has ``right`` (reading or administering)."""
        async def guarded(request: web.Request) -> web.Response:
            principal = None
            try:
                if state.config.resolved_admin_key() is None and not guard.config.require_keys:
                    raise GatewayError(403, "the admin routes are off: start the gateway with an admin key")
                principal = await guard.principal(request)
                guard.authorize(principal, right)
                try:
                    reply = await handler(request)
                except (GatewayConfigError, ValueError) as exc:
                    raise GatewayError(400, str(exc)) from None
            except GatewayError as exc:
                guard.audit_admin(request, principal, exc.status)
                raise
            guard.audit_admin(request, principal, reply.status, **request.get("audit", {}))
            return reply
        return guarded

    async def reload(request: web.Request) -> web.Response:
        raw = await request.read()
        if raw:
            await state.apply(parse_config(orjson.loads(raw), "body"))
        else:
            await state.reload()
        return _json({"version": len(state.versions)})

    async def rollback(request: web.Request) -> web.Response:
        await state.rollback()
        return _json({"version": len(state.versions)})

    async def show_config(request: web.Request) -> web.Response:
        return _json({"version": len(state.versions), "config": state.config.model_dump(mode="json")})

    async def upstreams(request: web.Request) -> web.Response:
        return _json({"upstreams": [
            {"model": u.group_key, "url": u.url, "healthy": u.healthy, "draining": u.draining,
             "in_flight": u.in_flight, "breaker": u.breaker.state.name.lower(), "requests": u.requests,
             "errors": u.errors, "external_load": u.external_load, "kv_usage": u.kv_usage}
            for u in state.table.all_upstreams()]})

    async def add_upstream(request: web.Request) -> web.Response:
        body = await _body(request)
        model = _field(body, "model")
        upstream = UpstreamConfig.model_validate({k: v for k, v in body.items() if k != "model"})
        groups = [g.model_copy(update={"upstreams": [*g.upstreams, upstream]}) if g.key == model else g
                  for g in state.config.models]
        if all(g.key != model for g in state.config.models):
            raise GatewayError(404, f"no model group {model!r}", "model")
        await state.apply(_with_models(state.config, groups))
        return _json({"version": len(state.versions)})

    async def remove_upstream(request: web.Request) -> web.Response:
        body = await _body(request)
        model, url = _field(body, "model"), _field(body, "url").rstrip("/")
        groups = []
        for g in state.config.models:
            kept = [u for u in g.upstreams if not (g.key == model and u.base_url == url)]
            if g.key == model and len(kept) == len(g.upstreams):
                raise GatewayError(404, f"{url} is not an upstream of {model!r}", "url")
            if kept:
                groups.append(g.model_copy(update={"upstreams": kept}))
        await state.apply(_with_models(state.config, groups))
        return _json({"version": len(state.versions)})

    async def drain(request: web.Request) -> web.Response:
        body = await _body(request)
        url, on = _field(body, "url").rstrip("/"), body.get("drain", True)
        if not isinstance(on, bool):
            raise GatewayError(400, "drain must be true or false", "drain")
        matched = [u for u in state.table.all_upstreams() if u.url == url]
        if not matched:
            raise GatewayError(404, f"no upstream {url}", "url")
        for u in matched:
            u.draining = on
        return _json({"url": url, "draining": on, "in_flight": sum(u.in_flight for u in matched)})

    async def create_key(request: web.Request) -> web.Response:
        body = await _body(request)
        try:
            spec = KeySpec.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            name = ".".join(str(p) for p in first["loc"]) or None
            raise GatewayError(400, f"{name}: {first['msg']}", name) from None
        return _json(await _issue(spec), 201)

    async def _issue(spec: KeySpec) -> dict[str, Any]:
        key, record = KeyRecord.issue(spec)
        await _stored(guard.store.save_key(record))
        return {"key": key, **record.public()}

    async def create_key_audited(request: web.Request) -> web.Response:
        reply = await create_key(request)
        request["audit"] = {"target": orjson.loads(reply.body)["key_id"]}  # type: ignore[arg-type]
        return reply

    async def list_keys(request: web.Request) -> web.Response:
        return _json({"keys": [r.public() for r in await _stored(guard.store.keys())]})

    async def _record(request: web.Request) -> KeyRecord:
        key_id = request.match_info["key_id"]
        record = await _stored(guard.store.key_by_id(key_id))
        if record is None:
            raise GatewayError(404, f"no key {key_id!r}", "key_id")
        return record

    async def revoke_key(request: web.Request) -> web.Response:
        record = await _record(request)
        request["audit"] = {"target": record.key_id}
        if record.revoked is None:
            record.revoked = time.time()
            await _stored(guard.store.save_key(record))
            guard.forget_key(record)
        return _json(record.public())

    async def usage(request: web.Request) -> web.Response:
        """Rows of requests, tokens and cost per key, tenant or model over [start, end) (Unix seconds; default
        the last 24 hours), at the hour buckets the store keeps."""
        group_by = request.query.get("group_by", "tenant")
        if group_by not in GROUP_BY:
            raise GatewayError(400, f"group_by must be one of {', '.join(GROUP_BY)}", "group_by")
        now = time.time()
        bounds = []
        for name, default in (("start", now - 86400), ("end", now)):
            raw = request.query.get(name)
            try:
                bounds.append(float(raw) if raw is not None else default)
            except ValueError:
                raise GatewayError(400, f"{name} must be a Unix time in seconds", name) from None
        start, end = bounds
        if not start < end:
            raise GatewayError(400, "start must be before end", "start")
        await guard.ledger.flush()  # this gateway's latest records count too
        rows = usage_rows(await _stored(guard.store.usage(group_by, start, end)))
        return _json({"group_by": group_by, "start": start, "end": end, "data": rows})

    async def rotate_key(request: web.Request) -> web.Response:
        """A new key with the old one's tenant, role, models and limits; the old one is revoked."""
        record = await _record(request)
        if record.revoked is not None:
            raise GatewayError(409, f"key {record.key_id} is revoked", "key_id")
        issued = await _issue(record.spec())
        record.revoked = time.time()
        await _stored(guard.store.save_key(record))
        guard.forget_key(record)
        request["audit"] = {"target": record.key_id, "new_key_id": issued["key_id"]}
        return _json({**issued, "replaces": record.key_id}, 201)

    for path in OPENAI_ROUTES:
        app.router.add_post(path, openai_route)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_post("/admin/reload", admin(reload))
    app.router.add_post("/admin/rollback", admin(rollback))
    app.router.add_get("/admin/config", admin(show_config, "read"))
    app.router.add_get("/admin/upstreams", admin(upstreams, "read"))
    app.router.add_post("/admin/keys", admin(create_key_audited))
    app.router.add_get("/admin/usage", admin(usage, "read"))
    app.router.add_get("/admin/keys", admin(list_keys, "read"))
    app.router.add_delete("/admin/keys/{key_id}", admin(revoke_key))
    app.router.add_post("/admin/keys/{key_id}/rotate", admin(rotate_key))
    app.router.add_post("/admin/upstreams", admin(add_upstream))
    app.router.add_delete("/admin/upstreams", admin(remove_upstream))
    app.router.add_post("/admin/drain", admin(drain))
    return app


async def _stored(call: Awaitable[T]) -> T:
    try:
        return await call
    except StoreUnavailable as exc:
        raise GatewayError(503, f"the policy store is unavailable ({exc})", code="policy_store_unavailable",
                           headers={"Retry-After": "1"}) from None


def _field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise GatewayError(400, f"{name} must be a non-empty string", name)
    return value


def _with_models(config: GatewayConfig, groups: list[Any]) -> GatewayConfig:
    """A new config version with these groups, validated as a whole like a loaded one."""
    return parse_config(dict(config.model_dump(mode="json"), models=[g.model_dump(mode="json") for g in groups]))


async def serve(config: GatewayConfig, path: Path | None = None, ready: Callable[[int], None] | None = None) -> None:
    """Run until SIGINT/SIGTERM; SIGHUP reloads ``path``. ``ready`` gets the bound port."""
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=300)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        state = GatewayState(config, session, path)
        await state.apply(config)
        metrics = GatewayMetrics()
        store = open_store(config.policy)
        guard = Guard(lambda: state.config, store, metrics)
        app = build_app(state, Proxy(session, metrics), metrics, guard)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        logger.info("pagoda gateway on http://%s:%d: models %s", config.host, port, ", ".join(state.table.public_names()))
        state.start_probing()
        guard.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_reload_logged(state)))
        if ready is not None:
            ready(port)
        await stop.wait()
        await state.stop_probing()
        await runner.shutdown()  # stop taking requests, then let those in flight finish
        await runner.cleanup()
        await guard.stop()  # the last usage records flushed
        await store.close()


async def _reload_logged(state: GatewayState) -> None:
    try:
        await state.reload()
    except (GatewayConfigError, ValueError) as exc:
        logger.error("reload refused, the running config stays: %s", exc)
