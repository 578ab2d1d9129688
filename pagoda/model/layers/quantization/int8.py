"""``--quantization int8``: weight-only int8, symmetric per output channel (W[n] ~ scale[n] * q[n], q in
[-127, 127], scale = max|W[n]| / 127), quantized as each checkpoint tensor loads, so no dense copy of the
model is ever resident. Every projection is quantized, the embedding table / output projection included (a
small model's largest matrix: at batch 1 the logits read it whole).

On the CPU with Pagoda's C++ kernels each row is stored as GGUF Q8_0 blocks whose 32-weight scales all
hold the row's scale (fp16; q is computed against that rounded scale, so the grid is exactly per channel),
and runs through the GGUF kernel (pagoda/csrc/gguf_linear.cpp): int8 dot products with activations
quantized per 32 on the fly at decode (and on AMX tiles for 17-64 rows, see gguf.py), dequantized tiles for
the dense matmul at prefill. That costs 1/16 more bytes than bare int8 and measured faster than torch's
``_weight_int8pack_mm`` (BENCHMARKS.md), which serves without the kernels. On CUDA the Triton kernel
(triton_linear.py) reads the int8 rows as they are; elsewhere the weights are converted per call (correct,
not fast).
"""

from __future__ import annotations

from types import ModuleType

import torch
from gguf import GGMLQuantizationType
from torch import nn
from torch.nn import functional as F

from pagoda.model.layers.linear import Linear, batch_invariant, sharded_weight_loader
from pagoda.model.layers.quantization import gpu_kernel
from pagoda.model.layers.quantization.gguf import GGUFLinearMethod, regroup_rows

def quantize_int8_rows(weight: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in], scales [out] of ``scale_dtype``) with W[n] ~ scale[n] * q[n]."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).to(scale_dtype).float()
    q = torch.round(w / scale.clamp_min(1e-12)[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(scale_dtype)


def q8_0_rows(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] float -> per-channel int8 as regrouped Q8_0 rows (every block's scale the row's)."""
    q, scale = quantize_int8_rows(weight, torch.float16)
    return q8_0_blocks(q, scale[:, None].expand(-1, weight.shape[1] // 32))


def q8_0_blocks(q: torch.Tensor, block_scales: torch.Tensor) -> torch.Tensor:
    """int8 codes [out, in] with a scale per 32 of them [out, in / 32] -> regrouped Q8_0 rows."""
    rows, blocks = q.shape[0], q.shape[1] // 32
    scales = block_scales.to(torch.float16).reshape(-1).view(torch.uint8).reshape(rows, blocks, 2)
    raw = torch.cat([scales, q.view(torch.uint8).reshape(rows, blocks, 32)], dim=2).reshape(rows, -1)
    return regroup_rows(raw, GGMLQuantizationType.Q8_0)


class Int8LinearMethod:
    def __init__(self, ops: ModuleType | None) -> None:
        # Rows as Q8_0 blocks on the GGUF kernel when it exists and the width fits its blocks of 32.
        self.ops = ops

    def _kernel(self, in_features: int) -> GGUFLinearMethod | None:
        return GGUFLinearMethod(GGMLQuantizationType.Q8_0, self.ops) if self.ops and in_features % 32 == 0 else None

    def create_weights(self, layer: Linear, in_features: int, output_sizes: list[int], bias: bool,
                       dtype: torch.dtype) -> None:
        kernel = self._kernel(in_features)
        if kernel is not None:
            kernel.create_weights(layer, in_features, output_sizes, bias, dtype)

            def load_q8_0(param: nn.Parameter, tensor: torch.Tensor, shard: int | None, name: str) -> None:
                start, size = (0, param.shape[0]) if shard is None else (sum(output_sizes[:shard]), output_sizes[shard])
                if tensor.shape != (size, in_features):
                    raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                     f"expected {(size, in_features)}")
                param.data[start : start + size].copy_(q8_0_rows(tensor))  # the kernel's layout already

            layer.weight.weight_loader = load_q8_0  # type: ignore[attr-defined]
            layer.int8_kernel = kernel
            return
        rows = sum(output_sizes)
        weight = nn.Parameter(torch.empty(rows, in_features, dtype=torch.int8), requires_grad=False)
        scale = nn.Parameter(torch.empty(rows, dtype=dtype), requires_grad=False)

        def load(param: nn.Parameter, tensor: torch.Tensor, shard: int | None, name: str) -> None:
            start, size = (0, rows) if shard is None else (sum(output_sizes[:shard]), output_sizes[shard])
            if tensor.shape != (size, in_features):
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {(size, in_features)}")
            q, s = quantize_int8_rows(tensor)
            param.data[start : start + size].copy_(q)
            scale.data[start : start + size].copy_(s)

        weight.weight_loader = load  # type: ignore[attr-defined]
        weight.num_shards = len(output_sizes)  # type: ignore[attr-defined]
        layer.weight = weight
        layer.weight_scale = scale  # written by the weight's loader
        scale.num_shards = 0  # type: ignore[attr-defined]  # no checkpoint tensor of its own
        if bias:
            layer.bias = nn.Parameter(torch.empty(rows, dtype=dtype), requires_grad=False)
            layer.bias.weight_loader = sharded_weight_loader(output_sizes)  # type: ignore[attr-defined]
            layer.bias.num_shards = len(output_sizes)  # type: ignore[attr-defined]

    def process_weights_after_loading(self, layer: Linear) -> None:
        kernel = getattr(layer, "int8_kernel", None)
        if kernel is not None:
            kernel.process_weights_after_loading(layer)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        kernel = getattr(layer, "int8_kernel", None)
        if kernel is not None:
            return kernel.apply(layer, x)
        gpu = gpu_kernel.kernel_for(x)
        if gpu is not None and layer.in_features % 32 == 0:
            return gpu.quantized_linear(x.contiguous(), layer.weight, gpu.INT8, layer.in_features, layer.bias,
                                        scale=layer.weight_scale)
        if x.device.type == "cpu":
            scale = layer.weight_scale.to(x.dtype)
            if batch_invariant() and x.shape[0] > 1:  # one row per call: the same kernel whatever the batch
                out = torch.cat([torch._weight_int8pack_mm(row, layer.weight, scale) for row in x.split(1)])
            else:
                out = torch._weight_int8pack_mm(x, layer.weight, scale)
        else:
            out = F.linear(x, layer.weight.to(x.dtype)) * layer.weight_scale.to(x.dtype)
        return out if layer.bias is None else out + layer.bias

    def embed(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        kernel = getattr(layer, "int8_kernel", None)
        if kernel is not None:
            return kernel.embed(layer, ids)
        return F.embedding(ids, layer.weight).to(layer.dtype) * layer.weight_scale[ids, None].to(layer.dtype)


class Int8QuantConfig:
    """Every projection int8. ``ops``: the C++ kernels, on the CPU."""

    def __init__(self, ops: ModuleType | None) -> None:
        self.ops = ops

    def linear_method(self, checkpoint_names: list[str]) -> Int8LinearMethod | None:
        return Int8LinearMethod(self.ops)
