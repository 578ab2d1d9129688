"""The scheduler's state of one sequence (engine process only; the worker keeps its own, see
worker/input_batch.py)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagoda.api.outputs import FinishReason
from pagoda.api.params import SamplingParams

if TYPE_CHECKING:
    from pagoda.engine.core.structured_output import RequestGrammar


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One sequence inside the engine. ``token_ids`` is the prompt followed by the output so far."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0
    cache_salt: str | None = None
    reads_prefix_cache: bool = True  # its blocks are published either way
    # A sibling (n > 1) that must finish its prompt first so this one reuses its cached blocks.
    wait_for: "Request | None" = None
    token_ids: list[int] = field(init=False)
    num_prompt_tokens: int = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_published_blocks: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    # Set when the scheduler takes it: prompt + max_tokens within max_model_len, and the tokens that may
    # stop it (min_tokens aside), so most steps check neither.
    max_length: int = 0
    stop_token_set: frozenset[int] = frozenset()
    spec_token_ids: list[int] = field(default_factory=list)  # draft tokens to verify in its next step
    num_accepted_drafts: int = 0  # its drafts kept so far
    num_rejected_drafts: int = 0  # its verifications that ended at a rejected draft
    grammar: RequestGrammar | None = None  # structured outputs: its compile, then its matcher
    # What the worker holds of it: whether it was sent, how many of its blocks, and whether it comes
    # back from preemption (its table then replaced).
    sent_to_worker: bool = False
    num_sent_blocks: int = 0
    resumed: bool = False

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
