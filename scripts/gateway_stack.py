"""Which HTTP server and client the gateway's hot path should use, by measurement: the same minimal
pass-through proxy (read the body, POST it upstream, return the answer) on several stacks, each put in front
of the instant responder at the same open-loop rate as `pagoda bench gateway`, and its added latency.

    python scripts/gateway_stack.py --rate 500 --duration-s 5

Stacks: aiohttp server + aiohttp client (what pagoda.gateway uses); uvicorn (uvloop, httptools) raw ASGI +
httpx; uvicorn raw ASGI + aiohttp client; FastAPI on uvicorn + httpx.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack

from fastapi import FastAPI, Request, Response  # at module level: FastAPI resolves the routes' annotations here

from pagoda.bench.gateway import Target, _service, measure
from pagoda.bench.startup import _free_port

STACKS = ("aiohttp+aiohttp", "uvicorn+httpx", "uvicorn+aiohttp", "fastapi+httpx")


def _serve(stack: str, port: int, upstream: str) -> None:
    """Run one stack's proxy until killed."""
    path = "/v1/chat/completions"
    if stack == "aiohttp+aiohttp":
        import aiohttp
        from aiohttp import web

        async def make_session(app: web.Application) -> None:
            app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

        async def proxy(request: web.Request) -> web.Response:
            async with request.app["session"].post(upstream + path, data=await request.read(),
                                                   headers={"Content-Type": "application/json"}) as answer:
                return web.Response(status=answer.status, body=await answer.read(), content_type="application/json")

        async def health(request: web.Request) -> web.Response:
            return web.Response(text="ok")

        app = web.Application()
        app.on_startup.append(make_session)
        app.router.add_post(path, proxy)
        app.router.add_get("/health", health)
        import uvloop

        uvloop.install()
        web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)
        return
    import uvicorn

    client: dict[str, object] = {}

    async def forward(body: bytes) -> tuple[int, bytes]:
        if stack.endswith("httpx"):
            import httpx

            if "c" not in client:  # made once, inside the server's event loop
                client["c"] = httpx.AsyncClient(limits=httpx.Limits(max_connections=None))
            http = client["c"]
            answer = await http.post(upstream + path, content=body, headers={"Content-Type": "application/json"})  # type: ignore[attr-defined]
            return answer.status_code, answer.content
        import aiohttp

        if "c" not in client:
            client["c"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        session = client["c"]
        async with session.post(upstream + path, data=body, headers={"Content-Type": "application/json"}) as answer:  # type: ignore[attr-defined]
            return answer.status, await answer.read()

    if stack == "fastapi+httpx":
        api = FastAPI()

        @api.post(path)
        async def proxy_route(request: Request) -> Response:
            status, content = await forward(await request.body())
            return Response(content, status_code=status, media_type="application/json")

        @api.get("/health")
        async def health_route() -> dict[str, str]:
            return {"status": "ok"}

        uvicorn.run(api, host="127.0.0.1", port=port, log_level="warning", access_log=False, loop="uvloop",
                    http="httptools")
        return

    async def asgi(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status, content = (200, b"ok") if scope["path"] == "/health" else await forward(body)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})

    uvicorn.run(asgi, host="127.0.0.1", port=port, log_level="warning", access_log=False, loop="uvloop",
                http="httptools", lifespan="off")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--serve", choices=STACKS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(args.serve, args.port, args.upstream)
        return
    with ExitStack() as stack:
        port = _free_port()
        upstream = f"http://127.0.0.1:{port}"
        stack.enter_context(_service("responder", [sys.executable, "-m", "pagoda.bench.responder", "--port", str(port)],
                                     f"{upstream}/health"))
        targets = [Target("direct", upstream, {})]
        for name in STACKS:
            proxy_port = _free_port()
            url = f"http://127.0.0.1:{proxy_port}"
            stack.enter_context(_service(name, [sys.executable, __file__, "--serve", name, "--port", str(proxy_port),
                                                "--upstream", upstream], f"{url}/health"))
            targets.append(Target(name, url, {}))
        rows: dict[str, list[tuple[float, float]]] = {t.name: [] for t in targets}
        for round_ in range(args.repeats):
            for target in targets[round_ % len(targets):] + targets[: round_ % len(targets)]:
                result = measure(target, args.rate, args.duration_s, 1.0)
                rows[target.name].append((result.p50_ms, result.p99_ms))
    direct_p50 = min(p50 for p50, _ in rows["direct"])
    direct_p99 = min(p99 for _, p99 in rows["direct"])
    print(f"{'stack':<18}{'p50 ms':>9}{'p99 ms':>9}{'+p50 ms':>9}{'+p99 ms':>9}   at {args.rate:.0f} req/s")
    for name, values in rows.items():
        p50, p99 = min(v[0] for v in values), min(v[1] for v in values)
        print(f"{name:<18}{p50:>9.3f}{p99:>9.3f}{p50 - direct_p50:>9.3f}{p99 - direct_p99:>9.3f}")


if __name__ == "__main__":
    main()
