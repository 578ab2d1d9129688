"""Chat and text completions: request -> SamplingParams -> engine -> OpenAI response or SSE stream."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar

from pagoda.api.outputs import CompletionOutput, PositionLogprobs, RequestOutput, RequestOutputKind
from pagoda.api.params import SamplingParams
from pagoda.engine.frontend.core_client import EngineClient
from pagoda.engine.frontend.errors import EngineDeadError, RequestRejected, StreamBacklogError
from pagoda.engine.frontend.tokenizer import Tokenizer
from pagoda.server.errors import APIError, error_body
from pagoda.server.request_inputs import Prompt, param_named
from pagoda.server.protocol import ChatCompletionRequest, CompletionRequest, StreamOptions
from pagoda.server.tool_parsers import ToolCallParser
from pagoda.server.tools import ToolUse

RETRY_AFTER_S = "1"
T = TypeVar("T")


# ---- running requests ----------------------------------------------------------------------------
async def run_one(client: EngineClient, request_id: str, prompt: Prompt, params: SamplingParams, priority: int,
                  cache_salt: str | None, kind: RequestOutputKind) -> AsyncIterator[RequestOutput]:
    try:
        async for out in client.generate(request_id, prompt.text, prompt.token_ids, params, priority, cache_salt,
                                         kind):
            yield out
    except RequestRejected as exc:
        raise rejected_error(exc, param_named(exc)) from None
    except EngineDeadError as exc:
        raise APIError(503, f"the engine is not available: {exc}", headers={"Retry-After": RETRY_AFTER_S}) from None
    except StreamBacklogError as exc:
        raise APIError(408, str(exc), code="client_too_slow") from None


def rejected_error(exc: RequestRejected, param: str | None) -> APIError:
    """The HTTP answer to a request the engine refused (or failed alone)."""
    if exc.kind == "queue_full":
        return APIError(429, str(exc), code="queue_full", headers={"Retry-After": RETRY_AFTER_S})
    if exc.kind == "internal":
        return APIError(500, f"the engine failed this request: {exc}", code="engine_error")
    return APIError(400, str(exc), param)


async def merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    # Bounded, so a slow reader backs up into each request's own stream, where the backlog limit sees it.
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue(maxsize=len(streams))

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
            await queue.put((i, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _generated(out: RequestOutput) -> int:
    """Tokens generated so far over the request's choices (a DELTA output's token_ids hold only the new)."""
    return out.metrics.num_generation_tokens if out.metrics is not None else 0


def _check_error(out: RequestOutput) -> None:
    if out.error:
        raise APIError(500, f"the engine failed this request: {out.error}")


# ---- response pieces -----------------------------------------------------------------------------
def _token_text(entry: Any) -> str:
    return entry.decoded_token if entry.decoded_token is not None else ""


def chat_logprobs(positions: list[PositionLogprobs], tokens: list[int], top: int) -> dict[str, Any]:
    content = []
    for pos, tid in zip(positions, tokens):
        chosen = pos[tid]
        text = _token_text(chosen)
        ranked = sorted(pos.items(), key=lambda kv: kv[1].rank)
        tops = [
            {"token": _token_text(lp), "logprob": lp.logprob, "bytes": list(_token_text(lp).encode())}
            for t, lp in ranked
            if not (t == tid and lp.rank > top)
        ][:top]
        content.append({"token": text, "logprob": chosen.logprob, "bytes": list(text.encode()), "top_logprobs": tops})
    return {"content": content}


def completion_logprobs(positions: list[PositionLogprobs], tokens: list[int], top: int, offset: int
                        ) -> dict[str, Any]:
    result: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for pos, tid in zip(positions, tokens):
        chosen = pos[tid]
        text = _token_text(chosen)
        result["tokens"].append(text)
        result["token_logprobs"].append(chosen.logprob)
        ranked = sorted(pos.items(), key=lambda kv: kv[1].rank)
        # As vLLM: the k most likely, and the sampled token always (so logprobs=0 gives just its entry).
        entries = {_token_text(lp): lp.logprob for _, lp in ranked[: max(top, 0)]}
        entries.setdefault(text, chosen.logprob)
        result["top_logprobs"].append(entries)
        result["text_offset"].append(offset)
        offset += len(text)
    return result


def echo_logprobs(prompt: Prompt, positions: list[PositionLogprobs | None], top: int, tokenizer: Tokenizer
                  ) -> dict[str, Any]:
    """The prompt's part of an echoed choice's logprobs: the first token has none."""
    first = tokenizer.decode(prompt.token_ids[:1], skip_special_tokens=False)
    head: dict[str, list[Any]] = {"tokens": [first], "token_logprobs": [None], "top_logprobs": [None],
                                  "text_offset": [0]}
    rest = completion_logprobs([p for p in positions[1:] if p is not None], prompt.token_ids[1:], top, len(first))
    return joined_logprobs(head, rest)


def joined_logprobs(head: dict[str, list[Any]] | None, tail: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return tail if head is None else {key: head[key] + tail[key] for key in tail}


def logprobs_text_end(lp: dict[str, list[Any]] | None) -> int:
    """The text offset after the last token of ``lp``."""
    return lp["text_offset"][-1] + len(lp["tokens"][-1]) if lp and lp["tokens"] else 0


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def _finish(o: CompletionOutput, called: bool = False) -> str | None:
    if o.finish_reason == "stop" and called:
        return "tool_calls"
    if o.finish_reason in ("stop", "length"):
        return o.finish_reason
    return o.finish_reason and "stop"


def chat_message(o: CompletionOutput, parser: ToolCallParser | None) -> tuple[dict[str, Any], bool]:
    """A choice's message, its tool calls parsed out when the request has tools; whether it called any."""
    if parser is None:
        return {"role": "assistant", "content": o.text}, False
    parser.feed(o.text, final=True)
    content, calls = parser.result()
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return message, parser.complete > 0


