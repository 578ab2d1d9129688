"""Decode steps replayed from CUDA graphs, one graph per padded batch size.

A decode step of a few sequences is a few hundred small kernel launches whose CPU cost exceeds the GPU
work; a captured graph launches them all at once. Each graph reads fixed buffers (token ids, positions,
slots, KV lengths, block tables) that are refilled before each replay; a step of ``n`` sequences runs the
smallest graph of ``>= n`` rows, the spare rows padded so that they write into the cache's spare block
and attend to one key, and their logits are dropped.

Without CUDA (the CPU tests) the same buffers, padding and capture order run eagerly, ``replay`` calling
the captured function directly: that checks everything but the graph itself.
"""

from __future__ import annotations

from collections.abc import Callable
import numpy as np
import torch

from pagoda.model.attention.base import AttentionBackend, AttentionMetadata
from pagoda.model.llama import LlamaForCausalLM

# Captured batch sizes: small ones one by one (decode of a few requests is the latency case), then every
# multiple of 8 up to this bound; larger decode steps are compute-heavy enough to run eagerly.
MAX_CAPTURED_BATCH = 512


def capture_sizes(max_num_seqs: int) -> list[int]:
    limit = min(max_num_seqs, MAX_CAPTURED_BATCH)
    sizes = [b for b in (1, 2, 4) if b <= limit] + list(range(8, limit + 1, 8))
    if sizes[-1] != limit:
        sizes.append(limit)
    return sizes


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[torch.Tensor],
        attention: AttentionBackend,
        block_size: int,
        max_num_seqs: int,
        max_model_len: int,
        use_cuda_graphs: bool,
    ) -> None:
        if not attention.graph_capturable:
            raise ValueError(f"attention backend {attention.name!r} cannot be captured in a CUDA graph")
        self.model, self.kv_caches, self.attention = model, kv_caches, attention
        self.block_size = block_size
        self.sizes = capture_sizes(max_num_seqs)
        self.device = kv_caches[0].device
        self.spare_block = kv_caches[0].shape[1] - 1  # never handed out: padding rows write here
        self.pad_slot = self.spare_block * block_size
        largest = self.sizes[-1]
        self.max_blocks = max_blocks = -(-max_model_len // block_size)
        on = {"device": self.device}
        self.input_ids = torch.zeros(largest, dtype=torch.int64, **on)
        self.positions = torch.zeros(largest, dtype=torch.int64, **on)
        self.slots = torch.full((largest,), self.pad_slot, dtype=torch.int64, **on)
        self.seq_lens = torch.ones(largest, dtype=torch.int32, **on)
        self.block_tables = torch.full((largest, max_blocks), self.spare_block, dtype=torch.int32, **on)
        self.token_seq = torch.arange(largest, dtype=torch.int32, **on)
        self.use_cuda_graphs = use_cuda_graphs
        self.graphs: dict[int, Callable[[], torch.Tensor]] = {}
        self._capture_all()

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _forward(self, batch: int) -> torch.Tensor:
        """The decode forward of ``batch`` rows over the fixed buffers: logits [batch, vocab]."""
        metadata = AttentionMetadata(
            slot_mapping=self.slots[:batch],
            query_lens=np.ones(batch, dtype=np.int64),
            seq_lens=np.zeros(0, dtype=np.int64),  # the kernels read the buffer; host lengths change every step
            block_tables=self.block_tables[:batch],
            block_size=self.block_size,
            pad_slot=self.pad_slot,
            device=self.device,
            backend_state=self.attention.decode_state(
                self.token_seq[:batch], self.seq_lens[:batch], self.block_tables[:batch]
            ),
        )
        hidden = self.model(self.input_ids[:batch], self.positions[:batch], self.kv_caches, self.attention, metadata)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        if not self.use_cuda_graphs:
            self.graphs = {b: (lambda b=b: self._forward(b)) for b in self.sizes}
            return
        pool = None
        # Largest first: the smaller graphs then fit in the memory pool the largest one reserved.
        for batch in reversed(self.sizes):
            self._forward(batch)  # compiles the Triton kernels and warms cuBLAS outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(batch)
            pool = graph.pool()
            self.graphs[batch] = _replayer(graph, logits)
        torch.cuda.synchronize(self.device)

    def padded_size(self, num_seqs: int) -> int | None:
        """The captured batch a step of ``num_seqs`` decode rows runs in (None: too large, run eagerly)."""
        for size in self.sizes:
            if size >= num_seqs:
                return size
        return None

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, seq_lens: torch.Tensor,
            block_tables: torch.Tensor) -> torch.Tensor:
        """Logits [num_seqs, vocab] of one decode step (one token per sequence; tables [num_seqs, width])."""
        n = len(input_ids)
        size = self.padded_size(n)
        if size is None:
            raise ValueError(f"a decode step of {n} sequences exceeds the largest captured batch ({self.max_batch})")
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slots[:n].copy_(slots, non_blocking=True)
        self.seq_lens[:n].copy_(seq_lens, non_blocking=True)
        self.block_tables[:n, : block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        # Padding rows: write K/V into the spare block and attend to one key there.
        self.slots[n:size].fill_(self.pad_slot)
        self.seq_lens[n:size].fill_(1)
        self.block_tables[n:size, 0].fill_(self.spare_block)
        return self.graphs[size]()[:n]


def _replayer(graph: torch.cuda.CUDAGraph, logits: torch.Tensor) -> Callable[[], torch.Tensor]:
    def replay() -> torch.Tensor:
        graph.replay()
        return logits

    return replay
