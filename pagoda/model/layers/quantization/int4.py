"""Group-wise asymmetric int4 weights: W[n, j] = scale[n, g] * (q[n, j] - zero[n, g]), q and zero in [0, 15],
g = j // group_size. ``--quantization int4`` quantizes each checkpoint tensor to it as it loads
(round to nearest, grid.py); GPTQ and AWQ checkpoints are unpacked to it at load (gptq.py, awq.py).

A layer's ``weight`` (uint8) holds each row as [nibbles | fp16 scales | uint8 zeros] (``pack_rows``). On the
CPU kernels the rows are then laid out in panels of 16 (panels.py, pagoda/csrc/quant_panels.h) and multiplied
by the kernel of GGUF's Q4_0/Q4_1/Q8_0 panels with a scale and zero per group (pagoda/csrc/int4_linear.cpp)
with int8 activations: up to ``NATIVE_MAX_ROWS`` rows of input (decode), and every row count on a CPU with
VNNI but no AMX; with AMX, up to ``AMX_MAX_ROWS`` rows run on int8 tiles and more dequantize tiles for the
dense matmul, as GGUF layers do. Without the kernels, a CUDA device multiplies the rows in one Triton kernel
(triton_linear.py); anything else (no compiler, no triton) dequantizes the layer in torch per call: correct,
not fast.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn
from torch.nn import functional as F

from pagoda.model.layers.linear import Linear, batch_invariant, sharded_weight_loader
from pagoda.model.layers.quantization import gguf, gpu_kernel, panels
from pagoda.model.layers.quantization.gguf import AMX_MAX_ROWS, DEQUANT_TILE_ROWS, NATIVE_MAX_ROWS, amx_tiles
from pagoda.model.layers.quantization.grid import dequantize_groups, quantize_groups
from pagoda.model.layers.quantization.int8 import Int8LinearMethod

GROUP_SIZES = (32, 64, 128)  # --quantization int4's choices; checkpoints may bring others the kernel takes
_BLOCK = 32  # weights per 16 bytes of nibbles


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def check_group_size(group_size: int, in_features: int, name: str) -> None:
    """What the kernels take (int4_linear.cpp, triton_linear.py): widths of whole 32-blocks, groups of whole
    blocks or the whole row."""
    if in_features % _BLOCK:
        raise ValueError(f"{name}: int4 layers need in_features divisible by {_BLOCK}, got {in_features}")
    if group_size <= 0 or (group_size % _BLOCK and group_size < in_features):
        raise ValueError(f"{name}: int4 group size {group_size} is not supported; supported: multiples of "
                         f"{_BLOCK}, or the whole row (-1)")


def row_bytes(in_features: int, group_size: int) -> int:
    return in_features // 2 + 3 * num_groups(in_features, group_size)


def panel_format(in_features: int, group_size: int) -> panels.PanelFormat:
    """``pack_rows``'s rows as panels.py sees them: 16 bytes of nibbles a block, a group's fp16 scale and
    uint8 zero."""
    return panels.PanelFormat(16, in_features // _BLOCK, min(group_size, in_features) // _BLOCK, (2, 1))


def pack_rows(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """q [out, in] (0..15), scale [out, groups] (stored as fp16), zero [out, groups] (0..15) -> uint8 rows."""
    out, k = q.shape
    blocks = q.to(torch.uint8).reshape(out, k // _BLOCK, 2, 16)
    nibbles = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(out, k // 2)
    scales = scale.to(torch.float16).reshape(-1).view(torch.uint8).reshape(out, -1)
    return torch.cat([nibbles, scales, zero.to(torch.uint8).reshape(out, -1)], dim=1)


def unpack_rows(rows: torch.Tensor, in_features: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of ``pack_rows``: (q uint8 [out, in], scale fp16 [out, groups], zero uint8 [out, groups])."""
    out, groups = rows.shape[0], num_groups(in_features, group_size)
    nibbles = rows[:, : in_features // 2].reshape(out, -1, 1, 16)
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=2).reshape(out, in_features)
    scale_end = in_features // 2 + 2 * groups
    scale = rows[:, in_features // 2 : scale_end].contiguous().view(torch.float16)
    return q, scale, rows[:, scale_end:]


class Int4LinearMethod:
    """One group size for the whole layer. ``ops``: the C++ kernels (None: torch's per-call dequantization).
    ``input_perm``: GPTQ act-order checkpoints' column order, applied to x (see gptq.py)."""

    def __init__(self, ops: ModuleType | None, group_size: int) -> None:
        self.ops = ops
        self.group_size = group_size
        self.panels_for_prompts = gguf.panels_for_prompts(ops)

    def create_weights(self, layer: Linear, in_features: int, output_sizes: list[int], bias: bool,
                       dtype: torch.dtype) -> None:
        check_group_size(self.group_size, in_features, "--quantization int4")
        rows = sum(output_sizes)
        weight = nn.Parameter(torch.empty(rows, row_bytes(in_features, self.group_size), dtype=torch.uint8),
                              requires_grad=False)

        def load(param: nn.Parameter, tensor: torch.Tensor, shard: int | None, name: str) -> None:
            start, size = (0, rows) if shard is None else (sum(output_sizes[:shard]), output_sizes[shard])
            if tensor.shape != (size, in_features):
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {(size, in_features)}")
            param.data[start : start + size].copy_(pack_rows(*quantize_groups(tensor, self.group_size, bits=4, sym=False)))

        weight.weight_loader = load  # type: ignore[attr-defined]
        weight.num_shards = len(output_sizes)  # type: ignore[attr-defined]
        layer.weight = weight
        if bias:
            layer.bias = nn.Parameter(torch.empty(rows, dtype=dtype), requires_grad=False)
            layer.bias.weight_loader = sharded_weight_loader(output_sizes)  # type: ignore[attr-defined]
            layer.bias.num_shards = len(output_sizes)  # type: ignore[attr-defined]

    def process_weights_after_loading(self, layer: Linear) -> None:
        """On the CPU kernels, the rows take the panel layout."""
        if self.ops is not None and layer.weight.device.type == "cpu":
            panels.lay_out_once(layer, panel_format(layer.in_features, self.group_size))

    def dequantize_weight(self, weight: torch.Tensor, in_features: int, dtype: torch.dtype,
                          rows: torch.Tensor | None = None) -> torch.Tensor:
        """A layer's weight (panels on the CPU kernels, rows elsewhere), or its rows ``rows``, as ``dtype``."""
        if self.ops is not None and weight.is_cpu:
            kernel_dtype = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
            return self.ops.int4_dequantize(weight, self.group_size, in_features, kernel_dtype, rows).to(dtype)
        q, scale, zero = unpack_rows(weight if rows is None else weight[rows], in_features, self.group_size)
        return dequantize_groups(q, scale, zero, self.group_size, dtype)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        perm = getattr(layer, "input_perm", None)
        if perm is not None:
            x = x.index_select(-1, perm)
        if self.ops is not None and x.is_cpu and (x.shape[0] <= NATIVE_MAX_ROWS or batch_invariant()
                                                   or self.panels_for_prompts):
            return self.ops.int4_linear(x, layer.weight, self.group_size, layer.bias)
        if x.is_cpu and x.shape[0] <= AMX_MAX_ROWS and amx_tiles(self.ops):
            return self.ops.int4_linear_amx(x, layer.weight, self.group_size, layer.bias)
        kernel = gpu_kernel.kernel_for(x)
        if kernel is not None:  # each row computed alone: batch-invariant as it is
            return kernel.quantized_linear(x.contiguous(), layer.weight, kernel.INT4, layer.in_features, layer.bias,
                                           self.group_size)
        tiles = []
        for tile in layer.weight.split(DEQUANT_TILE_ROWS):
            w = self.dequantize_weight(tile, layer.in_features, x.dtype)
            if batch_invariant() and x.shape[0] > 1:  # one row per call: the same kernel whatever the batch
                tiles.append(torch.cat([F.linear(row, w) for row in x.split(1)]))
            else:
                tiles.append(F.linear(x, w))
        out = tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=-1)
        return out if layer.bias is None else out + layer.bias

    def embed(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        rows = self.dequantize_weight(layer.weight, layer.in_features, layer.dtype, ids.reshape(-1))
        return rows.reshape(*ids.shape, layer.in_features)


class Int4QuantConfig:
    """``--quantization int4``: every decoder projection int4 in groups of ``group_size``; the embedding table /
    output projection int8 (per channel), as llama.cpp's 4-bit files keep theirs at 6-8 bits: at 4 bits the
    logits of a small model's tied vocabulary projection lose the most."""

    def __init__(self, ops: ModuleType | None, group_size: int) -> None:
        self.ops = ops
        self.group_size = group_size

    def linear_method(self, checkpoint_names: list[str]) -> Int4LinearMethod | Int8LinearMethod:
        if any(name.rsplit(".", 1)[-1] in ("embed_tokens", "lm_head") for name in checkpoint_names):
            return Int8LinearMethod(self.ops)
        return Int4LinearMethod(self.ops, self.group_size)
