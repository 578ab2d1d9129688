"""Steps of up to ``MAX_ROWS`` tokens (decode tokens, drafts to verify, short prompt chunks) through every decoder
layer in one C++ call
(pagoda/csrc/decode_layers.cpp), when the model's projections all run on the CPU's quantized kernels (GGUF
blocks, int4, int8 as Q8_0): batch-1 decode is bound by reading the weights, and the layer-by-layer path
spent a third of a token's time outside the matmuls (Python, tensor allocations, a thread fan-out per call).

Same arithmetic as the layer-by-layer path up to the order of fp32 sums. Not used in batch-invariant mode
(a request would then round differently alone than beside others) or with ``PAGODA_DISABLE_FUSED_DECODE=1``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch

from pagoda.model.attention.base import AttentionMetadata, per_token_context
from pagoda.model.layers.linear import Linear, batch_invariant
from pagoda.model.layers.quantization.gguf import GGUFLinearMethod, tile_min_rows
from pagoda.model.layers.quantization.int4 import Int4LinearMethod
from pagoda.model.layers.rotary import RotaryAngles

MAX_ROWS = 16  # as the quantized kernels' int8-activation path for decode (NATIVE_MAX_ROWS)

INT4_KIND = 1000  # decode_layers.cpp's kind for int4 (quant_rows.h kInt4); GGUF layers pass their GGML type id
HEAD_DIM_MULTIPLE = 16  # the kernel's attention takes sixteen lanes of a head at a time


def _kind(layer: Linear) -> tuple[int, int] | None:
    """(kind, int4 group) of a projection the kernel runs, or None."""
    method = getattr(layer, "int8_kernel", None) or layer.method  # int8 runs on the GGUF Q8_0 kernel
    if isinstance(method, GGUFLinearMethod):
        return int(method.qtype), 0
    if isinstance(method, Int4LinearMethod) and method.ops is not None and getattr(layer, "input_perm", None) is None:
        return INT4_KIND, method.group_size
    return None


@dataclass
class FusedDecode:
    ops: ModuleType
    weights: list[torch.Tensor]
    kinds: list[int]
    groups: list[int]
    qkv_biases: list[torch.Tensor]
    norms: list[torch.Tensor]
    kv_scales: list[float]  # each layer's fp8 k_scale, v_scale
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    scale: float
    eps: float
    tile_min_rows: int  # steps of this many rows or more run Q4_0/Q4_1 projections on AMX tiles (0: never), as
    # the layer-by-layer path (gguf.py's tile_min_rows)
    layers: Any = None  # the extension's DecodeLayers, made at the first step
    layers_caches: tuple[torch.Tensor, ...] = ()  # the KV caches it holds

    @classmethod
    def of(cls, model, ops: ModuleType | None) -> FusedDecode | None:  # noqa: ANN001 - a LlamaForCausalLM
        """The fused path for ``model``, or None when some part of it runs only layer by layer."""
        if (ops is None or os.environ.get("PAGODA_DISABLE_FUSED_DECODE") == "1" or not ops.decode_layers_supported()
                or model.qk_norm or model.dtype not in (torch.float32, torch.bfloat16)
                or model.embed_tokens.weight.device.type != "cpu"):
            return None
        cfg = model.config
        if cfg.head_dim % HEAD_DIM_MULTIPLE:
            return None
        weights, kinds, groups, biases, norms = [], [], [], [], []
        for layer in model.layers:
            for linear in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
                kind = _kind(linear)
                if kind is None or (linear.bias is not None and linear is not layer.qkv_proj):
                    return None
                weights.append(linear.weight)
                kinds.append(kind[0])
                groups.append(kind[1])
            if layer.qkv_proj.bias is not None:
                biases.append(layer.qkv_proj.bias.float().contiguous())
            norms += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        if biases and len(biases) != len(model.layers):
            return None
        norms.append(model.norm.weight)
        kv_scales = [scale for layer in model.layers for scale in layer.kv_scales]
        first = model.layers[0]
        return cls(ops, weights, kinds, groups, biases, norms, kv_scales, cfg.num_attention_heads,
                   cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size, first.scale, first.input_layernorm.eps,
                   tile_min_rows(ops))

    def fits(self, hidden: torch.Tensor) -> bool:
        """A step of few enough tokens (decode tokens, or a decode token and the drafts that follow it),
        outside batch-invariant mode."""
        return hidden.shape[0] <= MAX_ROWS and not batch_invariant()

    def run(self, hidden: torch.Tensor, angles: RotaryAngles, kv_caches: list[torch.Tensor],
            metadata: AttentionMetadata) -> torch.Tensor:
        """The final normed hidden states of the step's tokens (``hidden``, the embeddings, is overwritten)."""
        hidden = hidden.contiguous()
        tables, seq_lens = metadata.block_tables, torch.from_numpy(np.asarray(metadata.seq_lens, dtype=np.int64))
        if len(metadata.query_lens) != hidden.shape[0]:
            # Several tokens of one sequence (drafts to verify): the kernel writes every row's KV before any
            # row attends, so each token attends as its own row over the keys up to itself.
            token_seq, seq_lens = per_token_context(metadata)
            tables = tables[token_seq]
        self._layers(kv_caches).run(hidden, angles.cos.contiguous(), angles.sin.contiguous(), metadata.slot_mapping,
                                    tables.contiguous(), seq_lens, self.tile_min_rows)
        return hidden

    def _layers(self, kv_caches: list[torch.Tensor]) -> Any:  # noqa: ANN401 - the extension's DecodeLayers
        """The kernel's model, made once for these caches (its weights and norms never change)."""
        # The same tensor objects (kept alive here, so never others at their addresses): no call into torch per
        # layer, which a batch-1 step would make with its caches cold.
        if self.layers is None or len(kv_caches) != len(self.layers_caches) or \
                any(a is not b for a, b in zip(kv_caches, self.layers_caches)):
            self.layers = self.ops.DecodeLayers(
                self.weights, self.kinds, self.groups, self.qkv_biases, self.norms, kv_caches, self.kv_scales,
                self.heads, self.kv_heads, self.head_dim, self.intermediate, self.scale, self.eps)
            self.layers_caches = tuple(kv_caches)
        return self.layers
