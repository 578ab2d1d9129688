"""The FastAPI app: OpenAI routes, auth, request ids, health, metrics and the chat page.

The engine core runs in its own process behind ``EngineClient``; this process only
parses, tokenizes, detokenizes and writes responses, so ``/health`` and
``/metrics`` answer while the model is busy.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pagoda import __version__
from pagoda.api.limits import AdmissionError, QueueFullError, check_queue_room
from pagoda.api.outputs import RequestOutputKind
from pagoda.config import EngineConfig
from pagoda.engine.frontend.core_client import EngineClient
from pagoda.engine.frontend.tokenizer import ChatTemplateError
from pagoda.server import request_inputs, serving
from pagoda.server.access import check_exposure, load_api_keys, tenant_salt
from pagoda.server.embeddings import Embedder
from pagoda.server.errors import APIError, error_response, install_error_handlers
from pagoda.server.guards import BodyLimitMiddleware, HostCheckMiddleware, allowed_host_names
from pagoda.server.metrics import ServerMetrics
from pagoda.server.tool_parsers import TOOL_FORMATS
from pagoda.server.tools import ToolUse, render_messages, template_knows_tools, tool_use_of
from pagoda.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)

logger = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
T = TypeVar("T")


@dataclass
class ServerState:
    config: EngineConfig
    client: EngineClient
    metrics: ServerMetrics
    model_names: list[str]
    api_keys: list[bytes]
    embedder: Embedder | None = None
    draining: bool = False
    in_flight: set[str] = field(default_factory=set)


class RequestIdMiddleware:
    """Echo ``X-Request-Id`` (or a fresh one) on every response. Pure ASGI, so streaming and
    disconnects pass through untouched."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")[:128]
        request_id = given or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_id)


