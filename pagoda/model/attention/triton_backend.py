"""The `triton` attention backend: K/V written into the paged cache by a Triton kernel through the slot
mapping, then paged attention over the block tables with an online softmax, in two launches of one kernel:
decode tokens one per program, prefill chunks several tokens per program (so that a long prompt reads its
context once per block of tokens, not once per token). Chosen automatically on CUDA devices."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagoda.model.attention.base import AttentionMetadata
from pagoda.model.attention.kv_format import KVCacheFormat
from pagoda.model.attention.triton_kernels import (
    FP8_MIN_ARCH,
    QueryBlocks,
    paged_attention,
    prefill_block_q,
    prefill_rows,
    write_kv,
)


@dataclass
class _StepState:
    decode: QueryBlocks  # sequences with one new token
    prefill: QueryBlocks | None  # sequences with more (a prompt or a chunk of one, with or without context)
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32


def query_blocks(query_lens: list[int], seq_lens: list[int], block_q: int) -> tuple[np.ndarray, np.ndarray]:
    """The host-side launch plan of one step: ([4, num_decode] decode, [4, num_prefill_blocks] prefill)
    int32 arrays whose rows are (sequence, first token, keys seen by the first token, tokens in the block)."""
    q_lens = np.asarray(query_lens, dtype=np.int64)
    s_lens = np.asarray(seq_lens, dtype=np.int64)
    first = np.cumsum(q_lens) - q_lens
    decode = np.flatnonzero(q_lens == 1)
    decode_plan = np.stack([decode, first[decode], s_lens[decode], np.ones_like(decode)])
    prefill = np.flatnonzero(q_lens > 1)
    per_seq = -(-q_lens[prefill] // block_q)
    seq = np.repeat(prefill, per_seq)
    index = np.arange(len(seq)) - np.repeat(np.cumsum(per_seq) - per_seq, per_seq)  # block within its sequence
    offset = index * block_q
    prefill_plan = np.stack([seq, first[seq] + offset, s_lens[seq] - q_lens[seq] + offset + 1,
                             np.minimum(block_q, q_lens[seq] - offset)])
    return decode_plan.astype(np.int32), prefill_plan.astype(np.int32)


class TritonAttentionBackend:
    name = "triton"
    graph_capturable = True

    def __init__(self, kv_format: KVCacheFormat, query_heads_per_kv: int = 1,
                 rows_per_prefill_program: int | None = None) -> None:
        if kv_format.quantized and kv_format.model_dtype == torch.float32:
            raise ValueError(f"kv_cache_dtype {kv_format.kind} on the triton backend needs a 16-bit model dtype "
                             "(bfloat16 or float16): in float32 its attention programs spill registers")
        if kv_format.kind == "fp8_e4m3" and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            if major * 10 + minor < FP8_MIN_ARCH:
                raise ValueError(f"kv_cache_dtype fp8 on the triton backend needs a GPU of compute capability "
                                 f"{FP8_MIN_ARCH / 10} or later (this one is {major}.{minor}); use int8")
        self.kv_format = kv_format
        rows = rows_per_prefill_program or prefill_rows(kv_format.model_dtype)
        self.prefill_block_q = prefill_block_q(query_heads_per_kv, rows)

    def prepare(self, metadata: AttentionMetadata) -> None:
        decode, prefill = query_blocks(metadata.query_lens, metadata.seq_lens, self.prefill_block_q)
        # One host-to-device copy per step for both launch plans.
        plans = torch.from_numpy(np.concatenate([decode, prefill], axis=1)).to(metadata.device)
        n = decode.shape[1]
        decode_blocks = QueryBlocks(plans[0, :n], plans[1, :n], plans[2, :n], None, 1)
        prefill_blocks = None
        if prefill.shape[1]:
            prefill_blocks = QueryBlocks(plans[0, n:], plans[1, n:], plans[2, n:], plans[3, n:], self.prefill_block_q)
        metadata.backend_state = _StepState(decode_blocks, prefill_blocks,
                                            metadata.block_tables.to(device=metadata.device, dtype=torch.int32))

    def decode_state(self, token_seq: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor) -> _StepState:
        """The state of a decode step (one query token per sequence, in order, so token i is sequence i) over
        caller-owned int32 buffers, which a CUDA graph captures once and the caller refills before each replay."""
        return _StepState(QueryBlocks(token_seq, token_seq, seq_lens, None, 1), None, block_tables)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata, scale: float, kv_scales: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
        state: _StepState = metadata.backend_state
        kind = self.kv_format.kind
        write_kv(k, v, kv_cache[0], kv_cache[1], metadata.slot_mapping, kind, kv_scales)
        out = torch.empty_like(q)
        for blocks in (state.decode, state.prefill):
            if blocks is not None:
                paged_attention(q, kv_cache[0], kv_cache[1], state.block_tables, blocks, scale, out, kind, kv_scales)
        return out
