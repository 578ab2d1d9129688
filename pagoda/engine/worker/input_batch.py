"""The worker's own state of the requests it runs, and the persistent host buffers a step is built from.

Each request holds one slot (a row) of fixed buffers — its token ids, block table, computed count — for
as long as it runs; a step only writes what the scheduler says changed and the tokens sampled, then
gathers its flat inputs from the slots with a few numpy operations, whatever the batch size. The rows go
to the model in the scheduler's order, so the batch the model sees is the one the scheduler chose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pagoda.api.params import SamplingParams
from pagoda.engine.step import NewRequestData, SchedulerOutput
from pagoda.engine.worker.sampler import PenaltyState, is_plain_greedy


@dataclass(eq=False)
class CachedRequestState:
    """What the worker keeps of one request, across steps and preemptions, until it finishes."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    block_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    penalty_state: PenaltyState | None = None  # built by the sampler on the first penalized step
    num_prompt_logprobs: int = 0  # prompt positions whose logprobs were reported (kept across preemption)
    plain_greedy: bool = False  # argmax of the raw logits, nothing else, at every step
    speculates: bool = False  # drafts are proposed for it when speculative decoding is on (it may opt out)
    # With a draft model: its known tokens whose KV the draft holds, and the drafts it fed after them.
    num_draft_computed: int = 0
    draft_fed: list[int] = field(default_factory=list)
    slot: int | None = None  # its row in the InputBatch; None while preempted

    @classmethod
    def from_new(cls, new: NewRequestData) -> CachedRequestState:
        params = new.sampling_params
        return cls(new.req_id, new.prompt_token_ids, params, new.eos_token_ids, list(new.block_ids),
                   plain_greedy=is_plain_greedy(params), speculates=params.speculative_decoding)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)


@dataclass
class StepArrays:
    """One step's flat inputs on the host (numpy), in the scheduler's order."""

    input_ids: np.ndarray  # [num_tokens]
    positions: np.ndarray  # [num_tokens]
    slot_mapping: np.ndarray  # [num_tokens] flat cache slot of each token's KV
    query_lens: np.ndarray  # [num_seqs] tokens computed per sequence
    seq_lens: np.ndarray  # [num_seqs] KV length after the step
    block_tables: np.ndarray  # [num_seqs, widest table]
    sampling: np.ndarray  # indexes of the sequences that reach the end of their known tokens
    sample_rows: np.ndarray  # flat token index of each sampling sequence's last token


def step_arrays(
    token_ids: np.ndarray,
    block_table: np.ndarray,
    num_blocks: np.ndarray,
    rows: np.ndarray,
    starts: np.ndarray,
    counts: np.ndarray,
    known: np.ndarray,
    block_size: int,
    num_tokens: int,
) -> StepArrays:
    """Gather a step from per-row buffers: row ``rows[i]`` computes ``counts[i]`` tokens from position
    ``starts[i]`` (int64), ``num_tokens`` in all; it samples when that reaches ``known[i]``, its count of known
    tokens. Every numpy call counts: a batch-1 decode step runs them with the caches cold from its weights."""
    ends = starts + counts
    sampling = np.flatnonzero(ends >= known)
    if num_tokens == len(rows):  # a decode step: one token per row
        positions, token_rows, sample_rows = starts, rows, sampling
    else:
        cu = np.cumsum(counts)
        seq = np.repeat(np.arange(len(rows)), counts)
        positions = np.arange(num_tokens) - (cu - counts)[seq] + starts[seq]
        token_rows, sample_rows = rows[seq], cu[sampling] - 1
    block_index, offset = np.divmod(positions, block_size)
    return StepArrays(
        input_ids=token_ids[token_rows, positions].astype(np.int64),
        positions=positions,
        slot_mapping=block_table[token_rows, block_index] * block_size + offset,
        query_lens=counts,
        seq_lens=ends,
        block_tables=block_table[rows, : num_blocks[rows].max()],
        sampling=sampling,
        sample_rows=sample_rows,
    )


