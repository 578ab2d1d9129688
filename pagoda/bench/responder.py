"""A minimal OpenAI-compatible upstream that answers at once, for measuring what a gateway adds (and for
the gateway's fault tests: a fixed error status, a slow stream). Not a model server.

    python -m pagoda.bench.responder --port 9000 [--status 503] [--api-key K] [--stream-chunks 8 --chunk-delay-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import orjson
from aiohttp import web


def _completion(model: str, chat: bool) -> dict[str, object]:
    choice: dict[str, object] = {"index": 0, "finish_reason": "stop", "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": "ok"}
    else:
        choice["text"] = "ok"
    return {"id": "cmpl-responder", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def build_app(args: argparse.Namespace) -> web.Application:
    app = web.Application()
    seen = {"requests": 0}

    async def complete(request: web.Request) -> web.StreamResponse:
        seen["requests"] += 1
        body = orjson.loads(await request.read())
        echo = {"X-Request-Id": request.headers.get("X-Request-Id", ""), "X-Responder": args.name}
        status = args.status
        if args.api_key is not None and request.headers.get("Authorization") != f"Bearer {args.api_key}":
            status = 401
        if status != 200:
            error = {"error": {"message": f"responder answers {status}", "type": "api_error",
                               "param": None, "code": None}}
            return web.Response(status=status, body=orjson.dumps(error), content_type="application/json",
                                headers=echo)
        chat = request.path.endswith("/chat/completions")
        if not body.get("stream"):
            return web.Response(body=orjson.dumps(_completion(body.get("model", ""), chat)),
                                content_type="application/json", headers=echo)
        reply = web.StreamResponse(headers={**echo, "Content-Type": "text/event-stream"})
        await reply.prepare(request)
        for i in range(args.stream_chunks):
            delta = {"choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]}
            await reply.write(b"data: " + orjson.dumps(delta) + b"\n\n")
            if args.chunk_delay_ms:
                await asyncio.sleep(args.chunk_delay_ms / 1000)
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):  # as OpenAI: a last chunk with the usage
            usage = {"prompt_tokens": 1, "completion_tokens": args.stream_chunks, "total_tokens": 1 + args.stream_chunks}
            await reply.write(b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\n")
        await reply.write(b"data: [DONE]\n\n")
        await reply.write_eof()
        return reply

    async def models(request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "responder"} for m in args.model]
        return web.json_response({"object": "list", "data": data})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "requests": seen["requests"]})

    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        app.router.add_post(path, complete)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--model", action="append", default=None, help="model ids it lists (default: responder)")
    parser.add_argument("--name", default="responder", help="echoed in the X-Responder header")
    parser.add_argument("--status", type=int, default=200, help="answer every completion with this status")
    parser.add_argument("--api-key", default=None, help="answer 401 unless the request carries this bearer key")
    parser.add_argument("--stream-chunks", type=int, default=4)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    args.model = args.model or ["responder"]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(build_app(args), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
