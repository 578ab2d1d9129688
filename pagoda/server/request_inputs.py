"""An OpenAI request's prompt and parameters: fields -> SamplingParams, text -> token ids, and the length
checks, each failure a 400 naming its parameter before the engine sees the request."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from pagoda.api.limits import AdmissionError, ContextLengthError, check_context
from pagoda.api.params import SamplingParams, StructuredOutputsParams
from pagoda.engine.frontend.core_client import EngineClient
from pagoda.engine.frontend.tokenizer import Tokenizer
from pagoda.server.errors import APIError
from pagoda.server.structured import structured_outputs_of
from pagoda.server.tools import ToolUse
from pagoda.server.protocol import (
    MAX_INT32,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    UnsupportedParameter,
    prompt_items,
)

# Characters a prompt may hold per token of context before it is refused untokenized. Real text averages
# 3-5 characters a token; the cap only keeps text that could never fit from costing a tokenizer pass.
MAX_CHARS_PER_TOKEN = 32


@dataclass
class Prompt:
    text: str | None
    token_ids: list[int]


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None = None, structured: StructuredOutputsParams | None = None
                    ) -> SamplingParams:
    """OpenAI fields -> SamplingParams; every value error names its parameter (400)."""
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
    bias = None
    if req.logit_bias:
        bad = [k for k in req.logit_bias if not (k.isdecimal() and k.isascii() and int(k) <= MAX_INT32)]
        if bad:
            shown = ", ".join(repr(k[:40]) for k in bad[:20]) + (f" and {len(bad) - 20} more" if len(bad) > 20 else "")
            raise APIError(400, f"logit_bias keys must be token ids (non-negative integers as strings); "
                                f"invalid keys: {shown}", "logit_bias")
        bias = {int(k): v for k, v in req.logit_bias.items()}
    # Fields a client may send as null take SamplingParams' own defaults (defined there only).
    unset_is_default = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "min_p": req.min_p,
                        "repetition_penalty": req.repetition_penalty}
    try:
        return SamplingParams(
            **{name: value for name, value in unset_is_default.items() if value is not None},
            n=req.n,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=bias,
            seed=req.seed,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            include_stop_str_in_output=req.include_stop_str_in_output,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens,
            structured_outputs=structured or structured_outputs_of(req),
            speculative_decoding=req.speculative_decoding,
        )
    except ValueError as exc:
        raise APIError(400, str(exc), param_named(exc)) from None


def param_named(exc: Exception) -> str | None:
    """Engine-side checks start their message with the parameter's name."""
    head = str(exc).split(" ", 1)[0]
    return head if head.isidentifier() else None


def chat_params(req: ChatCompletionRequest, tools: ToolUse | None) -> SamplingParams:
    for name in ("functions", "function_call"):
        if getattr(req, name) is not None:
            raise UnsupportedParameter(name, f"{name} is deprecated and not supported; use tools and tool_choice")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return sampling_params(req, max_tokens, logprobs, structured=tools.constraint() if tools else None)


def completion_params(req: CompletionRequest) -> SamplingParams:
    if req.suffix is not None:
        raise UnsupportedParameter("suffix", "suffix is not supported (this model has no fill-in-the-middle mode)")
    if req.best_of is not None and req.best_of != req.n:
        raise UnsupportedParameter("best_of", "best_of other than n is not supported yet")
    # As vLLM: echo with logprobs gives the prompt tokens' logprobs too (null for the first).
    return sampling_params(req, req.max_tokens, req.logprobs, req.logprobs if req.echo else None)


def check_chars(count: int, max_model_len: int, param: str) -> None:
    limit = max_model_len * MAX_CHARS_PER_TOKEN
    if count > limit:
        raise APIError(400, f"{param} holds {count} characters; this model's context of {max_model_len} tokens "
                            f"never takes more than {limit}", param, "context_length_exceeded")


async def encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    # Off the event loop: a long text must not stall /health or other requests' streams.
    return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens)


async def completion_prompts(req: CompletionRequest, client: EngineClient) -> list[Prompt]:
    assert client.tokenizer is not None and client.info is not None
    try:
        raw = prompt_items(req.prompt, "prompt")
    except ValueError as exc:
        raise APIError(400, str(exc), "prompt") from None
    prompts = []
    vocab = client.info.vocab_size
    for item in raw:
        if isinstance(item, str):
            check_chars(len(item), client.info.max_model_len, "prompt")
            prompts.append(Prompt(item, await encode(client.tokenizer, item)))
        else:
            bad = [t for t in item if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}", "prompt")
            prompts.append(Prompt(None, list(item)))
    return prompts


def check_length(prompt: Prompt, params: SamplingParams, max_model_len: int, what: str) -> None:
    try:
        check_context(len(prompt.token_ids), params.max_tokens, max_model_len, what)
    except ContextLengthError as exc:
        raise APIError(400, str(exc), "messages" if what == "messages" else "prompt", "context_length_exceeded") from None
    except AdmissionError as exc:
        raise APIError(400, str(exc), "messages" if what == "messages" else "prompt") from None
