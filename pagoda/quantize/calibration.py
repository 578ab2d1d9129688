"""Calibration for ``pagoda quantize``: a text cut into sequences, and the model run one decoder layer at a
time over all of them (as GPTQ and AWQ work: quantize layer i from the inputs layer i really receives, then
compute layer i + 1's inputs).

Each sequence is its own prefill over a scratch KV cache: attention within the sequence only, causal, in the
model's own code (the torch attention backend), so the activations are those of serving.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.resources import files

import torch
from torch import nn

from pagoda.model.attention.base import AttentionMetadata
from pagoda.model.attention.kv_format import KVCacheFormat
from pagoda.model.attention.torch_backend import TorchAttentionBackend
from pagoda.model.layers.linear import Linear
from pagoda.model.llama import DecoderLayer, LlamaForCausalLM
from pagoda.model.tokenizer_source import TokenizerSource

BLOCK_SIZE = 16


def shipped_text(name: str) -> str:
    """A text in pagoda/data (see its SOURCES.md)."""
    return (files("pagoda") / "data" / name).read_text(encoding="utf-8")


def token_sequences(tokenizer: TokenizerSource, text: str, seq_len: int, max_sequences: int | None = None) -> list[torch.Tensor]:
    """The text's tokens cut into sequences of ``seq_len`` (the remainder dropped)."""
    ids = tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    count = len(ids) // seq_len
    if count == 0:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than one sequence of {seq_len}")
    if max_sequences is not None:
        count = min(count, max_sequences)
    return [torch.tensor(ids[i * seq_len : (i + 1) * seq_len]) for i in range(count)]


@dataclass
class LayerState:
    """One sequence between two decoder layers: the layer output and the residual stream (None before layer 0)."""

    hidden: torch.Tensor
    residual: torch.Tensor | None


class LayerRunner:
    """Runs the model's decoder layers one at a time over same-length sequences."""

    def __init__(self, model: LlamaForCausalLM, seq_len: int) -> None:
        cfg = model.config
        self.model = model
        device = model.embed_tokens.weight.device
        blocks = -(-seq_len // BLOCK_SIZE)
        self.kv_cache = torch.zeros(2, blocks + 1, BLOCK_SIZE, cfg.num_key_value_heads, cfg.head_dim,
                                    dtype=model.dtype, device=device)
        self.attention = TorchAttentionBackend(KVCacheFormat.of("auto", model.dtype), use_cpu_kernel=False)
        self.metadata = AttentionMetadata(
            slot_mapping=torch.arange(seq_len, device=device), query_lens=[seq_len], seq_lens=[seq_len],
            block_tables=torch.arange(blocks)[None], block_size=BLOCK_SIZE, pad_slot=blocks * BLOCK_SIZE,
            device=device)
        self.attention.prepare(self.metadata)
        self.angles = model.rotary.angles(torch.arange(seq_len, device=device))

    @torch.inference_mode()
    def embed(self, sequences: list[torch.Tensor]) -> list[LayerState]:
        return [LayerState(self.model.embed_tokens.embed(ids), None) for ids in sequences]

    @torch.inference_mode()
    def run(self, layer: DecoderLayer, states: list[LayerState]) -> list[LayerState]:
        """The layer's outputs; ``states`` stay as they are (the layer adds into its residual input in place, layer 0 into its hidden one,
        and GPTQ runs a layer several times over the same states)."""
        return [LayerState(*layer(s.hidden.clone(), None if s.residual is None else s.residual.clone(), self.angles,
                                  self.kv_cache, self.attention, self.metadata))
                for s in states]


@contextmanager
def inputs_of(linears: dict[str, Linear], sink: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """While open, every input the named layers receive goes to ``sink(name, x)`` ([tokens, in_features])."""
    handles = [module.register_forward_pre_hook(_hook(name, sink)) for name, module in linears.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hook(name: str, sink: Callable[[str, torch.Tensor], None]) -> Callable[[nn.Module, tuple], None]:
    def hook(module: nn.Module, args: tuple) -> None:
        sink(name, args[0])

    return hook


def projections(layer: DecoderLayer) -> dict[str, Linear]:
    """A decoder layer's linear layers, in the order their inputs are computed."""
    return {"qkv_proj": layer.qkv_proj, "o_proj": layer.o_proj, "gate_up_proj": layer.gate_up_proj,
            "down_proj": layer.down_proj}
