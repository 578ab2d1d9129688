"""One step on the worker: apply the scheduler's changes, gather flat inputs from the persistent batch,
run the model, sample, and answer with tokens per request (engine/step.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagoda.api.outputs import PositionLogprobs
from pagoda.engine.step import GrammarBitmask, ModelRunnerOutput, SchedulerOutput
from pagoda.model.attention.base import AttentionBackend
from pagoda.model.attention.kv_format import KVCacheFormat
from pagoda.model.cpu_kernels import load_cpu_kernels
from pagoda.model.huge_pages import huge_page_empty
from pagoda.model.llama import LlamaForCausalLM
from pagoda.engine.worker.cuda_graphs import DecodeGraphs
from pagoda.engine.worker.input_batch import CachedRequestState, InputBatch, StepArrays, step_arrays
from pagoda.engine.worker.draft_model import DraftModelProposer
from pagoda.engine.worker.forward import HostStaging, forward_arrays
from pagoda.engine.worker.ngram_proposer import NgramProposer
from pagoda.engine.worker.sampler import Sampler, position_logprobs
from pagoda.engine.worker.verify import Verification

# Prompt positions turned into logits at once: a [rows, vocab] fp32 block stays tens of MB.
PROMPT_LOGITS_ROWS = 128


def prompt_positions(state: CachedRequestState, start: int, num_new: int) -> tuple[int, int]:
    """(offset in the chunk, count) of the positions of a chunk from ``start`` that predict a prompt token
    whose logprob was asked for and not yet given: a prompt recomputed after preemption is not reported
    twice."""
    if state.sampling_params.prompt_logprobs is None:
        return 0, 0
    first = max(start, state.num_prompt_logprobs)
    end = min(start + num_new, state.num_prompt_tokens - 1)
    return first - start, max(0, end - first)


@dataclass
class PromptHidden:
    """Final hidden states of a chunk's positions that predict prompt tokens whose logprobs were asked."""

    state: CachedRequestState
    hidden: torch.Tensor  # [rows, hidden]
    first_target: int  # the prompt position the first row predicts


def apply_grammar_bitmask(logits: torch.Tensor, mask: GrammarBitmask, req_ids: list[str]) -> torch.Tensor:
    """-inf for every token the grammar forbids, in the constrained rows (one batched update): the C++ kernel
    on the CPU (a word-at-a-time scan), unpacked bits and one masked update elsewhere."""
    where: dict[str, int] = {}  # a request's first mask row; with drafts its next rows follow, one per position
    for i, rid in enumerate(mask.req_ids):
        where.setdefault(rid, i)
    seen: dict[str, int] = {}
    pairs = []
    for row, rid in enumerate(req_ids):
        if rid in where:
            pairs.append((row, where[rid] + seen.get(rid, 0)))
            seen[rid] = seen.get(rid, 0) + 1
    if not pairs:
        return logits
    bits = mask.bits if len(pairs) == len(mask.req_ids) and all(m == i for i, (_, m) in enumerate(pairs)) \
        else mask.bits[[m for _, m in pairs]]
    rows = [r for r, _ in pairs]
    ops = load_cpu_kernels() if logits.device.type == "cpu" and logits.is_contiguous() and \
        logits.dtype in (torch.float32, torch.bfloat16) else None
    if ops is not None:
        ops.apply_token_bitmask(logits, torch.from_numpy(np.ascontiguousarray(bits)), torch.tensor(rows))
        return logits
    return mask_logits_torch(logits, bits, rows)


def mask_logits_torch(logits: torch.Tensor, bits: np.ndarray, rows: list[int]) -> torch.Tensor:
    where = torch.tensor(rows, device=logits.device)
    words = torch.from_numpy(bits).to(logits.device)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, : logits.shape[-1]]
    logits[where] = logits[where].masked_fill(~allowed, float("-inf"))
    return logits


def allocate_kv_cache(model: LlamaForCausalLM, num_blocks: int, block_size: int, device: str,
                      kv_format: KVCacheFormat) -> list[torch.Tensor]:
    """Per-layer [2, num_blocks + 1, block_size, kv_heads, row width] tensors of the format's storage dtype.

    On the CPU in huge pages (huge_pages.py). Left uninitialized (zeroing gigabytes costs most of a second at
    start-up): a slot is read only
    after it is written. The one exception is the extra last block, never handed out and zeroed,
    which padded gathers point at so that masked-out positions hold finite values (0 * NaN = NaN).
    """
    cfg = model.config
    shape = (cfg.num_hidden_layers, 2, num_blocks + 1, block_size, cfg.num_key_value_heads,
             kv_format.row_width(cfg.head_dim))
    if torch.device(device).type == "cpu":
        cache = huge_page_empty(shape, kv_format.storage_dtype)
    else:
        cache = torch.empty(shape, dtype=kv_format.storage_dtype, device=device)
    cache[:, :, num_blocks].zero_()
    return list(cache.unbind(0))


