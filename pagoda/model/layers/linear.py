"""Linear layers: each holds a ``LinearMethod`` that creates its parameters and multiplies, so a quantized
method (packed weights, scales) can replace the dense one layer by layer; each parameter carries the
``weight_loader`` that checks and copies a checkpoint tensor (or one shard of a fused one) into it.
Parameters are allocated but never initialized (weights are loaded).

Which kernel the dense method multiplies with is set once by the engine for its device:
* default: oneDNN, except products of <= 4 bf16 rows (decode of a few sequences), which are
  bound by reading the weights and run 2-3x faster in Pagoda's row-independent C++ kernel;
* batch-invariant: every product goes through the row-independent kernel. oneDNN chooses its
  kernel by row count, so a row's rounding changes with the batch; this mode makes a request's
  tokens independent of what else is batched, at a large cost for prefill.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from pagoda.model.cpu_kernels import load_cpu_kernels

# Largest row count sent to the C++ kernel by default (measured crossover with oneDNN).
SMALL_BATCH_ROWS = 4
# Shapes oneDNN keeps compiled matmuls for (its default: 1024); ONEDNN_PRIMITIVE_CACHE_CAPACITY overrides.
ONEDNN_PRIMITIVE_CACHE_CAPACITY = 256

LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
_rowwise: LinearFn | None = None
_rowwise_fast: Callable[[torch.Tensor], bool] | None = None
_batch_invariant = False


def configure_linear(batch_invariant: bool, device: str = "cpu") -> None:
    """Set the process-wide kernel policy (see the module note). Off the CPU every product is torch's."""
    global _rowwise, _rowwise_fast, _batch_invariant
    if device == "cpu":
        # oneDNN keeps a matmul primitive per input shape, up to 1024 by default; with a new row count in
        # most steps a long-running engine fills it and holds tens of MB more (BENCHMARKS.md, soak). Read
        # when oneDNN creates its cache, so this works until the process's first large matmul.
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_PRIMITIVE_CACHE_CAPACITY))
    ops = load_cpu_kernels() if device == "cpu" else None
    if batch_invariant and ops is None:
        raise ValueError("batch_invariant=True needs Pagoda's C++ CPU kernels, which failed to build")
    _rowwise = ops.linear_rowwise if ops is not None else None
    _rowwise_fast = ops.linear_rowwise_fast if ops is not None else None
    _batch_invariant = batch_invariant


def batch_invariant() -> bool:
    """Whether every product must be row-independent (the module note); quantized methods follow it too."""
    return _batch_invariant


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if _rowwise is not None and x.device.type == "cpu" and x.dim() == 2:
        if _batch_invariant:
            return _rowwise(x, weight, bias)
        if x.shape[0] <= SMALL_BATCH_ROWS and x.dtype == torch.bfloat16 and _rowwise_fast(x):
            return _rowwise(x, weight, bias)
    return F.linear(x, weight, bias)


WeightLoader = Callable[[nn.Parameter, torch.Tensor, "int | None", str], None]


def default_weight_loader(param: nn.Parameter, tensor: torch.Tensor, shard: int | None, name: str) -> None:
    """Copy a checkpoint tensor of exactly the parameter's shape."""
    _copy_checked(param.data, tensor, name)


def sharded_weight_loader(output_sizes: list[int]) -> WeightLoader:
    """For a parameter fused along its output rows from ``len(output_sizes)`` checkpoint tensors
    (q/k/v, gate/up): shard ``i`` fills rows ``sum(output_sizes[:i])`` on."""

    def load(param: nn.Parameter, tensor: torch.Tensor, shard: int | None, name: str) -> None:
        if shard is None:
            _copy_checked(param.data, tensor, name)
        else:
            _copy_checked(param.data.narrow(0, sum(output_sizes[:shard]), output_sizes[shard]), tensor, name)

    return load


def _copy_checked(dest: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if dest.shape != tensor.shape:
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
    dest.copy_(tensor)


class LinearMethod(Protocol):
    def create_weights(self, layer: Linear, in_features: int, output_sizes: list[int], bias: bool,
                       dtype: torch.dtype) -> None:
        """Register the layer's parameters, each with its ``weight_loader`` and ``num_shards``."""

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` for [tokens, in_features] ``x``."""

    def embed(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of W in the layer's dtype (a token embedding table, which a tied lm_head multiplies)."""


class UnquantizedLinearMethod:
    """Dense [out, in] weights in the model dtype, multiplied by the kernel the module note describes."""

    def create_weights(self, layer: Linear, in_features: int, output_sizes: list[int], bias: bool,
                       dtype: torch.dtype) -> None:
        out = sum(output_sizes)
        layer.weight = _parameter(torch.empty(out, in_features, dtype=dtype), output_sizes)
        layer.bias = _parameter(torch.empty(out, dtype=dtype), output_sizes) if bias else None

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return linear(x, layer.weight, layer.bias)

    def embed(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, layer.weight)


def _parameter(data: torch.Tensor, output_sizes: list[int]) -> nn.Parameter:
    param = nn.Parameter(data, requires_grad=False)
    param.weight_loader = sharded_weight_loader(output_sizes)  # type: ignore[attr-defined]
    param.num_shards = len(output_sizes)  # type: ignore[attr-defined]
    return param


class Linear(nn.Module):
    """``output_sizes``: one size, or the sizes of the checkpoint tensors fused along the output rows."""

    def __init__(self, in_features: int, output_sizes: int | list[int], bias: bool, dtype: torch.dtype,
                 method: LinearMethod | None = None) -> None:
        super().__init__()
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.in_features = in_features
        self.dtype = dtype
        self.method = method or UnquantizedLinearMethod()
        self.bias: nn.Parameter | None = None
        self.method.create_weights(self, in_features, self.output_sizes, bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.method.embed(self, ids)
