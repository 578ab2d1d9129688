"""A model's forward pass over one step's flat host arrays (the target's step, a draft model's forwards), and
the staging of those arrays onto the model's device."""

from __future__ import annotations

import numpy as np
import torch

from pagoda.engine.worker.input_batch import StepArrays
from pagoda.model.attention.base import AttentionBackend, AttentionMetadata
from pagoda.model.llama import LlamaForCausalLM


class HostStaging:
    """Host arrays to the model's device. On CUDA through pinned buffers reused every step, so the copies
    are asynchronous (each step ends by reading its tokens back, after which the buffers are free again);
    on the CPU the arrays are used as they are."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, array: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cpu":
            return host
        buffer = self.pinned.get(name)
        if buffer is None or buffer.numel() < host.numel() or buffer.dtype != host.dtype:
            size = max(host.numel(), 2 * (buffer.numel() if buffer is not None else 0))
            buffer = self.pinned[name] = torch.empty(size, dtype=host.dtype, pin_memory=True)
        staged = buffer[: host.numel()].view(host.shape)
        staged.copy_(host)
        return staged.to(self.device, non_blocking=True)


def forward_arrays(model: LlamaForCausalLM, kv_caches: list[torch.Tensor], attention: AttentionBackend,
                   arrays: StepArrays, block_size: int, pad_slot: int, staging: HostStaging) -> torch.Tensor:
    """Final hidden states of every token of ``arrays``, their KV written to ``kv_caches``."""
    metadata = AttentionMetadata(
        slot_mapping=staging("slots", arrays.slot_mapping),
        query_lens=arrays.query_lens,
        seq_lens=arrays.seq_lens,
        block_tables=torch.from_numpy(arrays.block_tables),
        block_size=block_size,
        pad_slot=pad_slot,
        device=staging.device,
    )
    attention.prepare(metadata)
    return model(staging("input_ids", arrays.input_ids), staging("positions", arrays.positions), kv_caches,
                 attention, metadata)
