"""Draft tokens from a smaller model with the target's tokenizer (vLLM's ``draft_model`` method).

The draft keeps its own KV cache, laid out on the target's block ids: block b of a request holds the same
positions in both caches, so the draft needs no block manager of its own (the engine's KV budget counts
both caches per block, see worker.py). The scheduler reserves ``num_speculative_tokens`` slots past each
request's step for the drafts the draft model writes before the target has verified them.

Each request remembers how many of its known tokens the draft holds (``num_draft_computed``) and the drafts
it fed beyond them (``draft_fed``): those that the target then kept are valid draft KV, so the next proposal
starts from the first token the draft has not seen: the one just sampled, or a kept draft and it. Proposing
k tokens for a batch is one forward over those catch-up tokens (a prefill for a new request) and k - 1
one-token forwards, each over every request still drafting. Drafts are the draft's argmax: a deterministic
proposal, which verification by sampling keeps exact for every sampling mode (engine/worker/verify.py).

The draft does not read the target's prefix cache: a request starting from cached blocks computes its whole
prompt in the draft (rewriting, in shared blocks, the values another request's draft wrote there).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pagoda.engine.worker.forward import HostStaging, forward_arrays
from pagoda.engine.worker.input_batch import CachedRequestState, InputBatch, step_arrays
from pagoda.model.attention.base import AttentionBackend
from pagoda.model.llama import LlamaForCausalLM


class DraftModelProposer:
    def __init__(self, model: LlamaForCausalLM, kv_caches: list[torch.Tensor], attention: AttentionBackend,
                 block_size: int, num_tokens: int, max_catch_up_tokens: int, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.attention = attention
        self.block_size = block_size
        self.num_tokens = num_tokens  # drafts proposed at most
        self.max_catch_up_tokens = max_catch_up_tokens  # tokens the first forward computes at most
        self.staging = HostStaging(device)  # its own buffers: the target's may still be in flight
        self.pad_slot = (kv_caches[0].shape[1] - 1) * block_size
        self.forwards: list[tuple[int, float]] = []  # (tokens, seconds) of the forwards of the last proposal

    @torch.inference_mode()
    def propose_batch(self, batch: InputBatch, states: list[CachedRequestState], limits: list[int]) -> list[list[int]]:
        """Up to ``limits[i]`` drafts to follow each of ``states``' known tokens (none where the limit is 0, or
        where the draft has not caught up with a long prompt within this step's token budget)."""
        proposals: list[list[int]] = [[] for _ in states]
        self.forwards = []
        # The m-th draft is written at position num_tokens + m - 2: within the slots the scheduler held.
        limits = [min(limit, int(batch.num_blocks[s.slot]) * self.block_size - s.num_tokens + 1)
                  for s, limit in zip(states, limits)]
        wanted = [i for i, limit in enumerate(limits) if limit > 0]
        if not wanted:
            return proposals
        starts, counts, ready = self._catch_up(batch, [states[i] for i in wanted])
        rows = np.fromiter((states[i].slot for i in wanted), dtype=np.int64, count=len(wanted))
        ends = starts + counts
        tokens = self._forward(batch, rows, starts, counts, ends)
        for j, i in enumerate(wanted):
            states[i].num_draft_computed = int(ends[j])
            states[i].draft_fed = []
        drafting = [j for j in range(len(wanted)) if ready[j]]
        for j in drafting:
            proposals[wanted[j]].append(tokens[j])
        depth = 1
        while True:
            drafting = [j for j in drafting if len(proposals[wanted[j]]) < limits[wanted[j]]]
            if not drafting:
                return proposals
            # Feed each request's latest draft after its known tokens and the drafts before it.
            positions = np.asarray([int(ends[j]) + depth - 1 for j in drafting], dtype=np.int64)
            batch.token_ids[rows[drafting], positions] = [proposals[wanted[j]][-1] for j in drafting]
            one = np.ones(len(drafting), dtype=np.int64)
            tokens = self._forward(batch, rows[drafting], positions, one, positions + 1)
            for j, token in zip(drafting, tokens):
                state = states[wanted[j]]
                state.draft_fed.append(proposals[wanted[j]][-1])
                proposals[wanted[j]].append(token)
            depth += 1

    def _catch_up(self, batch: InputBatch, states: list[CachedRequestState]) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        """Per request: the first known token the draft lacks, how many to compute now (within the budget), and
        whether that reaches its last known token (so it can propose)."""
        starts = np.empty(len(states), dtype=np.int64)
        counts = np.empty(len(states), dtype=np.int64)
        ready: list[bool] = []
        budget = self.max_catch_up_tokens
        for j, state in enumerate(states):
            known = batch.known_tokens(state)
            start = state.num_draft_computed
            for fed in state.draft_fed:  # drafts the target kept hold valid draft KV
                if start >= len(known) - 1 or known[start] != fed:
                    break
                start += 1
            # At least the last known token, whose logits give the first draft, even past the budget.
            count = max(1, min(len(known) - start, budget))
            budget -= count
            starts[j], counts[j] = start, count
            ready.append(start + count == len(known))
        return starts, counts, ready

    def _forward(self, batch: InputBatch, rows: np.ndarray, starts: np.ndarray, counts: np.ndarray,
                 known: np.ndarray) -> list[int]:
        """Run the draft over tokens ``starts[i]:starts[i] + counts[i]`` of the requests in slots ``rows``; the
        draft's argmax after each request's last token. Timed (reading the tokens back waits for the device)."""
        started = time.perf_counter()
        arrays = step_arrays(batch.token_ids, batch.block_table, batch.num_blocks, rows, starts, counts, known,
                             self.block_size, int(counts.sum()))
        hidden = forward_arrays(self.model, self.kv_caches, self.attention, arrays, self.block_size, self.pad_slot,
                                self.staging)
        logits = self.model.compute_logits(hidden[self.staging("sample_rows", arrays.sample_rows)])
        tokens = logits.argmax(dim=-1).tolist()
        self.forwards.append((len(arrays.input_ids), time.perf_counter() - started))
        return tokens
