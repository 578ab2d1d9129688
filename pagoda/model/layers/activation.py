"""The gated MLP activation: silu(gate) * up over a fused gate_up projection."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from pagoda.model import fused_ops


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    ops = fused_ops.for_tensor(gate_up)
    if ops is not None:
        return ops.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
