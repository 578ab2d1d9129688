"""What users get back: outputs per request and per choice, logprobs, finish reasons, latency marks.

Torch-free, shared by the engine's front end and the HTTP server.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

class RequestOutputKind(enum.Enum):
    """What each RequestOutput of a request holds (vLLM's names)."""

    CUMULATIVE = "cumulative"  # everything so far, copied: the caller may keep each one
    DELTA = "delta"  # only what is new since the previous output: streaming, no copies
    FINAL_ONLY = "final_only"  # one output, when the request has finished


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"
    ERROR = "error"


@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


# One generated position: token id -> Logprob (the sampled token plus the top-k).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """time.monotonic() marks of one request and what this output adds to the latency histograms, so that
    no consumer keeps state per request."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    num_generation_tokens: int = 0  # over all choices, so far (a DELTA output holds only the new ones)
    is_first_token: bool = False  # the first output that follows the request's first token
    inter_token_latencies: list[float] = field(default_factory=list)  # gaps between token steps since then


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    # One entry per prompt token, None for the first; set once the prompt is done (a DELTA output: once).
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    metrics: RequestMetrics | None = None
