"""The step contract between the engine core and its executor: plain data, nothing live.

Each step the scheduler sends one ``SchedulerOutput``: the full payload of requests the worker has not
seen, and for the others only what changed (new KV blocks, the computed count, a resume after preemption),
as vLLM's NewRequestData / CachedRequestData. The worker keeps its own state per request (tokens, block
table, sampling state) and answers with a ``ModelRunnerOutput``: a list of tokens per scheduled request,
so a step may accept several tokens for one request (speculative decoding) or none (a prefill chunk).
Both records hold only builtins, SamplingParams and logprob dicts, so they can cross a process boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagoda.api.outputs import PositionLogprobs
from pagoda.api.params import SamplingParams


@dataclass
class NewRequestData:
    """A request the worker has not seen: everything it needs to run and sample it."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    block_ids: list[int]
    num_computed_tokens: int  # > 0 when a cached prefix was found


@dataclass
class CachedRequestData:
    """What changed of requests the worker already holds (most steps: nothing but their counts)."""

    # Blocks added since the request was last scheduled; its whole table when it resumes.
    new_block_ids: dict[str, list[int]] = field(default_factory=dict)
    # Back from preemption: their old blocks are gone and ``new_block_ids`` replaces their tables.
    resumed_req_ids: list[str] = field(default_factory=list)


@dataclass
class GrammarBitmask:
    """The tokens each grammar-constrained request may sample this step: row i for ``req_ids[i]``, bit t of
    word t // 32 set when token t is allowed (xgrammar's layout)."""

    req_ids: list[str]
    bits: Any  # numpy int32 [len(req_ids), ceil(vocab / 32)]


@dataclass
class SchedulerOutput:
    # The scheduled requests in batch order, and the tokens each computes this step (its next tokens,
    # or a prefill chunk, plus any draft tokens in ``spec_token_ids``).
    req_ids: list[str] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)  # each one's tokens with valid KV before the step
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached: CachedRequestData = field(default_factory=CachedRequestData)
    # Draft tokens to verify this step, per request; they follow its known tokens.
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # Speculative decoding: the most drafts worth proposing per request for the next step (None: as configured).
    max_spec_tokens: int | None = None
    # The allowed tokens of the grammar-constrained requests that sample this step (structured outputs).
    grammar_bitmask: GrammarBitmask | None = None
    preempted_req_ids: list[str] = field(default_factory=list)  # blocks freed; the worker keeps their state
    finished_req_ids: list[str] = field(default_factory=list)  # ended since the last step: the worker forgets them
    num_prompt_tokens: int = 0  # of the scheduled tokens, how many are prompt tokens (for statistics)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)


@dataclass
class ModelRunnerOutput:
    req_ids: list[str]  # as scheduled
    # Per scheduled request: nothing (a prefill chunk short of the end of its tokens), or the tokens
    # accepted this step (one, or with drafts: the accepted drafts and one more).
    sampled_token_ids: list[list[int]]
    # Per scheduled request, one entry per sampled token; None when no request asked.
    logprobs: list[list[PositionLogprobs]] | None = None
    prompt_logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)
    # With speculative decoding: per scheduled request, the drafts proposed to follow its tokens (often none).
    spec_token_ids: list[list[int]] | None = None
    # With a draft model: (tokens, seconds) of each of its forwards this step, which the policy prices apart.
    draft_forwards: list[tuple[int, float]] = field(default_factory=list)