def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int, kv_format: KVCacheFormat) -> int:
    cfg = model.config
    return cfg.num_hidden_layers * block_size * kv_format.bytes_per_token(cfg.num_key_value_heads, cfg.head_dim)


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[torch.Tensor],
        block_size: int,
        attention: AttentionBackend,
        sampler: Sampler,
        batch: InputBatch,
        device: str = "cpu",
        graphs: DecodeGraphs | None = None,
        proposer: NgramProposer | DraftModelProposer | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.attention = attention
        self.sampler = sampler
        self.batch = batch
        self.device = torch.device(device)
        self.graphs = graphs
        self.proposer = proposer  # drafts for the next step, when speculative decoding is on
        self.staging = HostStaging(self.device)
        self.pad_slot = (kv_caches[0].shape[1] - 1) * block_size

    @torch.inference_mode()
    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self.batch.update(out)
        requests = self.batch.requests
        states = [requests[rid] for rid in out.req_ids]
        if not states:
            return ModelRunnerOutput([], [])
        rows = np.fromiter((s.slot for s in states), dtype=np.int64, count=len(states))
        arrays = self.batch.gather(out, rows)
        everyone = len(arrays.sampling) == len(states)
        sampling = states if everyone else [states[i] for i in arrays.sampling]
        drafts = out.spec_token_ids
        verification = Verification.plan(arrays.sample_rows, [drafts.get(s.req_id, []) for s in sampling]) \
            if drafts else None
        prompt_rows = self._prompt_rows(states, arrays)
        if not prompt_rows and self._graph_step(arrays):
            logits = self.graphs.run(*(self.staging(name, a) for name, a in (
                ("input_ids", arrays.input_ids), ("positions", arrays.positions), ("slots", arrays.slot_mapping),
                ("seq_lens", arrays.seq_lens), ("tables", arrays.block_tables))))
            if len(arrays.sampling) < len(states):
                logits = logits[self.staging("sampling", arrays.sampling)]
            prompt: list[PromptHidden] = []
        else:
            hidden = self._forward(arrays)
            prompt = [PromptHidden(states[i], hidden[row : row + count], first) for i, row, count, first in prompt_rows]
            logit_rows = arrays.sample_rows if verification is None else verification.logit_rows
            if len(logit_rows) == len(hidden):  # every row (distinct, ascending): a decode step needs no gather
                logits = self.model.compute_logits(hidden)
            else:
                logits = self.model.compute_logits(hidden[self.staging("sample_rows", logit_rows)]) \
                    if len(arrays.sampling) else None
        prompt_logprobs = {p.state.req_id: self._prompt_logprobs(p) for p in prompt}
        sampled: list[list[int]] = [[] for _ in states]
        logprobs: list[list[PositionLogprobs]] | None = None
        proposals = None
        draft_forwards: list[tuple[int, float]] = []
        if sampling:
            owners = range(len(states)) if everyone else arrays.sampling.tolist()
            owner_slots = rows if everyone else rows[arrays.sampling]
            tokens, row_logprobs = self._sample(out, logits, sampling, verification)
            if verification is None:
                self.batch.append_tokens(sampling, owner_slots, [t[0] for t in tokens])
            else:
                self.batch.extend_tokens(sampling, owner_slots, tokens)
            for i, accepted in zip(owners, tokens):
                sampled[i] = accepted
            if row_logprobs is not None:
                logprobs = [[] for _ in states]
                for i, entries in zip(owners, row_logprobs):
                    logprobs[i] = entries
            if self.proposer is not None and out.max_spec_tokens != 0:
                limit = self.proposer.num_tokens if out.max_spec_tokens is None else \
                    min(self.proposer.num_tokens, out.max_spec_tokens)
                limits = [min(limit, self.draft_room(s)) if s.speculates else 0 for s in sampling]
                proposals = [[] for _ in states]
                for i, proposal in zip(owners, self.proposer.propose_batch(self.batch, sampling, limits)):
                    proposals[i] = proposal
                if isinstance(self.proposer, DraftModelProposer):
                    draft_forwards = self.proposer.forwards
        return ModelRunnerOutput(list(out.req_ids), sampled, logprobs, prompt_logprobs, proposals, draft_forwards)

    def _sample(self, out: SchedulerOutput, logits: torch.Tensor, sampling: list[CachedRequestState],
                verification: Verification | None) -> tuple[list[list[int]], list[list[PositionLogprobs]] | None]:
        """Each sampling request's tokens for the step (one, or its kept drafts and one more) and, when any
        request asked, their logprobs."""
        row_states = sampling if verification is None else [sampling[i] for i in verification.owners]
        if out.grammar_bitmask is not None:
            logits = apply_grammar_bitmask(logits, out.grammar_bitmask, [s.req_id for s in row_states])
        result = self.sampler(logits, row_states, None if verification is None else verification.pending)
        tokens = [[t] for t in result.token_ids] if verification is None else verification.accept(result.token_ids)
        if all(lp is None for lp in result.logprobs):
            return tokens, None
        if verification is None:
            return tokens, [[lp] if lp is not None else [] for lp in result.logprobs]
        entries: list[list[PositionLogprobs]] = [[] for _ in sampling]
        first = 0
        for i, (accepted, draft) in enumerate(zip(tokens, verification.drafts)):
            entries[i] = [lp for lp in result.logprobs[first : first + len(accepted)] if lp is not None]
            first += len(draft) + 1
        return tokens, entries

    def draft_room(self, state: CachedRequestState) -> int:
        """Drafts that can still become output: the next step's tokens stay within max_tokens and the
        model's length (the sample after the drafts is one more token)."""
        params = state.sampling_params
        end = self.batch.max_model_len if params.max_tokens is None else \
            min(self.batch.max_model_len, state.num_prompt_tokens + params.max_tokens)
        return end - state.num_tokens - 1

    def _prompt_rows(self, states: list[CachedRequestState], arrays: StepArrays) -> list[tuple[int, int, int, int]]:
        """(request index, first flat row, rows, the prompt position the first row predicts) for each
        request whose chunk predicts prompt tokens whose logprobs were asked."""
        if not self.batch.wants_prompt_logprobs:
            return []
        rows = []
        firsts = np.cumsum(arrays.query_lens) - arrays.query_lens
        starts = arrays.seq_lens - arrays.query_lens
        for i, state in enumerate(states):
            if state.req_id not in self.batch.prompt_logprob_ids:
                continue
            start = int(starts[i])
            offset, count = prompt_positions(state, start, int(arrays.query_lens[i]))
            if count:
                rows.append((i, int(firsts[i]) + offset, count, start + offset + 1))
        return rows

    def _forward(self, arrays: StepArrays) -> torch.Tensor:
        """Final hidden states of every token of the step."""
        return forward_arrays(self.model, self.kv_caches, self.attention, arrays, self.block_size, self.pad_slot,
                              self.staging)

    def _prompt_logprobs(self, item: PromptHidden) -> list[PositionLogprobs]:
        """Logprobs of the raw distribution for the prompt tokens ``item`` predicts, a block of rows at a time."""
        k = item.state.sampling_params.prompt_logprobs
        assert k is not None
        targets = item.state.prompt_token_ids[item.first_target : item.first_target + len(item.hidden)]
        entries: list[PositionLogprobs] = []
        for c in range(0, len(targets), PROMPT_LOGITS_ROWS):
            logits = self.model.compute_logits(item.hidden[c : c + PROMPT_LOGITS_ROWS]).float()
            chunk = targets[c : c + PROMPT_LOGITS_ROWS]
            entries += position_logprobs(torch.log_softmax(logits, dim=-1), chunk, [k] * len(chunk))
        item.state.num_prompt_logprobs = item.first_target - 1 + len(entries)
        return entries

    def _graph_step(self, arrays: StepArrays) -> bool:
        """A decode step: one new token per sequence, few enough sequences for a captured graph."""
        graphs = self.graphs
        return (
            graphs is not None
            and len(arrays.query_lens) <= graphs.max_batch
            and len(arrays.input_ids) == len(arrays.query_lens)
            and arrays.block_tables.shape[1] <= graphs.max_blocks
            and len(arrays.sampling) > 0
        )

    @torch.inference_mode()
    def hidden_states(self, token_ids: list[int], start: int, count: int, block_ids: list[int]) -> torch.Tensor:
        """Final (normed) hidden states [count, hidden] of one sequence's tokens ``start:start + count``, its
        KV written to ``block_ids`` (embeddings, tests)."""
        one = np.zeros(1, dtype=np.int64)
        arrays = step_arrays(np.asarray([token_ids], dtype=np.int64), np.asarray([block_ids], dtype=np.int64),
                             one + len(block_ids), one, one + start, one + count, one + start + count, self.block_size,
                             count)
        return self._forward(arrays)
