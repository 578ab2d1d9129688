"""Paged attention on CPU (and the fallback everywhere).

Decode sequences (one query token each) go to the C++ paged kernel, which reads keys and
values in place from the block cache. Without the kernel they are gathered into a padded
[batch, kv_heads, max_len, dim] tensor (padding points at the cache's zeroed spare block) and
the query heads of each KV head act as its query rows, so grouped-query attention needs no key
repetition. A quantized cache (int8, fp8) is written through its format's encoding; the C++ kernel reads it
in place, the torch paths decode what they gather. Prefill chunks are attended one sequence at a time with SDPA (each is large, so the
per-call cost is amortized); a chunk with no earlier context attends to its own keys with a
causal mask and never touches the cache. In batch-invariant mode every query row goes through
the paged kernel instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from pagoda.model.attention.base import AttentionMetadata, per_token_context
from pagoda.model.attention.kv_format import KVCacheFormat
from pagoda.model.cpu_kernels import load_cpu_kernels


@dataclass
class _PrefillSeq:
    token_start: int
    query_len: int
    # Flat cache slots of the whole context, or None when the chunk is the whole context.
    context_slots: torch.Tensor | None
    mask: torch.Tensor | None  # [query_len, seq_len] bool, True = attend


@dataclass
class _StepState:
    decode_token_idx: torch.Tensor  # [num_decode] flat token index of each decode query
    decode_tables: torch.Tensor  # [num_decode, max_blocks] block tables of the decode rows
    decode_lens: torch.Tensor  # [num_decode] int64 KV lengths
    # Gather-path inputs (only without the C++ kernel):
    decode_slots: torch.Tensor | None  # [num_decode, max_len] flat cache slots (0 where padded)
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, max_len] bool
    prefills: list[_PrefillSeq]


def _context_slots(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(length)
    return block_table[pos // block_size] * block_size + pos % block_size


def _on_device(state: _StepState, device: torch.device) -> _StepState:
    """The step's indices moved once to the model's device (a no-op on the CPU)."""
    if device.type == "cpu":
        return state

    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    prefills = [_PrefillSeq(p.token_start, p.query_len, move(p.context_slots), move(p.mask)) for p in state.prefills]
    return _StepState(move(state.decode_token_idx), move(state.decode_tables), move(state.decode_lens),
                      move(state.decode_slots), move(state.decode_mask), prefills)


class TorchAttentionBackend:
    """Decode rows use the C++ paged kernel when it builds (CPU), else a gather + SDPA in torch."""

    name = "torch"
    graph_capturable = False  # prepare() builds per-step Python structures

    def __init__(self, kv_format: KVCacheFormat, use_cpu_kernel: bool = True, batch_invariant: bool = False) -> None:
        self.kv_format = kv_format
        self.kernels = load_cpu_kernels() if use_cpu_kernel else None
        # Every query row, prefill ones too, through the paged kernel as if it were a decode
        # query at its own position: its result then never depends on chunking or batching.
        self.batch_invariant = batch_invariant
        if batch_invariant and self.kernels is None:
            raise ValueError("batch_invariant=True needs Pagoda's C++ CPU kernels, which failed to build")

    def prepare(self, metadata: AttentionMetadata) -> None:
        """Nothing until a layer attends: the step's state is built by the first one (a step that the one-call
        decode runs, fused_decode.py, attends in its own kernel and never needs it: ~40 us of torch ops saved)."""
        metadata.backend_state = None

    def _state(self, metadata: AttentionMetadata) -> _StepState:
        if metadata.backend_state is None:
            if self.batch_invariant:
                self._prepare_per_token(metadata)
            else:
                self._prepare(metadata)
        return metadata.backend_state

    def _prepare(self, metadata: AttentionMetadata) -> None:
        bs = metadata.block_size
        q_lens = np.asarray(metadata.query_lens, dtype=np.int64)
        s_lens = np.asarray(metadata.seq_lens, dtype=np.int64)
        starts = np.cumsum(q_lens) - q_lens
        is_decode = (q_lens == 1) & (s_lens > 1)
        decode_rows = np.flatnonzero(is_decode)
        prefills: list[_PrefillSeq] = []
        for i in np.flatnonzero(~is_decode).tolist():  # few per step: the rest is vectorized
            q_len, s_len, start = int(q_lens[i]), int(s_lens[i]), int(starts[i])
            if q_len == s_len:
                prefills.append(_PrefillSeq(start, q_len, None, None))
            else:
                slots = _context_slots(metadata.block_tables[i], s_len, bs)
                q_pos = torch.arange(s_len - q_len, s_len)[:, None]
                mask = torch.arange(s_len)[None, :] <= q_pos
                prefills.append(_PrefillSeq(start, q_len, slots, mask))
        rows = torch.from_numpy(decode_rows)
        lens = torch.from_numpy(s_lens[decode_rows])
        decode_tokens = starts[decode_rows]
        tables = metadata.block_tables if len(decode_rows) == len(q_lens) else metadata.block_tables[rows]
        slots = mask = None
        if len(decode_rows) and (self.kernels is None or metadata.device.type != "cpu"):
            max_len = int(lens.max())
            pos = torch.arange(max_len)
            block_idx = (pos // bs).clamp(max=tables.shape[1] - 1)
            slots = tables[:, block_idx] * bs + (pos % bs)[None, :]
            valid = pos[None, :] < lens[:, None]
            # Padding reads the cache's zeroed spare block (the last one), never stale data.
            slots = torch.where(valid, slots, torch.full_like(slots, metadata.pad_slot))
            mask = valid[:, None, None, :]
        state = _StepState(torch.from_numpy(decode_tokens), tables, lens, slots, mask, prefills)
        metadata.backend_state = _on_device(state, metadata.device)

    def _prepare_per_token(self, metadata: AttentionMetadata) -> None:
        token_seq, lens = per_token_context(metadata)
        tables = metadata.block_tables[token_seq]
        metadata.backend_state = _StepState(torch.arange(len(lens)), tables, lens, None, None, [])

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        kv_scales: tuple[float, float] = (1.0, 1.0),
    ) -> torch.Tensor:
        state = self._state(metadata)
        fmt = self.kv_format
        k_scale, v_scale = kv_scales
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        k_flat = kv_cache[0].view(fmt.copy_dtype).view(-1, num_kv_heads, kv_cache.shape[-1])
        v_flat = kv_cache[1].view(fmt.copy_dtype).view(-1, num_kv_heads, kv_cache.shape[-1])
        k_rows, v_rows = fmt.encode(k, k_scale), fmt.encode(v, v_scale)
        k_flat.index_copy_(0, metadata.slot_mapping, k_rows.view(fmt.copy_dtype))
        v_flat.index_copy_(0, metadata.slot_mapping, v_rows.view(fmt.copy_dtype))
        if fmt.quantized:  # a fresh prompt attends to its keys as stored, as every later token will
            k, v = fmt.decode(k_rows, k_scale), fmt.decode(v_rows, v_scale)
        out = torch.empty_like(q)
        num_heads = q.shape[1]
        group = num_heads // num_kv_heads

        if state.decode_token_idx.numel() and self.kernels is not None and q.is_cpu:
            # fp8's per-tensor scales: the keys' folded into the softmax scale, the values' into the output.
            fp8 = fmt.kind == "fp8_e4m3"
            attended = self.kernels.paged_decode_attention(
                q if not state.prefills else q[state.decode_token_idx], kv_cache[0], kv_cache[1],
                state.decode_tables, state.decode_lens, scale * k_scale if fp8 else scale)
            if fp8 and v_scale != 1.0:
                attended = attended * v_scale
            if not state.prefills:  # a pure decode step: every token is a decode query, in order
                return attended
            out[state.decode_token_idx] = attended
        elif state.decode_token_idx.numel():
            n = state.decode_token_idx.numel()
            q_dec = q[state.decode_token_idx].view(n, num_kv_heads, group, head_dim)
            k_dec = fmt.decode(k_flat[state.decode_slots], k_scale).transpose(1, 2)  # [n, kv_heads, max_len, dim]
            v_dec = fmt.decode(v_flat[state.decode_slots], v_scale).transpose(1, 2)
            o = F.scaled_dot_product_attention(q_dec, k_dec, v_dec, attn_mask=state.decode_mask, scale=scale)
            out[state.decode_token_idx] = o.reshape(n, num_heads, head_dim)

        for seq in state.prefills:
            rows = slice(seq.token_start, seq.token_start + seq.query_len)
            q_seq = q[rows].transpose(0, 1)[None]  # [1, heads, q_len, dim]
            if seq.context_slots is None:
                k_seq, v_seq = k[rows], v[rows]
            else:  # earlier chunks' keys and values come from the cache, as stored
                k_seq = fmt.decode(k_flat[seq.context_slots], k_scale)
                v_seq = fmt.decode(v_flat[seq.context_slots], v_scale)
            o = F.scaled_dot_product_attention(
                q_seq,
                k_seq.transpose(0, 1)[None],
                v_seq.transpose(0, 1)[None],
                attn_mask=seq.mask,
                is_causal=seq.mask is None,
                scale=scale,
                enable_gqa=True,
            )
            out[rows] = o[0].transpose(0, 1)
        return out
