"""Dense linear layer whose parameters are allocated but never initialized (weights are loaded).

Which kernel multiplies is a process-wide policy set by the engine:
* default: oneDNN, except products of <= 4 bf16 rows (decode of a few sequences), which are
  bound by reading the weights and run 2-3x faster in Pagoda's row-independent C++ kernel;
* batch-invariant: every product goes through the row-independent kernel. oneDNN chooses its
  kernel by row count, so a row's rounding changes with the batch; this mode makes a request's
  tokens independent of what else is batched, at a large cost for prefill.
"""

from __future__ import annotations

import os
from collections.abc import Callable

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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if _rowwise is not None and x.device.type == "cpu" and x.dim() == 2:
        if _batch_invariant:
            return _rowwise(x, weight, bias)
        if x.shape[0] <= SMALL_BATCH_ROWS and x.dtype == torch.bfloat16 and _rowwise_fast(x):
            return _rowwise(x, weight, bias)
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
