"""Uniform quantization grids, per row of a weight slice: one source for ``--quantization int4`` (round to
nearest as the weights load) and ``pagoda quantize`` (GPTQ, AWQ, round to nearest).

A grid of ``bits`` bits maps code q in [0, 2**bits - 1] to scale * (q - zero). Asymmetric grids span the
slice's [min, max] widened to take in 0 (so zero weights stay exact), symmetric ones [-m, m] with m = max|w|
and zero = 2**(bits - 1), as GPTQ's quantizer has them. Scales are rounded to fp16, the dtype checkpoints store
them in, before any code is computed against them.
"""

from __future__ import annotations

import torch


def grid(w: torch.Tensor, bits: int, sym: bool, min_zero: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), fp32 of shape [rows], for the rows of ``w`` [rows, cols]. ``min_zero``: the least zero an
    asymmetric grid may have (GPTQ's v1 format stores zero - 1, so it cannot hold 0): a grid that would put
    zero below it is stretched to reach the row's max from ``min_zero`` steps below 0."""
    levels = 2**bits - 1
    low, high = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
    if sym:
        m = torch.maximum(-low, high)
        scale = _fp16(2 * m / levels)
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    scale = _fp16((high - low) / levels)
    zero = torch.round(-low / scale).clamp(0, levels)
    short = zero < min_zero
    scale = torch.where(short, _fp16(high / (levels - min_zero)), scale)
    return scale, torch.where(short, torch.full_like(zero, min_zero), zero)


def _fp16(scale: torch.Tensor) -> torch.Tensor:
    scale = scale.to(torch.float16).float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale is exact


def to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (float, integral) of ``w`` [rows, cols] on the rows' grids ([rows] each)."""
    return torch.round(w / scale[:, None] + zero[:, None]).clamp_(0, 2**bits - 1)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``w`` rounded onto the rows' grids, as the values the codes stand for."""
    return scale[:, None] * (to_codes(w, scale, zero, bits) - zero[:, None])


def quantize_groups(weight: torch.Tensor, group_size: int, bits: int, sym: bool,
                    min_zero: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round to nearest in groups of ``group_size`` input columns (the last may be shorter): [out, in] float
    -> (codes uint8 [out, in], scale fp16 [out, groups], zero uint8 [out, groups])."""
    out, k = weight.shape
    groups = -(-k // group_size)
    w = weight.float()
    # A short last group is padded with its own first column, so that padding never widens its range.
    pad = groups * group_size - k
    if pad:
        w = torch.cat([w, w[:, (groups - 1) * group_size :][:, :1].expand(out, pad)], dim=1)
    flat = w.reshape(out * groups, group_size)
    scale, zero = grid(flat, bits, sym, min_zero)
    q = to_codes(flat, scale, zero, bits).reshape(out, -1)[:, :k]
    return q.to(torch.uint8), scale.reshape(out, groups).to(torch.float16), zero.reshape(out, groups).to(torch.uint8)



def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes [out, in] with per-group scale / zero [out, groups] -> [out, in] of ``dtype`` (fp32 arithmetic)."""
    cols = torch.arange(q.shape[1], device=q.device) // group_size
    return (scale.float()[:, cols] * (q.float() - zero.float()[:, cols])).to(dtype)
