"""ASGI guards in front of every route: the request-body cap and the Host-header check.

Pure ASGI (no BaseHTTPMiddleware) so streaming responses and disconnect messages pass
through untouched.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from pagoda.server.access import is_loopback
from pagoda.server.errors import error_body

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _send_error(send: Send, status: int, message: str, param: str | None = None) -> None:
    body = json.dumps(error_body(status, message, param)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413 before any of it is parsed. The body is read here (it would
    be read whole by the route anyway) and replayed, so the route's later ``receive`` calls still see the
    client's disconnect."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"the request body is larger than this server accepts ({self.max_bytes} bytes)"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_error(send, 413, too_large)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _send_error(send, 413, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _host_name(header: str) -> str:
    """'Host' value -> its name without the port ('[::1]:8000' -> '::1')."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0].lower()
    return header.rsplit(":", 1)[0].lower() if header.count(":") == 1 else header.lower()


def allowed_host_names(bind_host: str, allowed_hosts: str | None) -> set[str] | None:
    """The Host names to accept; None accepts any. A loopback bind accepts only loopback names by default,
    so a web page whose DNS name is rebound to 127.0.0.1 cannot reach the server from a browser."""
    if allowed_hosts is not None:
        names = {h.strip().lower() for h in allowed_hosts.split(",") if h.strip()}
        return None if "*" in names else names
    if not is_loopback(bind_host):
        return None
    return {"localhost", "127.0.0.1", "::1", bind_host.lower()}


class HostCheckMiddleware:
    def __init__(self, app: ASGIApp, allowed: set[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if _host_name(header) not in self.allowed:
            await _send_error(send, 400, f"the Host header {header[:100]!r} is not one this server answers to "
                                         "(see --allowed-hosts)")
            return
        await self.app(scope, receive, send)