# ---- chat ----------------------------------------------------------------------------------------
@dataclass
class ChatJob:
    request_id: str
    model: str
    prompt: Prompt
    params: SamplingParams
    priority: int
    cache_salt: str | None
    include_usage: bool
    created: int
    continuous_usage: bool = False  # usage on every chunk (vLLM's stream_options.continuous_usage_stats)
    tools: ToolUse | None = None

    @classmethod
    def new(cls, model: str, prompt: Prompt, params: SamplingParams, req: ChatCompletionRequest,
            cache_salt: str | None, tools: ToolUse | None = None) -> ChatJob:
        include, continuous = usage_options(req.stream_options)
        return cls(f"chatcmpl-{uuid.uuid4().hex}", model, prompt, params, req.priority, cache_salt, include,
                   int(time.time()), continuous, tools)

    def tool_parser(self) -> ToolCallParser | None:
        return ToolCallParser(self.tools.format) if self.tools is not None and self.tools.parses else None

    def stream(self, client: EngineClient, kind: RequestOutputKind) -> AsyncIterator[RequestOutput]:
        return run_one(client, self.request_id, self.prompt, self.params, self.priority, self.cache_salt, kind)


def usage_options(options: StreamOptions | None) -> tuple[bool, bool]:
    """(a usage chunk at the end, usage on every chunk): the second only with the first, as in vLLM."""
    include = bool(options and options.include_usage)
    return include, include and bool(options and options.continuous_usage_stats)


