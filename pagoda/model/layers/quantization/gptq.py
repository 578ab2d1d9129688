"""GPTQ checkpoints (AutoGPTQ / GPTQModel / transformers, ``quantization_config.quant_method == "gptq"``), as
vLLM loads them: per linear layer

* ``qweight`` int32 [in / (32 / bits), out]: codes packed along the input dimension, 32 / bits a word;
* ``qzeros`` int32 [groups, out / (32 / bits)]: zero points packed along the output dimension; the
  ``gptq`` (v1) format stores zero - 1, ``gptq_v2`` the zero itself;
* ``scales`` fp16 [groups, out]; ``g_idx`` int32 [in]: the group of each input column (act-order, ``desc_act``,
  permutes it; else ``j // group_size``); groups = ceil(in / group_size), one for group_size -1.

W[n, j] = scales[g_idx[j], n] * (q[j, n] - zero[g_idx[j], n]). At load the codes are unpacked to int4 rows (4
bits) or Q8_0 rows (8 bits, symmetric); act-order columns are sorted by group once, and each call gathers x's
columns in that order, so groups are contiguous for the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from pagoda.model.layers.linear import Linear
from pagoda.model.layers.quantization import int4
from pagoda.model.layers.quantization.packing import unpack_int32
from pagoda.model.layers.quantization.prequantized import add_bias, column_sharded, finish

BITS = (4, 8)
FORMATS = ("gptq", "gptq_v2")
CHECKPOINT_PARAMS = ["qweight", "qzeros", "scales", "g_idx"]
# The decoder's projections by their HF names' last part: what transformers' modules_in_block_to_quantize names.
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class GPTQConfig:
    bits: int
    group_size: int  # -1: one group per output row
    desc_act: bool
    sym: bool
    checkpoint_format: str
    lm_head: bool
    # Which projections the checkpoint quantized (None: all of them), as HF names' last parts.
    quantized_modules: frozenset[str] | None
    ops: ModuleType | None

    @classmethod
    def from_config(cls, config: dict[str, Any], ops: ModuleType | None) -> GPTQConfig:
        bits = config.get("bits")
        if bits not in BITS:
            raise ValueError(f"GPTQ checkpoint: bits={bits!r} is not supported; supported: {', '.join(map(str, BITS))}")
        group_size = config.get("group_size", -1)
        if not isinstance(group_size, int) or (group_size != -1 and group_size < 1):
            raise ValueError(f"GPTQ checkpoint: group_size must be -1 or a positive integer, got {group_size!r}")
        fmt = config.get("checkpoint_format", "gptq")
        if fmt not in FORMATS:
            raise ValueError(f"GPTQ checkpoint: checkpoint_format {fmt!r} is not supported; supported: {', '.join(FORMATS)}")
        sym = bool(config.get("sym", True))
        if bits == 8 and not sym:
            raise ValueError("GPTQ checkpoint: bits=8 with sym=false is not supported; supported: 4 bits (sym or "
                             "not), 8 bits symmetric")
        if config.get("pack_dtype", "int32") != "int32":
            raise ValueError(f"GPTQ checkpoint: pack_dtype {config['pack_dtype']!r} is not supported; supported: int32")
        blocks = config.get("modules_in_block_to_quantize")
        quantized = None
        if blocks:
            quantized = frozenset(name.rsplit(".", 1)[-1] for group in blocks
                                  for name in (group if isinstance(group, list) else [group]))
        return cls(bits, group_size, bool(config.get("desc_act", False)), sym, fmt, bool(config.get("lm_head", False)),
                   quantized, ops)

    def linear_method(self, checkpoint_names: list[str]) -> GPTQLinearMethod | None:
        last = {name.rsplit(".", 1)[-1] for name in checkpoint_names}
        if last == {"embed_tokens"} or (last == {"lm_head"} and not self.lm_head):
            return None
        if self.quantized_modules is not None and not last <= self.quantized_modules:
            return None
        return GPTQLinearMethod(self)


class GPTQLinearMethod:
    """Loads the checkpoint layout; ``process_weights_after_loading`` turns the layer into its runtime form."""

    def __init__(self, config: GPTQConfig) -> None:
        self.config = config

    def create_weights(self, layer: Linear, in_features: int, output_sizes: list[int], bias: bool,
                       dtype: torch.dtype) -> None:
        cfg = self.config
        per_word = 32 // cfg.bits
        if in_features % per_word:
            raise ValueError(f"GPTQ: in_features {in_features} is not a multiple of {per_word} ({cfg.bits}-bit words)")
        group = _group(cfg.group_size, in_features)
        if cfg.bits == 4:
            int4.check_group_size(group, in_features, "GPTQ checkpoint")
        elif group % 32:
            raise ValueError(f"GPTQ checkpoint: 8-bit groups must be multiples of 32, got {cfg.group_size}")
        groups = int4.num_groups(in_features, group)
        out = sum(output_sizes)
        column_sharded(layer, "qweight", (in_features // per_word, out), torch.int32, output_sizes, 1)
        column_sharded(layer, "qzeros", (groups, out // per_word), torch.int32, output_sizes, per_word)
        column_sharded(layer, "scales", (groups, out), torch.float16, output_sizes, 1)
        g_idx = nn.Parameter(torch.empty(in_features, dtype=torch.int32), requires_grad=False)
        seen = []  # whether a shard wrote g_idx already

        def load_g_idx(param: nn.Parameter, tensor: torch.Tensor, shard: int | None, name: str) -> None:
            if tuple(tensor.shape) != (in_features,):
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {(in_features,)}")
            if seen and not torch.equal(param.data, tensor.to(torch.int32)):
                raise ValueError(f"checkpoint tensor {name!r} differs from the g_idx of the other parts of its fused "
                                 "layer (q/k/v and gate/up see the same input, so act-order gives them one order)")
            param.data.copy_(tensor)
            seen.append(shard)

        g_idx.weight_loader = load_g_idx  # type: ignore[attr-defined]
        g_idx.num_shards = 0  # type: ignore[attr-defined]  # optional: without it, column j is in group j // size
        g_idx.data.copy_(torch.arange(in_features, dtype=torch.int32) // group)
        layer.g_idx = g_idx
        if bias:
            add_bias(layer, output_sizes, dtype)

    def process_weights_after_loading(self, layer: Linear) -> None:
        cfg = self.config
        k = layer.in_features
        group = _group(cfg.group_size, k)
        q = unpack_int32(layer.qweight.data, cfg.bits, dim=0).T  # [out, in]
        zero = unpack_int32(layer.qzeros.data, cfg.bits, dim=1).T  # [out, groups]
        if cfg.checkpoint_format == "gptq":  # v1 stores zero - 1; read back as AutoGPTQ does
            zero = ((zero.to(torch.int16) + 1) & (2**cfg.bits - 1)).to(torch.uint8)
        if cfg.bits == 8 and not bool((zero == 128).all()):
            raise ValueError("GPTQ checkpoint: an 8-bit layer's zero points are not all 128 although sym=true")
        scale = layer.scales.data.T
        g_idx = layer.g_idx.data.to(torch.int64)
        if bool((g_idx < 0).any()) or bool((g_idx >= scale.shape[1]).any()):
            raise ValueError(f"GPTQ checkpoint: g_idx names groups outside 0..{scale.shape[1] - 1}")
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], torch.arange(k) // group):
            raise ValueError(f"GPTQ checkpoint: g_idx does not give every group {group} columns")
        if not torch.equal(perm, torch.arange(k)):
            q = q[:, perm]
            layer.register_buffer("input_perm", perm, persistent=False)
        finish(layer, CHECKPOINT_PARAMS, q.contiguous(), scale.contiguous(), zero.contiguous(), group, cfg.bits, cfg.ops)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a GPTQ layer was used before process_weights_after_loading")

    def embed(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a GPTQ layer was used before process_weights_after_loading")


def _group(group_size: int, in_features: int) -> int:
    return in_features if group_size == -1 else group_size
