"""The `triton` attention backend: K/V written into the paged cache by a Triton kernel through the slot
mapping, and every query token (prefill chunk or decode) attended by one paged-attention kernel that
walks its sequence's block table with an online softmax. Chosen automatically on CUDA devices."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.model.attention.base import AttentionMetadata, per_token_context


@dataclass
class _StepState:
    token_seq: torch.Tensor  # [num_tokens] int32: the block-table row of each query token
    token_len: torch.Tensor  # [num_tokens] int32: keys each query token attends to (causal)
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32


class TritonAttentionBackend:
    name = "triton"
    graph_capturable = True

    def __init__(self) -> None:
        from pagoda.model.attention import triton_kernels

        self.kernels = triton_kernels

    def prepare(self, metadata: AttentionMetadata) -> None:
        device = metadata.device
        token_seq, token_len = per_token_context(metadata)
        metadata.backend_state = _StepState(token_seq.to(device=device, dtype=torch.int32),
                                            token_len.to(device=device, dtype=torch.int32),
                                            metadata.block_tables.to(device=device, dtype=torch.int32))

    def decode_state(self, token_seq: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor) -> _StepState:
        """The state of a decode step (one query token per sequence, in order) over caller-owned int32
        buffers, which a CUDA graph captures once and the caller refills before each replay."""
        return _StepState(token_seq, seq_lens, block_tables)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        state: _StepState = metadata.backend_state
        self.kernels.write_kv(k, v, kv_cache[0], kv_cache[1], metadata.slot_mapping)
        return self.kernels.paged_attention(q, kv_cache[0], kv_cache[1], state.block_tables, state.token_seq,
                                            state.token_len, scale)