def create_app(config: EngineConfig, client: EngineClient | None = None) -> FastAPI:
    served = config.server_config.served_model_name or config.model_config.model
    metrics = ServerMetrics(served)
    client = client or EngineClient(config)
    client.on_stats, client.on_output = metrics.update_stats, metrics.observe_output
    client.on_restart = metrics.engine_restarted
    sc = config.server_config
    state = ServerState(config, client, metrics, [served], load_api_keys(sc))
    check_exposure(sc, bool(state.api_keys))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await client.start()
        assert client.info is not None
        if client.info.model_name not in state.model_names:
            state.model_names.append(client.info.model_name)
        state.embedder = Embedder(client)
        cc = config.cache_config
        metrics.set_cache_config(cc.block_size, client.info.num_blocks, cc.enable_prefix_caching, client.info.dtype)
        try:
            yield
        finally:
            await client.shutdown()

    app = FastAPI(title="Pagoda", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible LLM serving (Pagoda)")
    app.state.pagoda = state
    install_error_handlers(app)
    # Added innermost first: the Host check runs before CORS, CORS before the body is read.
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=sc.max_request_body_bytes)
    if sc.allowed_origins:
        origins = [o.strip() for o in sc.allowed_origins.split(",") if o.strip()]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id", "Retry-After"], max_age=600)
    hosts = allowed_host_names(sc.host, sc.allowed_hosts)
    if hosts is not None:
        app.add_middleware(HostCheckMiddleware, allowed=hosts)
    bearer = HTTPBearer(auto_error=False)

    async def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> bytes | None:
        """The caller's key (None when the server has none), after checking it."""
        if not state.api_keys:
            return None
        given = credentials.credentials.encode() if credentials else b""
        # Compare with every key, always: the time taken does not tell which key came close.
        matched = False
        for key in state.api_keys:
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return given

    def check_model(name: str | None) -> str:
        if name is not None and name not in state.model_names:
            raise APIError(404, f"The model '{name}' does not exist; this server serves {state.model_names[0]!r}",
                           "model", "model_not_found")
        return state.model_names[0]

    def check_capacity(n: int) -> None:
        if state.draining:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": serving.RETRY_AFTER_S})
        if not client.is_alive:
            raise APIError(503, f"the engine is not available: {client.unavailable_reason}",
                           headers={"Retry-After": serving.RETRY_AFTER_S})
        waiting = client.num_unfinished - client.stats.num_running
        try:
            check_queue_room(waiting, n, config.scheduler_config.max_queued_requests)
        except AdmissionError as exc:
            raise APIError(400, str(exc), "n", "too_many_sequences") from None
        except QueueFullError as exc:
            raise APIError(429, str(exc), code="queue_full", headers={"Retry-After": serving.RETRY_AFTER_S}) from None

    async def until_disconnect(request: Request, work: Awaitable[T]) -> T | Response:
        """Run ``work``; if the client goes away first, cancel it (which aborts its engine requests)."""
        task = asyncio.ensure_future(work)

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return Response(status_code=499)

    tool_format = TOOL_FORMATS[sc.tool_call_parser]

    async def render_chat(messages: list[ChatMessage], add_generation_prompt: bool, tools: ToolUse | None
                          ) -> request_inputs.Prompt:
        assert client.tokenizer is not None and client.info is not None
        request_inputs.check_chars(sum(len(m.text()) + len(m.name or "") + sum(
            len(c.function.arguments) for c in m.tool_calls or []) for m in messages),
                                   client.info.max_model_len, "messages")
        rendered, extra = render_messages(messages, tools, tool_format,
                                          template_knows_tools(client.tokenizer.chat_template))
        try:
            text = client.tokenizer.apply_chat_template(rendered, add_generation_prompt, **extra)
        except ChatTemplateError as exc:
            raise APIError(400, str(exc), "messages") from None
        ids = await request_inputs.encode(client.tokenizer, text, add_special_tokens=False)
        return request_inputs.Prompt(text, ids)

    # ---- pages and probes --------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health() -> JSONResponse:
        if not client.is_alive:
            status = "engine_restarting" if client.restarting else "engine_dead"
            return JSONResponse({"status": status, "detail": client.unavailable_reason,
                                 "engine_restarts": client.restarts.total}, status_code=503)
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        info = client.info
        embed = state.embedder.name if state.embedder else None
        return {
            "object": "list",
            "data": [
                {
                    "id": state.model_names[0],
                    "object": "model",
                    "created": 0,
                    "owned_by": "pagoda",
                    "max_model_len": info.max_model_len if info else None,
                    "embedding_model": embed,
                }
            ],
        }

    # ---- generation --------------------------------------------------------------------------
    # Each handler's work runs under until_disconnect from the start: a client that leaves while its
    # request waits in the queue or prefills has it aborted at once.
    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request, key: bytes | None = Depends(authorize)) -> Any:
        async def work() -> Any:
            model = check_model(req.model)
            tools = tool_use_of(req, tool_format)
            params = request_inputs.chat_params(req, tools)
            prompt = await render_chat(req.messages, req.add_generation_prompt, tools)
            assert client.info is not None
            request_inputs.check_length(prompt, params, client.info.max_model_len, "messages")
            check_capacity(params.n)
            metrics.observe_params(params.n, params.max_tokens or client.info.max_model_len - len(prompt.token_ids))
            job = serving.ChatJob.new(model, prompt, params, req, tenant_salt(key, req.cache_salt), tools)
            if not req.stream:
                return await serving.chat_full(client, job)
            stream = job.stream(client, RequestOutputKind.DELTA)
            first = await serving.open_stream(stream)  # a rejection becomes a status, not a broken stream
            return StreamingResponse(serving.chat_stream(job, serving.prepend(first, stream)),
                                     media_type="text/event-stream")

        return await until_disconnect(request, work())

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request, key: bytes | None = Depends(authorize)) -> Any:
        async def work() -> Any:
            model = check_model(req.model)
            params = request_inputs.completion_params(req)
            prompts = await request_inputs.completion_prompts(req, client)
            assert client.info is not None
            for p in prompts:
                request_inputs.check_length(p, params, client.info.max_model_len, "prompt")
            check_capacity(params.n * len(prompts))
            for p in prompts:
                metrics.observe_params(params.n, params.max_tokens or client.info.max_model_len - len(p.token_ids))
            job = serving.CompletionJob.new(model, prompts, params, req, tenant_salt(key, req.cache_salt))
            assert client.tokenizer is not None
            echo = await job.echo_texts(client.tokenizer)
            if not req.stream:
                return await serving.completion_full(client, job, echo)
            stream = serving.merged(job.streams(client, RequestOutputKind.DELTA))
            first = await serving.open_stream(stream)
            return StreamingResponse(serving.completion_stream(job, serving.prepend(first, stream), echo, client.tokenizer),
                                     media_type="text/event-stream")

        return await until_disconnect(request, work())

    # ---- embeddings and tokens ---------------------------------------------------------------
    @app.post("/v1/embeddings", dependencies=[Depends(authorize)])
    async def embeddings(req: EmbeddingRequest, request: Request) -> Any:
        model = check_model(req.model)
        if state.embedder is None:
            raise APIError(503, "no embedding model is loaded")
        return await until_disconnect(request, state.embedder.respond(req, model))

    @app.post("/tokenize", dependencies=[Depends(authorize)])
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        check_model(req.model)
        assert client.tokenizer is not None and client.info is not None
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "send exactly one of prompt or messages", "prompt")
        if req.messages is not None:
            ids = (await render_chat(req.messages, req.add_generation_prompt, None)).token_ids
        else:
            prompt = req.prompt or ""
            request_inputs.check_chars(len(prompt), client.info.max_model_len, "prompt")
            ids = await request_inputs.encode(client.tokenizer, prompt, add_special_tokens=req.add_special_tokens)
        return {"count": len(ids), "max_model_len": client.info.max_model_len, "tokens": ids}

    @app.post("/detokenize", dependencies=[Depends(authorize)])
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        check_model(req.model)
        assert client.tokenizer is not None and client.info is not None
        bad = [t for t in req.tokens if not 0 <= t < client.info.vocab_size]
        if bad:
            raise APIError(400, f"tokens outside the vocabulary [0, {client.info.vocab_size}): {bad[:5]}", "tokens")
        text = await asyncio.to_thread(client.tokenizer.decode, req.tokens, False)
        return {"prompt": text}

    @app.exception_handler(404)
    async def not_found(_: Request, __: Exception) -> JSONResponse:
        return error_response(404, "no such route")

    return app

