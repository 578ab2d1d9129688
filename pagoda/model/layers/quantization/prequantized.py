"""What GPTQ and AWQ checkpoints share at load: parameters in the checkpoint's own layout (packed int32 words,
fp16 scales), filled shard by shard from q/k/v and gate/up tensors along their output columns, then unpacked
once every tensor is in (``finish``) to the layout a runtime method multiplies with, the checkpoint
parameters dropped."""

from __future__ import annotations

from types import ModuleType

import torch
from gguf import GGMLQuantizationType
from torch import nn

from pagoda.model.layers.linear import Linear, UnquantizedLinearMethod, sharded_weight_loader
from pagoda.model.layers.quantization import int4
from pagoda.model.layers.quantization.gguf import GGUFLinearMethod
from pagoda.model.layers.quantization.grid import dequantize_groups
from pagoda.model.layers.quantization.int8 import q8_0_blocks


def column_sharded(layer: Linear, name: str, shape: tuple[int, int], dtype: torch.dtype, output_sizes: list[int],
                   per_column: int) -> None:
    """Register ``layer.<name>``, [rows, columns] with ``per_column`` output features per column (packed
    words hold several), shard i taking the columns of output features ``sum(output_sizes[:i])`` on."""
    for size in output_sizes:
        if size % per_column:
            raise ValueError(f"{name}: {size} output features do not fill whole int32 words of {per_column}")
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)

    def load(param: nn.Parameter, tensor: torch.Tensor, shard: int | None, tensor_name: str) -> None:
        start, size = (0, param.shape[1]) if shard is None else (sum(output_sizes[:shard]) // per_column,
                                                                 output_sizes[shard] // per_column)
        dest = param.data.narrow(1, start, size)
        if tuple(tensor.shape) != tuple(dest.shape):
            raise ValueError(f"checkpoint tensor {tensor_name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(dest.shape)}")
        dest.copy_(tensor)

    param.weight_loader = load  # type: ignore[attr-defined]
    param.num_shards = len(output_sizes)  # type: ignore[attr-defined]
    setattr(layer, name, param)


def add_bias(layer: Linear, output_sizes: list[int], dtype: torch.dtype) -> None:
    layer.bias = nn.Parameter(torch.empty(sum(output_sizes), dtype=dtype), requires_grad=False)
    layer.bias.weight_loader = sharded_weight_loader(output_sizes)  # type: ignore[attr-defined]
    layer.bias.num_shards = len(output_sizes)  # type: ignore[attr-defined]


def finish(layer: Linear, drop: list[str], q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
           group_size: int, bits: int, ops: ModuleType | None) -> None:
    """Install the runtime form of [out, in] codes q with per-group scale and zero [out, groups]: 4 bits as
    int4 (Int4LinearMethod); 8 bits, symmetric, as Q8_0 rows on the GGUF kernel, or dense weights
    without the kernels. ``drop``: the checkpoint-layout parameters to remove."""
    for name in drop:
        delattr(layer, name)
    if bits == 4:
        layer.weight = nn.Parameter(int4.pack_rows(q, scale, zero), requires_grad=False)
        layer.method = int4.Int4LinearMethod(ops, group_size)
        layer.method.process_weights_after_loading(layer)
        return
    if ops is None:
        layer.weight = nn.Parameter(dequantize_groups(q, scale, zero, group_size, layer.dtype), requires_grad=False)
        layer.method = UnquantizedLinearMethod()
        return
    blocks = q.shape[1] // 32
    block_scales = scale[:, torch.arange(blocks) * 32 // group_size]
    layer.weight = nn.Parameter(q8_0_blocks((q.to(torch.int16) - 128).to(torch.int8), block_scales), requires_grad=False)
    layer.method = GGUFLinearMethod(GGMLQuantizationType.Q8_0, ops)
    layer.method.process_weights_after_loading(layer)  # (the model's own pass asked the checkpoint's method)
