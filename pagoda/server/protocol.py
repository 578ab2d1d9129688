"""Pydantic models of the OpenAI API requests Pagoda serves (plus vLLM's sampling extras).

Unknown fields are refused (``extra="forbid"``) so no parameter is ever silently
ignored; fields we know but do not implement yet are refused in ``to_sampling``.
Bounds come from ``api/params.py`` so the server and the engine agree.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from pagoda.api.params import (
    DEFAULT_MAX_TOKENS,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_SEQUENCE_CHARS,
    MAX_REPETITION_PENALTY,
    MAX_STOP_SEQUENCES,
    MAX_STOP_TOKEN_IDS,
    MIN_REPETITION_PENALTY,
)

MAX_PROMPTS_PER_REQUEST = 64  # prompts in one /v1/completions or /v1/embeddings call
MAX_SEED = 2**63 - 1
# Every integer that reaches the engine fits an int32: the wire codec and the tensors take no bigger ones.
MAX_INT32 = 2**31 - 1
MAX_NAME_CHARS = 256
MAX_TOOLS = 128
MAX_TOOL_CALLS_PER_MESSAGE = 128


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


def _no_lone_surrogates(text: str) -> str:
    # JSON may carry "\ud800" alone; the tokenizer (and any UTF-8 encoder) cannot take it.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"holds a lone UTF-16 surrogate at character {exc.start}; send valid Unicode") from None
    return text


# The bounds live in the types so that /openapi.json tells clients (and the fuzzer) what is valid.
Text = Annotated[str, AfterValidator(_no_lone_surrogates)]
Name = Annotated[Text, Field(max_length=MAX_NAME_CHARS)]
Count = Annotated[int, Field(ge=1, le=MAX_INT32)]
TokenId = Annotated[int, Field(ge=0, le=MAX_INT32)]
StopString = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_SEQUENCE_CHARS)]
StopType = Union[StopString, Annotated[list[StopString], Field(max_length=MAX_STOP_SEQUENCES)], None]
PromptText = Annotated[Text, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
PromptInput = Union[PromptText, Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS_PER_REQUEST)],
                    TokenIds, Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS_PER_REQUEST)]]


class SamplingFields(_Strict):
    """Sampling parameters shared by chat and completions (OpenAI names, then vLLM's extras)."""

    model: Name | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopType = None
    max_tokens: Count | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        default=None, max_length=MAX_LOGIT_BIAS_ENTRIES)
    seed: int | None = Field(default=None, ge=-MAX_SEED, le=MAX_SEED)
    user: Name | None = None
    # vLLM extras
    top_k: int | None = Field(default=None, ge=-1, le=MAX_INT32)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    min_tokens: int = Field(default=0, ge=0, le=MAX_INT32)
    ignore_eos: bool = False
    priority: int = Field(default=0, ge=-(2**31), le=2**31 - 1)
    stop_token_ids: list[TokenId] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Pagoda's: false opts the request out of speculative decoding (same output, no drafts verified).
    speculative_decoding: bool = True
    # vLLM's per-request prefix-cache salt; combined with the caller's API key (tenants never share blocks).
    cache_salt: Name | None = None
    # Constrained output: OpenAI's response_format, or vLLM's structured_outputs (json, regex, choice,
    # grammar, json_object); pagoda/server/structured.py checks them.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None


class ContentPart(_Strict):
    type: Literal["text"]
    text: Text


# OpenAI's function names: letters, digits, underscores and dashes, at most 64.
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class ToolFunction(_Strict):
    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none means no arguments
    strict: bool | None = None  # arguments always follow the schema here when a call is constrained


class Tool(_Strict):
    type: Literal["function"]
    function: ToolFunction


class ToolChoiceFunction(_Strict):
    name: FunctionName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: ToolChoiceFunction


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: FunctionName
    arguments: Text  # JSON text, as the API returned it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: Name
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients echo back fields like refusal / annotations

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Name | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOL_CALLS_PER_MESSAGE)] | None = None
    tool_call_id: Name | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=2048)
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # The deprecated forms of tools, refused with a pointer to them.
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    max_tokens: Count | None = DEFAULT_MAX_TOKENS
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    suffix: Text | None = None


class EmbeddingRequest(_Strict):
    model: Name | None = None
    input: PromptInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Count | None = None
    user: Name | None = None


class TokenizeRequest(_Strict):
    model: Name | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True


class DetokenizeRequest(_Strict):
    model: Name | None = None
    tokens: list[TokenId] = Field(max_length=1_000_000)


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
