"""Rotary position embedding (rotate-half convention) with linear and llama3 frequency scaling."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pagoda.model import fused_ops


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    # On the host whatever the default device: the same frequencies bit for bit on every device.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_scaling(inv_freq, scaling)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def _llama3_scaling(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_factor = float(scaling["low_freq_factor"])
    high_factor = float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    low_wavelen = old_context / low_factor
    high_wavelen = old_context / high_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_factor) / (high_factor - low_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


@dataclass
class RotaryAngles:
    """cos and sin of every (token, frequency) of a step, fp32 [tokens, head_dim / 2]; shared by all layers."""

    cos: torch.Tensor
    sin: torch.Tensor


class RotaryEmbedding:
    """On the CPU the angles of every position seen so far are kept, in tables that double as longer sequences
    come: a step looks its rows up in numpy, where four torch ops took ~70 us of a ~5 ms bundled-model token.
    The tables hold what those ops give for each position, so the angles are the same either way."""

    TABLE_MIN_POSITIONS = 1024

    def __init__(self, inv_freq: torch.Tensor) -> None:
        self.inv_freq = inv_freq
        self.cos_table: np.ndarray | None = None  # [positions, head_dim / 2] fp32, on the CPU
        self.sin_table: np.ndarray | None = None

    def angles(self, positions: torch.Tensor) -> RotaryAngles:
        if positions.device.type != "cpu" or self.inv_freq.device.type != "cpu":
            return self._computed(positions)
        at = positions.numpy()
        if self.cos_table is not None:
            try:  # positions past the table are rare: no search for the largest in every step
                return RotaryAngles(torch.from_numpy(self.cos_table[at]), torch.from_numpy(self.sin_table[at]))
            except IndexError:
                pass
        needed = int(at.max()) + 1 if at.size else 0
        known = 0 if self.cos_table is None else len(self.cos_table)
        table = self._computed(torch.arange(max(needed, 2 * known, self.TABLE_MIN_POSITIONS)))
        self.cos_table, self.sin_table = table.cos.numpy(), table.sin.numpy()
        return RotaryAngles(torch.from_numpy(self.cos_table[at]), torch.from_numpy(self.sin_table[at]))

    def _computed(self, positions: torch.Tensor) -> RotaryAngles:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        return RotaryAngles(freqs.cos(), freqs.sin())


def apply_rotary_(x: torch.Tensor, angles: RotaryAngles) -> torch.Tensor:
    """Rotate ``x`` [tokens, heads, head_dim] in place (heads * head_dim dense per token) and return it."""
    ops = fused_ops.for_tensor(x)
    if ops is not None:
        ops.rotary_inplace(x, angles.cos, angles.sin)
        return x
    # As HF computes it: cos/sin rounded to the model dtype, products in that dtype.
    cos = torch.cat((angles.cos, angles.cos), dim=-1)[:, None, :].to(x.dtype)
    sin = torch.cat((angles.sin, angles.sin), dim=-1)[:, None, :].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    x.copy_(x * cos + rotated * sin)
    return x
