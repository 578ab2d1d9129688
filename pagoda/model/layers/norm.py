"""RMSNorm, optionally fused with the residual add before it (fused C++ / Triton kernel for the device when
there is one, else torch)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pagoda.model import fused_ops


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = fused_ops.for_tensor(x)
        if ops is not None:
            return ops.rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual + x`` (the new residual stream) and its norm; may update ``residual`` in place."""
        ops = fused_ops.for_tensor(x)
        if ops is not None and residual.is_contiguous() and residual.dim() == 2:
            return ops.add_rms_norm(x, residual, self.weight, self.eps), residual
        residual = residual + x
        return self.forward(residual), residual