async def chat_full(client: EngineClient, job: ChatJob) -> dict[str, Any]:
    final: RequestOutput | None = None
    async for out in job.stream(client, RequestOutputKind.FINAL_ONLY):
        final = out
    assert final is not None
    _check_error(final)
    top = job.params.logprobs
    choices = []
    for o in final.outputs:
        message, called = chat_message(o, job.tool_parser())
        choices.append({
            "index": o.index,
            "message": message,
            "logprobs": chat_logprobs(o.logprobs or [], o.token_ids, top or 0) if top is not None else None,
            "finish_reason": _finish(o, called),
        })
    completion_tokens = sum(len(o.token_ids) for o in final.outputs)
    return {
        "id": job.request_id,
        "object": "chat.completion",
        "created": job.created,
        "model": job.model,
        "choices": choices,
        "usage": usage(len(job.prompt.token_ids), completion_tokens, final.num_cached_tokens),
        "system_fingerprint": None,
    }


async def chat_stream(job: ChatJob, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
    base = {"id": job.request_id, "object": "chat.completion.chunk", "created": job.created, "model": job.model}
    extra = {"usage": None} if job.include_usage else {}
    top = job.params.logprobs
    for i in range(job.params.n):
        yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}], **extra})
    last: RequestOutput | None = None
    parsers = [job.tool_parser() for _ in range(job.params.n)]
    try:
        async for out in outputs:  # DELTA outputs: each choice appears when it changed, its end once
            last = out
            if out.error:
                yield sse(error_body(500, f"the engine failed this request: {out.error}"))
                break
            if job.continuous_usage:
                extra = {"usage": usage(len(job.prompt.token_ids), _generated(out), out.num_cached_tokens)}
            for o in out.outputs:
                lp = chat_logprobs(o.logprobs or [], o.token_ids, top or 0) if top is not None and o.token_ids else None
                parser = parsers[o.index]
                content, calls = parser.feed(o.text, final=o.finished) if parser is not None else (o.text, [])
                if content or lp:
                    yield sse({**base, "choices": [{"index": o.index, "delta": {"content": content},
                                                    "logprobs": lp, "finish_reason": None}], **extra})
                for call in calls:
                    yield sse({**base, "choices": [{"index": o.index, "delta": {"tool_calls": [call]},
                                                    "logprobs": None, "finish_reason": None}], **extra})
                if o.finished:
                    called = parser is not None and parser.complete > 0
                    yield sse({**base, "choices": [{"index": o.index, "delta": {}, "logprobs": None,
                                                    "finish_reason": _finish(o, called)}], **extra})
    except APIError as exc:
        yield sse(error_body(exc.status, exc.message, exc.param, exc.code))
    if job.include_usage and last is not None:
        yield sse({**base, "choices": [],
                   "usage": usage(len(job.prompt.token_ids), _generated(last), last.num_cached_tokens)})
    yield SSE_DONE


async def open_stream(stream: AsyncIterator[T]) -> T | None:
    """The first item (None when there is none): waiting for it turns a rejection into an HTTP status."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


async def prepend(first: T | None, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    if first is not None:
        yield first
    async for item in rest:
        yield item


# ---- completions ---------------------------------------------------------------------------------
@dataclass
class CompletionJob:
    request_id: str
    model: str
    prompts: list[Prompt]
    params: SamplingParams
    priority: int
    cache_salt: str | None
    echo: bool
    include_usage: bool
    created: int
    continuous_usage: bool = False  # usage on every chunk (vLLM's stream_options.continuous_usage_stats)

    @classmethod
    def new(cls, model: str, prompts: list[Prompt], params: SamplingParams, req: CompletionRequest,
            cache_salt: str | None) -> CompletionJob:
        include, continuous = usage_options(req.stream_options)
        return cls(f"cmpl-{uuid.uuid4().hex}", model, prompts, params, req.priority, cache_salt, req.echo, include,
                   int(time.time()), continuous)

    def streams(self, client: EngineClient, kind: RequestOutputKind) -> list[AsyncIterator[RequestOutput]]:
        return [run_one(client, f"{self.request_id}-{i}", p, self.params, self.priority, self.cache_salt, kind)
                for i, p in enumerate(self.prompts)]

    async def echo_texts(self, tokenizer: Tokenizer) -> list[str]:
        """What ``echo`` puts before each prompt's completion: its text, decoded when given as token ids."""
        if not self.echo:
            return [""] * len(self.prompts)
        return [p.text if p.text is not None else
                await asyncio.to_thread(tokenizer.decode, p.token_ids, skip_special_tokens=False)
                for p in self.prompts]


