"""GGUF block quants executed as stored (no dequantized copy of the model): Q4_0, Q4_1, Q8_0, Q4_K, Q5_K
and Q6_K.

A layer's ``weight`` (uint8) holds the file's bytes of each weight row. Q4_0/Q4_1/Q8_0 rows are regrouped at
load from GGUF's array of blocks ([scale, (offset,) quants] per 32 weights) into [all quants | all scales |
all offsets]; on the CPU, once loaded, they are laid out again in panels of 16 rows (panels.py;
pagoda/csrc/quant_panels.h), so that the C++ kernel's vector lanes are 16 outputs and a block's scale is
applied once per 16 of them. K-quant rows stay as stored. The bytes per row, and so the memory read per
token, stay the file's. Up to ``NATIVE_MAX_ROWS`` rows of input (decode) go through that kernel; more rows
are compute-bound: on a CPU with AMX, up to ``AMX_MAX_ROWS`` of them multiply Q4_0/Q4_1/Q8_0 rows on int8
tiles (pagoda/csrc/amx_tiles.h, the same int8 activations) and longer inputs take tiles of the weight
dequantized to the model dtype for the dense matmul; without AMX, Q4_0/Q4_1/Q8_0 panels take every row count
(``panels_for_prompts``) and the K-quants the dequantized tiles (in batch-invariant mode the VNNI kernel takes
every row count: it computes each row alone, the dense matmul does not). On CUDA, Q4_0/Q4_1/Q8_0 rows (the
regrouped bytes) go through the Triton kernel (triton_linear.py) at any row count, and the K-quants are
dequantized at load.

Other GGUF types (Q2_K, Q3_K, Q5_0, the IQ types...), and fused layers whose parts have different types, are
dequantized at load to the model dtype.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn
from torch.nn import functional as F

from pagoda.model.gguf_file import GGUFFile, dequantize
from pagoda.model.layers.linear import Linear, batch_invariant
from pagoda.model.layers.quantization import gpu_kernel, panels

NATIVE_TYPES = (
    GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K,
)
# What the Triton kernel runs as stored on CUDA (triton_linear.py); a GPU dequantizes the K-quants at load.
GPU_NATIVE_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0)
# What the AMX int8 tile kernel takes (pagoda/csrc/amx_tiles.h): a scale and an offset per block of 32.
AMX_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0)
# Largest input row count sent to it (above: dequantized tiles and the dense matmul). Its int32 sums are scaled
# block by block, 256 of them per 16 x 16 x 32 tile product: over the bundled model's layers it beats the
# dequantized tiles by 25-35% at 24-64 rows and loses from ~96 (BENCHMARKS.md).
AMX_MAX_ROWS = 64
# What amx_q4_rows (amx_tiles.h) takes: inputs of a few rows (a token and its drafts, decode batches) on AMX
# tiles of exactly those rows, an alternative to the VNNI kernel with the same sums (tile_min_rows).
TILE_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)
TILE_MIN_ROWS_ENV = "PAGODA_TILE_MIN_ROWS"
# Largest input row count sent to the quantized kernel (above: tiles dequantized for the dense matmul). Over
# every layer of the bundled model the kernel is faster up to ~20 rows for Q4_1, int4 and int8 alike (16
# rows: 34-42 ms against 44-51 ms on 2 Xeon cores with AMX; BENCHMARKS.md): decode batches of a few
# sequences, short prompts.
NATIVE_MAX_ROWS = 16
# On a CPU with VNNI but no AMX, layers in panels (Q4_0/Q4_1/Q8_0, int4) take every row count: the panel kernel
# ran the bundled model's Q4_1 layers 1.24-2.44x faster than dequantized tiles and the bf16 matmul from 32 to
# 1024 rows (2 Zen 4 cores, BENCHMARKS.md; panels_for_prompts).
# Weight rows dequantized per tile on the prefill path (a tile of a 576-wide layer is 4.7 MB of bf16).
DEQUANT_TILE_ROWS = 4096
# Bytes before the quants in one GGUF block: the fp16 scale, and Q4_1's fp16 offset.
_HEADER_BYTES = {GGMLQuantizationType.Q4_0: 2, GGMLQuantizationType.Q4_1: 4, GGMLQuantizationType.Q8_0: 2}


def row_bytes(qtype: GGMLQuantizationType, in_features: int) -> int:
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    if in_features % block:
        raise ValueError(f"{qtype.name} needs in_features divisible by {block}, got {in_features}")
    return in_features // block * block_bytes


def regroup_rows(raw: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """[rows, row bytes] GGUF blocks -> the same bytes as [quants | scales | offsets] per row, Q8_0's
    quants plus 128 (K-quants: as they are)."""
    if qtype not in _HEADER_BYTES:
        return raw
    header, block_bytes = _HEADER_BYTES[qtype], GGML_QUANT_SIZES[qtype][1]
    blocks = raw.reshape(raw.shape[0], -1, block_bytes)
    quants = blocks[:, :, header:]
    if qtype == GGMLQuantizationType.Q8_0:  # int8 q -> q + 128 as uint8: the kernel's unsigned operand
        quants = quants ^ 0x80
    parts = [quants, blocks[:, :, 0:2]]
    if qtype == GGMLQuantizationType.Q4_1:
        parts.append(blocks[:, :, 2:4])
    return torch.cat([p.reshape(raw.shape[0], -1) for p in parts], dim=1)


def ungroup_rows(grouped: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """The inverse of ``regroup_rows``."""
    if qtype not in _HEADER_BYTES:
        return grouped
    header, block_bytes = _HEADER_BYTES[qtype], GGML_QUANT_SIZES[qtype][1]
    rows = grouped.shape[0]
    blocks = grouped.shape[1] // block_bytes
    quant_bytes = block_bytes - header
    qs = grouped[:, : blocks * quant_bytes].reshape(rows, blocks, quant_bytes)
    if qtype == GGMLQuantizationType.Q8_0:
        qs = qs ^ 0x80
    scales = grouped[:, blocks * quant_bytes :].reshape(rows, header // 2, blocks, 2).transpose(1, 2)
    return torch.cat([scales.reshape(rows, blocks, header), qs], dim=2).reshape(rows, -1)


# The types laid out in panels on the CPU (panels.py).
PANEL_TYPES = tuple(_HEADER_BYTES)


def panel_format(qtype: GGMLQuantizationType, in_features: int) -> panels.PanelFormat:
    """Regrouped rows of a ``PANEL_TYPES`` type as panels.py sees them: a group per block, the scales (and
    Q4_1's offsets) fp16."""
    header = _HEADER_BYTES[qtype]
    return panels.PanelFormat(GGML_QUANT_SIZES[qtype][1] - header, in_features // 32, 1, (2,) * (header // 2))


def amx_tiles(ops: ModuleType | None) -> bool:
    """Whether inputs of ``NATIVE_MAX_ROWS`` to ``AMX_MAX_ROWS`` rows (decode batches, short prompts) multiply
    quantized rows on AMX int8 tiles (pagoda/csrc/amx_tiles.h) instead of dequantized tiles and the dense
    matmul: the kernels were built for a CPU with AMX, Linux grants it, and ``PAGODA_DISABLE_AMX=1`` is not set."""
    return ops is not None and os.environ.get("PAGODA_DISABLE_AMX") != "1" and ops.amx_available()


def panels_for_prompts(ops: ModuleType | None) -> bool:
    """Whether inputs of more than ``NATIVE_MAX_ROWS`` rows (prompts, large decode batches) of a layer in panels
    (``PANEL_TYPES``, int4) stay on the VNNI panel kernel: the kernels have it (``decode_layers_supported`` is
    their VNNI build) and there are no AMX tiles (where there are, prompts keep the tile paths measured on such
    a CPU: AMX_MAX_ROWS)."""
    return ops is not None and ops.decode_layers_supported() and not amx_tiles(ops)


def tile_min_rows(ops: ModuleType | None) -> int:
    """Q4_0 / Q4_1 inputs of this many rows up to NATIVE_MAX_ROWS go to AMX tiles of their own instead of the
    VNNI kernel (0: never). Opt-in through PAGODA_TILE_MIN_ROWS (e.g. 6) on a CPU with AMX: on the bundled
    model a decode step of 6-16 rows ran 5-55% faster there than on the VNNI kernel before its panels, fewer
    rows slower (BENCHMARKS.md); both scale each block's int32 sums alike, so the outputs are the same."""
    raw = os.environ.get(TILE_MIN_ROWS_ENV, "0")
    try:
        rows = int(raw)
    except ValueError:
        raise ValueError(f"{TILE_MIN_ROWS_ENV} must be a row count (0: off), got {raw!r}") from None
    if not 0 <= rows <= NATIVE_MAX_ROWS:
        raise ValueError(f"{TILE_MIN_ROWS_ENV} must be 0 (off) to {NATIVE_MAX_ROWS}, got {rows}")
    return rows if rows and amx_tiles(ops) else 0


def _kernel_dequantize(ops: ModuleType, qweight: torch.Tensor, qtype: GGMLQuantizationType, in_features: int,
                       dtype: torch.dtype, rows: torch.Tensor | None = None) -> torch.Tensor:
    if dtype in (torch.float32, torch.bfloat16):
        return ops.gguf_dequantize(qweight, int(qtype), in_features, dtype, rows)
    return ops.gguf_dequantize(qweight, int(qtype), in_features, torch.float32, rows).to(dtype)


def dequantize_rows(ops: ModuleType | None, qweight: torch.Tensor, qtype: GGMLQuantizationType, in_features: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """A layer's weight (panels with ``ops``, regrouped rows without) -> [rows, in_features] of ``dtype``."""
    if ops is not None:
        return _kernel_dequantize(ops, qweight, qtype, in_features, dtype)
    raw = ungroup_rows(qweight, qtype).reshape(-1)
    return dequantize(raw, qtype, (qweight.shape[0], in_features)).to(dtype)


class GGUFLinearMethod:
    """One GGUF type for all of the layer's rows (every shard of a fused layer has it). ``ops``: the C++
    kernels for CPU tensors; CUDA tensors go to the Triton kernel."""

    def __init__(self, qtype: GGMLQuantizationType, ops: ModuleType | None) -> None:
        if qtype not in NATIVE_TYPES:
            raise ValueError(f"no native kernel for GGUF type {qtype.name}; native: {[t.name for t in NATIVE_TYPES]}")
        self.qtype = qtype
        self.ops = ops
        self.tile_min_rows = tile_min_rows(ops)
        self.panels_for_prompts = qtype in PANEL_TYPES and panels_for_prompts(ops)

    def create_weights(self, layer: Linear, in_features: int, output_sizes: list[int], bias: bool,
                       dtype: torch.dtype) -> None:
        weight = nn.Parameter(torch.empty(sum(output_sizes), row_bytes(self.qtype, in_features), dtype=torch.uint8),
                               requires_grad=False)
        weight.weight_loader = self._weight_loader(output_sizes)  # type: ignore[attr-defined]
        weight.num_shards = len(output_sizes)  # type: ignore[attr-defined]
        layer.weight = weight
        if bias:
            layer.bias = nn.Parameter(torch.empty(sum(output_sizes), dtype=dtype), requires_grad=False)
            layer.bias.weight_loader = weight.weight_loader  # type: ignore[attr-defined]
            layer.bias.num_shards = len(output_sizes)  # type: ignore[attr-defined]

    def _weight_loader(self, output_sizes: list[int]):  # noqa: ANN202 - a WeightLoader
        def load(param: nn.Parameter, tensor: torch.Tensor, shard: int | None, name: str) -> None:
            dest = param.data if shard is None else param.data.narrow(0, sum(output_sizes[:shard]), output_sizes[shard])
            if dest.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
            dest.copy_(regroup_rows(tensor, self.qtype) if param.dtype == torch.uint8 else tensor)

        return load

    def process_weights_after_loading(self, layer: Linear) -> None:
        """On the CPU kernels, Q4_0/Q4_1/Q8_0 rows take the panel layout."""
        if self.ops is not None and self.qtype in PANEL_TYPES and layer.weight.device.type == "cpu":
            panels.lay_out_once(layer, panel_format(self.qtype, layer.in_features))

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        kernel = gpu_kernel.kernel_for(x)
        if kernel is not None:
            return kernel.quantized_linear(x.contiguous(), layer.weight, int(self.qtype), layer.in_features,
                                           layer.bias)
        if batch_invariant():  # the VNNI kernel computes each row alone, at every row count the same way
            return self.ops.gguf_linear(x, layer.weight, int(self.qtype), layer.bias)
        if x.shape[0] <= NATIVE_MAX_ROWS:
            if self.tile_min_rows and x.shape[0] >= self.tile_min_rows and self.qtype in TILE_TYPES:
                return self.ops.gguf_linear_amx(x, layer.weight, int(self.qtype), layer.bias)
            return self.ops.gguf_linear(x, layer.weight, int(self.qtype), layer.bias)
        if x.shape[0] <= AMX_MAX_ROWS and self.qtype in AMX_TYPES and amx_tiles(self.ops):
            return self.ops.gguf_linear_amx(x, layer.weight, int(self.qtype), layer.bias)
        if self.panels_for_prompts:
            return self.ops.gguf_linear(x, layer.weight, int(self.qtype), layer.bias)
        tiles = [
            F.linear(x, dequantize_rows(self.ops, tile, self.qtype, layer.in_features, x.dtype))
            for tile in layer.weight.split(DEQUANT_TILE_ROWS)
        ]
        out = tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=-1)
        return out if layer.bias is None else out + layer.bias

    def embed(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        flat = ids if ids.dim() == 1 else ids.reshape(-1)  # a step's flat ids need no reshaping either way
        if self.ops is not None:
            rows = _kernel_dequantize(self.ops, layer.weight, self.qtype, layer.in_features, layer.dtype, flat)
        else:
            rows = dequantize_rows(None, layer.weight[flat], self.qtype, layer.in_features, layer.dtype)
        return rows if ids.dim() == 1 else rows.reshape(*ids.shape, layer.in_features)


@dataclass
class GGUFQuantConfig:
    """Which layers keep their GGUF blocks, from the file's tensor types (HF names). Building the model asks
    for each layer's method; ``native`` then names the checkpoint weights the loader hands over as raw rows."""

    types: dict[str, GGMLQuantizationType]
    ops: ModuleType | None  # the C++ kernels on the CPU; None on a GPU (the Triton kernel)
    native_types: tuple[GGMLQuantizationType, ...]  # what runs as stored there
    native: set[str] = field(default_factory=set)

    @classmethod
    def from_file(cls, gguf: GGUFFile, hf_name: Callable[[str], str], ops: ModuleType | None) -> GGUFQuantConfig:
        types = {hf_name(name): info.qtype for name, info in gguf.tensors.items() if name != "rope_freqs.weight"}
        return cls(types, ops, NATIVE_TYPES if ops is not None else GPU_NATIVE_TYPES)

    def linear_method(self, checkpoint_names: list[str]) -> GGUFLinearMethod | None:
        """The method for a layer made of these checkpoint weights (one, or the parts of a fused layer):
        native when they share one native type, else None (dense, dequantized at load)."""
        weights = [f"{name}.weight" for name in checkpoint_names]
        qtypes = {self.types.get(w) for w in weights}
        if len(qtypes) != 1:
            return None
        (qtype,) = qtypes
        if qtype not in self.native_types:
            return None
        self.native.update(weights)
        return GGUFLinearMethod(qtype, self.ops)
