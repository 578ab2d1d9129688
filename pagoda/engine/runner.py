"""Scheduled batch -> flat input tensors -> one model forward -> logits of the rows that sample."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagoda.api.outputs import PositionLogprobs
from pagoda.engine.cuda_graphs import DecodeBatch, DecodeGraphs
from pagoda.engine.sampler import position_logprobs
from pagoda.engine.scheduler import ScheduledRequest
from pagoda.model.attention.base import AttentionBackend, AttentionMetadata
from pagoda.model.llama import LlamaForCausalLM


@dataclass
class ModelInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    sample_rows: torch.Tensor  # flat token index of the last token of each sampling request
    sampling: list[ScheduledRequest]
    # (request, first flat row, rows, the prompt position the first row predicts) for prompt logprobs
    prompt_rows: list[tuple[ScheduledRequest, int, int, int]]


@dataclass
class PromptHidden:
    """Final hidden states of a chunk's positions that predict prompt tokens whose logprobs were asked."""

    scheduled: ScheduledRequest
    hidden: torch.Tensor  # [rows, hidden]
    first_target: int  # the prompt position the first row predicts


@dataclass
class StepLogits:
    sampling: list[ScheduledRequest]
    logits: torch.Tensor  # [len(sampling), vocab]
    prompt: list[PromptHidden]


# Prompt positions turned into logits at once: a [rows, vocab] fp32 block stays tens of MB.
PROMPT_LOGITS_ROWS = 128


def prompt_positions(s: ScheduledRequest) -> tuple[int, int]:
    """(offset in the chunk, count) of its positions that predict a prompt token whose logprob was asked for
    and not yet given: a prompt recomputed after preemption is not reported twice."""
    r = s.request
    if r.sampling_params.prompt_logprobs is None:
        return 0, 0
    first = max(r.num_computed_tokens, r.num_prompt_logprobs)
    end = min(r.num_computed_tokens + s.num_new_tokens, r.num_prompt_tokens - 1)
    return first - r.num_computed_tokens, max(0, end - first)


def allocate_kv_cache(model: LlamaForCausalLM, num_blocks: int, block_size: int, device: str) -> list[torch.Tensor]:
    """Per-layer [2, num_blocks + 1, block_size, kv_heads, head_dim] tensors.

    Left uninitialized (zeroing gigabytes costs most of a second at start-up): a slot is read only
    after it is written. The one exception is the extra last block, never handed out and zeroed,
    which padded gathers point at so that masked-out positions hold finite values (0 * NaN = NaN).
    """
    cfg = model.config
    cache = torch.empty(
        cfg.num_hidden_layers, 2, num_blocks + 1, block_size, cfg.num_key_value_heads, cfg.head_dim,
        dtype=model.dtype, device=device,
    )
    cache[:, :, num_blocks].zero_()
    return list(cache.unbind(0))


def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int) -> int:
    cfg = model.config
    itemsize = torch.empty(0, dtype=model.dtype).element_size()
    return cfg.num_hidden_layers * 2 * block_size * cfg.num_key_value_heads * cfg.head_dim * itemsize