async def completion_full(client: EngineClient, job: CompletionJob, echo_text: list[str]) -> dict[str, Any]:
    finals: dict[int, RequestOutput] = {}
    async for i, out in merged(job.streams(client, RequestOutputKind.FINAL_ONLY)):
        if out.finished:
            finals[i] = out
    choices, completion_tokens, cached = [], 0, 0
    top = job.params.logprobs
    assert client.tokenizer is not None
    for i in range(len(job.prompts)):
        final = finals[i]
        _check_error(final)
        cached += final.num_cached_tokens
        head = (echo_logprobs(job.prompts[i], final.prompt_logprobs, top, client.tokenizer)
                if top is not None and final.prompt_logprobs is not None else None)
        for o in final.outputs:
            completion_tokens += len(o.token_ids)
            lp = None
            if top is not None:
                lp = joined_logprobs(head, completion_logprobs(o.logprobs or [], o.token_ids, top,
                                                               logprobs_text_end(head)))
            choices.append({"index": i * job.params.n + o.index, "text": echo_text[i] + o.text, "logprobs": lp,
                            "finish_reason": _finish(o)})
    prompt_tokens = sum(len(p.token_ids) for p in job.prompts)
    return {"id": job.request_id, "object": "text_completion", "created": job.created, "model": job.model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens, cached), "system_fingerprint": None}


async def completion_stream(job: CompletionJob, stream: AsyncIterator[tuple[int, RequestOutput]],
                            echo_text: list[str], tokenizer: Tokenizer) -> AsyncIterator[str]:
    base = {"id": job.request_id, "object": "text_completion", "created": job.created, "model": job.model}
    extra = {"usage": None} if job.include_usage else {}
    top = job.params.logprobs
    offsets: dict[int, int] = {}
    lasts: dict[int, RequestOutput] = {}
    echoed: set[int] = set()
    prompt_parts: dict[int, dict[str, list[Any]]] = {}  # echo with logprobs: each prompt's own, sent once
    prompt_tokens = sum(len(p.token_ids) for p in job.prompts)
    try:
        async for i, out in stream:
            lasts[i] = out
            if out.error:
                yield sse(error_body(500, f"the engine failed this request: {out.error}"))
                break
            if job.continuous_usage:
                extra = {"usage": usage(prompt_tokens, sum(_generated(r) for r in lasts.values()),
                                        sum(r.num_cached_tokens for r in lasts.values()))}
            if out.prompt_logprobs is not None and top is not None:
                prompt_parts[i] = echo_logprobs(job.prompts[i], out.prompt_logprobs, top, tokenizer)
            for o in out.outputs:  # DELTA outputs: each choice appears when it changed, its end once
                index = i * job.params.n + o.index
                text = o.text
                head = None
                if index not in echoed:
                    echoed.add(index)
                    text = echo_text[i] + text
                    head = prompt_parts.get(i)
                    offsets[index] = logprobs_text_end(head)
                lp = None
                if top is not None:
                    lp = joined_logprobs(head, completion_logprobs(o.logprobs or [], o.token_ids, top,
                                                                   offsets[index]))
                    offsets[index] = logprobs_text_end(lp) if lp["tokens"] else offsets[index]
                if text or o.token_ids or o.finished:
                    yield sse({**base, "choices": [{"index": index, "text": text, "logprobs": lp,
                                                    "finish_reason": _finish(o) if o.finished else None}], **extra})
    except APIError as exc:
        yield sse(error_body(exc.status, exc.message, exc.param, exc.code))
    if job.include_usage:
        completion_tokens = sum(_generated(out) for out in lasts.values())
        cached = sum(out.num_cached_tokens for out in lasts.values())
        yield sse({**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens, cached)})
    yield SSE_DONE
