"""Records exchanged between the engine core and its front end, and their msgpack codec (ZeroMQ frames;
nothing is pickled). Kept free of torch so the server process stays light.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import msgpack

from pagoda.api.outputs import Logprob, PositionLogprobs
from pagoda.api.params import SamplingParams


def pack(message: list[Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(frame: bytes) -> list[Any]:
    # Token ids are map keys in logit_bias: allow integer keys.
    return msgpack.unpackb(frame, raw=False, strict_map_key=False)


def params_to_wire(params: SamplingParams) -> dict[str, Any]:
    return dataclasses.asdict(params)


def params_from_wire(fields: dict[str, Any]) -> SamplingParams:
    return SamplingParams(**fields)


@dataclass
class CoreOutput:
    """What one child request gained in one step (or how it ended)."""

    request_id: str  # the child's id (the parent's id when n == 1)
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None  # time.monotonic(), comparable across local processes
    # Prompt logprobs this step computed: of the tokens after the chunk's positions (so never position 0).
    prompt_logprobs: list[PositionLogprobs] | None = None

    def to_wire(self) -> list[Any]:
        return [self.request_id, self.new_token_ids, _positions_to_wire(self.new_logprobs), self.finish_reason,
                self.stop_reason, self.error, self.num_cached_tokens, self.first_scheduled_time,
                _positions_to_wire(self.prompt_logprobs)]

    @classmethod
    def from_wire(cls, fields: list[Any]) -> CoreOutput:
        rid, tokens, logprobs, finish, stop, error, cached, scheduled, prompt_logprobs = fields
        return cls(rid, list(tokens), _positions_from_wire(logprobs), finish, stop, error, int(cached), scheduled,
                   _positions_from_wire(prompt_logprobs))


def _positions_to_wire(positions: list[PositionLogprobs] | None) -> list[Any] | None:
    if positions is None:
        return None
    return [[[tid, lp.logprob, lp.rank] for tid, lp in pos.items()] for pos in positions]


def _positions_from_wire(positions: list[Any] | None) -> list[PositionLogprobs] | None:
    if positions is None:
        return None
    return [{int(t): Logprob(float(v), int(r)) for t, v, r in pos} for pos in positions]


@dataclass(frozen=True)
class EncoderInfo:
    """The sentence encoder that answers /v1/embeddings beside the served model (in the "ready" message)."""

    name: str
    dimensions: int
    max_tokens: int
    vocab_size: int
    tokenizer_json: str  # for the front end, which tokenizes the inputs


@dataclass
class EngineInfo:
    """What the core reports once ready (the "ready" message, less the tokenizer)."""

    model_name: str
    max_model_len: int
    vocab_size: int
    hidden_size: int
    num_blocks: int
    eos_token_ids: list[int]
    dtype: str
    pid: int
    encoder: EncoderInfo | None

    @classmethod
    def from_wire(cls, fields: dict[str, Any]) -> EngineInfo:
        encoder = fields.get("encoder")
        return cls(**{**fields, "encoder": None if encoder is None else EncoderInfo(**encoder)})


@dataclass
class CoreStats:
    """Gauges and running totals of the core, for metrics."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of blocks in use
    num_blocks: int = 0
    num_free_blocks: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens served from it
    num_preemptions: int = 0
    prompt_tokens: int = 0  # prompt tokens that went through the model (cache hits excluded)
    generation_tokens: int = 0
    num_steps: int = 0
    # Speculative decoding: requests' steps that verified drafts, drafts verified, drafts kept.
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0


def child_ids(request_id: str, n: int) -> list[str]:
    """The ids of a request's sequences: the request's own id when n == 1, else ``{i}_{id}``."""
    return [request_id] if n == 1 else [f"{i}_{request_id}" for i in range(n)]
