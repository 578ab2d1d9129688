"""RMSNorm, optionally fused with the residual add before it (C++ kernel when built, else torch)."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn
from torch.nn import functional as F

from pagoda.model.cpu_kernels import load_cpu_kernels

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)
        self.eps = eps

    @property
    def ops(self) -> ModuleType | None:
        return load_cpu_kernels()  # cached; only asked for on the CPU, so a GPU run never builds them

    def _kernel_ok(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES and self.ops is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_ok(x):
            return self.ops.rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual + x`` (the new residual stream) and its norm; may update ``residual`` in place."""
        if self._kernel_ok(x) and residual.is_contiguous() and residual.dim() == 2:
            return self.ops.add_rms_norm(x, residual, self.weight, self.eps), residual
        residual = residual + x
        return self.forward(residual), residual
