"""AWQ checkpoints (AutoAWQ's GEMM layout, ``quantization_config.quant_method == "awq"``), as vLLM loads them:
per linear layer

* ``qweight`` int32 [in, out / 8]: 4-bit codes packed along the output dimension, word position i holding
  output column 8c + ORDER[i] of its run of eight;
* ``qzeros`` int32 [in / group_size, out / 8]: zero points, packed the same way (no offset);
* ``scales`` fp16 [in / group_size, out].

W[n, j] = scales[j // g, n] * (q[j, n] - zero[j // g, n]). AWQ's activation-aware scales are already folded
into the weights and the preceding norms, so the model runs as written; the codes are unpacked at load to int4
rows (int4.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from pagoda.model.layers.linear import Linear
from pagoda.model.layers.quantization import int4
from pagoda.model.layers.quantization.packing import unpack_int32
from pagoda.model.layers.quantization.prequantized import add_bias, column_sharded, finish

# Which of a word's eight columns each 4-bit position holds (AutoAWQ's order map).
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
VERSIONS = ("gemm",)
CHECKPOINT_PARAMS = ["qweight", "qzeros", "scales"]


@dataclass(frozen=True)
class AWQConfig:
    group_size: int
    # Substrings of module names the checkpoint left unquantized (AutoAWQ's modules_to_not_convert).
    not_converted: tuple[str, ...]
    ops: ModuleType | None

    @classmethod
    def from_config(cls, config: dict[str, Any], ops: ModuleType | None) -> AWQConfig:
        bits = config.get("bits", config.get("w_bit"))
        if bits != 4:
            raise ValueError(f"AWQ checkpoint: bits={bits!r} is not supported; supported: 4")
        version = str(config.get("version", "gemm")).lower()
        if version not in VERSIONS:
            raise ValueError(f"AWQ checkpoint: version {version!r} is not supported; supported: {', '.join(VERSIONS)}")
        if not config.get("zero_point", True):
            raise ValueError("AWQ checkpoint: zero_point=false is not supported; supported: zero_point=true (GEMM)")
        group_size = config.get("group_size", config.get("q_group_size", 128))
        if not isinstance(group_size, int) or (group_size != -1 and group_size < 1):
            raise ValueError(f"AWQ checkpoint: group_size must be -1 or a positive integer, got {group_size!r}")
        return cls(group_size, tuple(config.get("modules_to_not_convert") or ()), ops)

    def linear_method(self, checkpoint_names: list[str]) -> AWQLinearMethod | None:
        if any(name.rsplit(".", 1)[-1] in ("embed_tokens", "lm_head") for name in checkpoint_names):
            return None
        if any(skip in name for skip in self.not_converted for name in checkpoint_names):
            return None
        return AWQLinearMethod(self)


class AWQLinearMethod:
    """Loads the checkpoint layout; ``process_weights_after_loading`` turns the layer into its runtime form."""

    def __init__(self, config: AWQConfig) -> None:
        self.config = config

    def group(self, in_features: int) -> int:
        return in_features if self.config.group_size == -1 else self.config.group_size

    def create_weights(self, layer: Linear, in_features: int, output_sizes: list[int], bias: bool,
                       dtype: torch.dtype) -> None:
        group = self.group(in_features)
        if in_features % group:
            raise ValueError(f"AWQ checkpoint: in_features {in_features} is not a multiple of group_size {group}")
        int4.check_group_size(group, in_features, "AWQ checkpoint")
        out = sum(output_sizes)
        column_sharded(layer, "qweight", (in_features, out // 8), torch.int32, output_sizes, 8)
        column_sharded(layer, "qzeros", (in_features // group, out // 8), torch.int32, output_sizes, 8)
        column_sharded(layer, "scales", (in_features // group, out), torch.float16, output_sizes, 1)
        if bias:
            add_bias(layer, output_sizes, dtype)

    def process_weights_after_loading(self, layer: Linear) -> None:
        q = unpack_int32(layer.qweight.data, 4, dim=1, order=ORDER).T  # [out, in]
        zero = unpack_int32(layer.qzeros.data, 4, dim=1, order=ORDER).T  # [out, groups]
        finish(layer, CHECKPOINT_PARAMS, q.contiguous(), layer.scales.data.T.contiguous(), zero.contiguous(),
               self.group(layer.in_features), 4, self.config.ops)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("an AWQ layer was used before process_weights_after_loading")

    def embed(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("an AWQ layer was used before process_weights_after_loading")