class InputBatch:
    """Slots of persistent buffers, one per running request (``max_num_seqs`` of them)."""

    def __init__(self, max_num_seqs: int, max_model_len: int, block_size: int) -> None:
        self.block_size = block_size
        self.max_model_len = max_model_len
        max_blocks = -(-max_model_len // block_size)
        self.token_ids = np.zeros((max_num_seqs, max_model_len), dtype=np.int32)
        self.num_tokens = np.zeros(max_num_seqs, dtype=np.int64)
        self.block_table = np.zeros((max_num_seqs, max_blocks), dtype=np.int64)
        self.num_blocks = np.zeros(max_num_seqs, dtype=np.int64)
        self.free_slots = list(range(max_num_seqs - 1, -1, -1))
        self.requests: dict[str, CachedRequestState] = {}
        self.prompt_logprob_ids: set[str] = set()  # requests that asked for prompt logprobs

    @property
    def wants_prompt_logprobs(self) -> bool:
        return bool(self.prompt_logprob_ids)

    def update(self, out: SchedulerOutput) -> None:
        """Apply the scheduler's per-step changes to the states and slots."""
        for rid in out.finished_req_ids:
            state = self.requests.pop(rid, None)
            if state is not None:
                self._release(state)
                self.prompt_logprob_ids.discard(rid)
        for rid in out.preempted_req_ids:
            self._release(self.requests[rid])
        for new in out.new_requests:
            state = self.requests[new.req_id] = CachedRequestState.from_new(new)
            self._occupy(state)
            if new.sampling_params.prompt_logprobs is not None:
                self.prompt_logprob_ids.add(new.req_id)
        cached = out.cached
        for rid in cached.resumed_req_ids:
            state = self.requests[rid]
            state.block_ids = list(cached.new_block_ids[rid])
            self._occupy(state)
        resumed = set(cached.resumed_req_ids)
        for rid, blocks in cached.new_block_ids.items():
            if rid in resumed:
                continue
            state = self.requests[rid]
            slot, n = state.slot, len(state.block_ids)
            state.block_ids.extend(blocks)
            self.block_table[slot, n : n + len(blocks)] = blocks
            self.num_blocks[slot] = len(state.block_ids)
        for rid, drafts in out.spec_token_ids.items():  # they follow the known tokens, which they do not join
            slot, n = self.requests[rid].slot, self.num_tokens[self.requests[rid].slot]
            self.token_ids[slot, n : n + len(drafts)] = drafts

    def _occupy(self, state: CachedRequestState) -> None:
        slot = state.slot = self.free_slots.pop()
        n = state.num_prompt_tokens
        self.token_ids[slot, :n] = state.prompt_token_ids
        self.token_ids[slot, n : state.num_tokens] = state.output_token_ids
        self.num_tokens[slot] = state.num_tokens
        self.block_table[slot, : len(state.block_ids)] = state.block_ids
        self.num_blocks[slot] = len(state.block_ids)

    def _release(self, state: CachedRequestState) -> None:
        state.num_draft_computed, state.draft_fed = 0, []  # the draft's KV goes with the blocks
        if state.slot is not None:
            self.free_slots.append(state.slot)
            state.slot = None

    def gather(self, out: SchedulerOutput, rows: np.ndarray) -> StepArrays:
        """The step's flat inputs for the scheduled requests, held in slots ``rows``."""
        return step_arrays(self.token_ids, self.block_table, self.num_blocks, rows,
                           np.asarray(out.num_computed_tokens, dtype=np.int64),
                           np.asarray(out.num_scheduled_tokens, dtype=np.int64), self.num_tokens[rows], self.block_size,
                           out.total_num_scheduled_tokens)

    def append_tokens(self, states: list[CachedRequestState], rows: np.ndarray, tokens: list[int]) -> None:
        """One sampled token for each of ``states`` (in slots ``rows``)."""
        ends = self.num_tokens[rows]
        self.token_ids[rows, ends] = tokens
        self.num_tokens[rows] = ends + 1
        for state, token in zip(states, tokens):
            state.output_token_ids.append(token)

    def extend_tokens(self, states: list[CachedRequestState], rows: np.ndarray, tokens: list[list[int]]) -> None:
        """The tokens each of ``states`` gained in a step that verified drafts: its kept drafts and one more."""
        for state, row, gained in zip(states, rows.tolist(), tokens):
            n = self.num_tokens[row]
            self.token_ids[row, n : n + len(gained)] = gained
            self.num_tokens[row] += len(gained)
            state.output_token_ids.extend(gained)

    def known_tokens(self, state: CachedRequestState) -> np.ndarray:
        """The request's prompt and output so far (a view of its slot)."""
        return self.token_ids[state.slot, : self.num_tokens[state.slot]]