def slot_of(block_ids: list[int], position: int, block_size: int) -> int:
    """The flat cache slot of a sequence's token at ``position``."""
    return block_ids[position // block_size] * block_size + position % block_size


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[torch.Tensor],
        block_size: int,
        attention: AttentionBackend,
        device: str = "cpu",
        graphs: DecodeGraphs | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.attention = attention
        self.device = torch.device(device)
        self.graphs = graphs

    def prepare(self, scheduled: list[ScheduledRequest]) -> ModelInputs:
        # Host-side work per step is paid serially with the model: lists and numpy, one tensor per input.
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sampling: list[ScheduledRequest] = []
        prompt_rows: list[tuple[ScheduledRequest, int, int, int]] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables = np.zeros((len(scheduled), max(len(s.request.block_ids) for s in scheduled)), dtype=np.int64)
        for row, s in enumerate(scheduled):
            r = s.request
            blocks = r.block_ids
            start, n = r.num_computed_tokens, s.num_new_tokens
            end = start + n
            tables[row, : len(blocks)] = blocks
            offset, count = prompt_positions(s)
            if count:
                prompt_rows.append((s, len(input_ids) + offset, count, start + offset + 1))
            if n == 1:  # a decode token
                input_ids.append(r.token_ids[start])
                positions.append(start)
                slots.append(slot_of(blocks, start, bs))
            else:
                input_ids.extend(r.token_ids[start:end])
                pos = np.arange(start, end)
                positions.extend(pos.tolist())
                slots.extend((tables[row, pos // bs] * bs + pos % bs).tolist())
            query_lens.append(n)
            seq_lens.append(end)
            if s.samples:
                sample_rows.append(len(input_ids) - 1)
                sampling.append(s)
        on_device = {"dtype": torch.int64, "device": self.device}
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slots, **on_device),
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_tables=torch.from_numpy(tables),
            block_size=bs,
            pad_slot=(self.kv_caches[0].shape[1] - 1) * bs,
            device=self.device,
        )
        self.attention.prepare(metadata)
        return ModelInputs(
            torch.tensor(input_ids, **on_device),
            torch.tensor(positions, **on_device),
            metadata,
            torch.tensor(sample_rows, **on_device),
            sampling,
            prompt_rows,
        )

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest]) -> StepLogits:
        """Run the model: the requests that sample with their logits (model dtype), and the hidden states
        of prompt positions whose logprobs were asked for (see ``prompt_logprobs``)."""
        if self.graphs is not None and self._graph_step(scheduled):
            return self._execute_graph(scheduled)
        inputs = self.prepare(scheduled)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, self.attention, inputs.metadata)
        prompt = [PromptHidden(s, hidden[row : row + count], first_target)
                  for s, row, count, first_target in inputs.prompt_rows]
        if not inputs.sampling:
            return StepLogits([], hidden.new_empty(0, 0, dtype=torch.float32), prompt)
        return StepLogits(inputs.sampling, self.model.compute_logits(hidden[inputs.sample_rows]), prompt)

    @torch.inference_mode()
    def prompt_logprobs(self, item: PromptHidden) -> list[PositionLogprobs]:
        """Logprobs of the raw distribution for the prompt tokens ``item`` predicts, a block of rows at a time."""
        k = item.scheduled.request.sampling_params.prompt_logprobs
        assert k is not None
        targets = item.scheduled.request.token_ids[item.first_target : item.first_target + len(item.hidden)]
        entries: list[PositionLogprobs] = []
        for c in range(0, len(targets), PROMPT_LOGITS_ROWS):
            logits = self.model.compute_logits(item.hidden[c : c + PROMPT_LOGITS_ROWS]).float()
            chunk = targets[c : c + PROMPT_LOGITS_ROWS]
            entries += position_logprobs(torch.log_softmax(logits, dim=-1), chunk, [k] * len(chunk))
        item.scheduled.request.num_prompt_logprobs = item.first_target - 1 + len(entries)
        return entries

    def _graph_step(self, scheduled: list[ScheduledRequest]) -> bool:
        """A decode step: one new token per sequence, few enough sequences for a captured graph."""
        return (
            len(scheduled) <= self.graphs.max_batch
            and all(s.num_new_tokens == 1 and len(s.request.block_ids) <= self.graphs.max_blocks for s in scheduled)
            and any(s.samples for s in scheduled)
            and not any(prompt_positions(s)[1] for s in scheduled)
        )

    def _execute_graph(self, scheduled: list[ScheduledRequest]) -> StepLogits:
        bs = self.block_size
        batch = DecodeBatch([], [], [], [], [])
        for s in scheduled:
            r = s.request
            pos = r.num_computed_tokens
            batch.input_ids.append(r.token_ids[pos])
            batch.positions.append(pos)
            batch.slots.append(slot_of(r.block_ids, pos, bs))
            batch.seq_lens.append(pos + 1)
            batch.block_tables.append(r.block_ids)
        logits = self.graphs.run(batch)
        rows = [i for i, s in enumerate(scheduled) if s.samples]
        sampling = [scheduled[i] for i in rows]
        if len(rows) < len(scheduled):
            logits = logits[torch.tensor(rows, device=logits.device)]
        return StepLogits(sampling, logits, [])

    @torch.inference_mode()
    def sum_hidden(self, scheduled: ScheduledRequest) -> torch.Tensor:
        """Sum of the final (normed) hidden states over one prompt chunk, fp32 [hidden]."""
        inputs = self.prepare([scheduled])
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, self.attention, inputs.metadata)
        return hidden.float().sum(dim=0)
