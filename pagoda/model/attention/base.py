"""The flat input contract between the runner and an attention backend.

One step is a batch of sequences, each contributing ``query_lens[i]`` new tokens
(a prefill chunk or one decode token) whose KV lands in the paged cache at
``slot_mapping``; after the step sequence ``i`` has ``seq_lens[i]`` tokens of KV.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from pagoda.model.attention.kv_format import KVCacheFormat


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64 on the model's device: block_id * block_size + offset
    query_lens: np.ndarray  # int64 [num_seqs]: new tokens per sequence (a list is accepted too)
    seq_lens: np.ndarray  # int64 [num_seqs]: KV length per sequence after this step
    # [num_seqs, max_blocks] int64, padded with 0. On the host: backends derive their own indices from it
    # and move what they use to ``device`` once per step, not once per layer.
    block_tables: torch.Tensor
    block_size: int
    pad_slot: int  # a slot in the cache's zeroed spare block, for padded gathers
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Whatever the backend precomputes once per step and reuses in every layer.
    backend_state: Any = field(default=None)


class AttentionBackend(Protocol):
    name: str
    kv_format: KVCacheFormat  # how its cache stores keys and values
    # Whether decode steps through this backend can be captured in a CUDA graph: its per-step state
    # then comes from ``decode_state`` over fixed buffers instead of from ``prepare``.
    graph_capturable: bool

    def prepare(self, metadata: AttentionMetadata) -> None:
        """Per-step state (gather indices, masks) into ``metadata.backend_state``: here, or (torch) when a layer
        first attends."""

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, row width] (kv_format's)
        metadata: AttentionMetadata,
        scale: float,
        kv_scales: tuple[float, float] = (1.0, 1.0),  # the layer's fp8 k_scale / v_scale
    ) -> torch.Tensor:
        """Write k/v into the cache, attend, return [num_tokens, num_heads, head_dim]."""


def per_token_context(metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """For every query token of the step: its sequence (row of ``block_tables``) and how many keys it
    attends to, i.e. itself and everything before it (int64, on the CPU)."""
    q_lens = torch.from_numpy(np.asarray(metadata.query_lens, dtype=np.int64))
    s_lens = torch.from_numpy(np.asarray(metadata.seq_lens, dtype=np.int64))
    token_seq = torch.repeat_interleave(torch.arange(len(q_lens)), q_lens)
    first = torch.cumsum(q_lens, 0) - q_lens  # flat index of each sequence's first query token
    offset = torch.arange(int(q_lens.sum())) - first[token_seq]
    return token_seq, (s_lens - q_lens)[token_seq] + offset + 1
