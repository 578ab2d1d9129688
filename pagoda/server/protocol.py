"""Pydantic models of the OpenAI API requests Pagoda serves (plus vLLM's sampling extras).

Unknown fields are refused (``extra="forbid"``) so no parameter is ever silently
ignored; fields we know but do not implement yet are refused in ``to_sampling``.
Bounds come from ``engine/request.py`` so the server and the engine agree.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from pagoda.engine.request import (MAX_LOGIT_BIAS_ENTRIES, MAX_LOGPROBS, MAX_N, MAX_STOP_SEQUENCE_CHARS,
                                  MAX_STOP_SEQUENCES)

MAX_PROMPTS_PER_REQUEST = 64  # prompts in one /v1/completions or /v1/embeddings call
MAX_SEED = 2**63 - 1


class UnsupportedParameter(ValueError):
    """A known OpenAI parameter that this server does not implement yet (400, naming it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


# The bounds live in the types so that /openapi.json tells clients (and the fuzzer) what is valid.
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_SEQUENCE_CHARS)]
StopType = Union[StopString, Annotated[list[StopString], Field(max_length=MAX_STOP_SEQUENCES)], None]
PromptText = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
PromptInput = Union[PromptText, Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS_PER_REQUEST)],
                    TokenIds, Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS_PER_REQUEST)]]


class SamplingFields(_Strict):
    """Sampling parameters shared by chat and completions (OpenAI names, then vLLM's extras)."""

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopType = None
    max_tokens: int | None = Field(default=None, ge=1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS_ENTRIES)
    seed: int | None = Field(default=None, ge=-MAX_SEED, le=MAX_SEED)
    user: str | None = Field(default=None, max_length=256)
    # vLLM extras
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    priority: int = Field(default=0, ge=-(2**31), le=2**31 - 1)
    stop_token_ids: list[int] | None = Field(default=None, max_length=256)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients echo back fields like refusal / annotations

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=2048)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    # Known OpenAI fields we refuse with a clear message until they are implemented.
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    suffix: str | None = None


class EmbeddingRequest(_Strict):
    model: str | None = None
    input: PromptInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = Field(default=None, max_length=256)


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)


def prompt_items(raw: PromptInput, param: str) -> list[str | list[int]]:
    """One item per prompt: a string or a token-id list; at most MAX_PROMPTS_PER_REQUEST, none empty."""
    if isinstance(raw, str):
        items: list[str | list[int]] = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        items = [list(raw)]  # type: ignore[arg-type]
    else:
        items = list(raw)  # type: ignore[arg-type]
    if not items:
        raise ValueError(f"{param} must not be empty")
    if len(items) > MAX_PROMPTS_PER_REQUEST:
        raise ValueError(f"{param}: at most {MAX_PROMPTS_PER_REQUEST} per request, got {len(items)}")
    if any(len(i) == 0 for i in items):
        raise ValueError(f"{param} entries must not be empty")
    return items
