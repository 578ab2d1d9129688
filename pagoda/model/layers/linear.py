"""Dense linear layer whose parameters are allocated but never initialized (weights are loaded).

Decode steps with a handful of rows are bound by reading the weights; there the C++
bf16 kernel streams them about 2-3x faster than oneDNN, which wins from a few rows up.
Switching kernels by row count changes a row's rounding with the batch size, so the
kernel is off unless the engine runs with ``batch_invariant=False``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
from torch import nn
from torch.nn import functional as F

from pagoda.model.cpu_kernels import load_cpu_kernels

# Largest row count sent to the C++ kernel (measured crossover with oneDNN on AVX-512 BF16 CPUs).
SMALL_BATCH_ROWS = 4

LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


_small_batch_enabled = False


def enable_small_batch_kernel(enabled: bool) -> None:
    """Process-wide: whether few-row bf16 products use the C++ kernel (see the module note)."""
    global _small_batch_enabled
    _small_batch_enabled = enabled


@lru_cache(maxsize=1)
def _small_batch_kernel() -> LinearFn | None:
    ops = load_cpu_kernels()
    if ops is None or not ops.linear_bf16_supported():
        return None
    return ops.linear_bf16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if (
        _small_batch_enabled
        and x.dim() == 2
        and x.shape[0] <= SMALL_BATCH_ROWS
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and x.shape[1] % 32 == 0
    ):
        kernel = _small_batch_kernel()
        if kernel is not None:
            return kernel(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
