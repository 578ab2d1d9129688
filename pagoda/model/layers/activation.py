"""The gated MLP activation: silu(gate) * up over a fused gate_up projection."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from pagoda.model.cpu_kernels import load_cpu_kernels


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    ops = load_cpu_kernels() if gate_up.device.type == "cpu" else None
    if ops is not None and gate_up.dtype in (torch.float32, torch.bfloat16):
        return ops.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
