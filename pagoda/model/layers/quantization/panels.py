"""Quantized weight rows laid out in panels of ``PANEL_ROWS`` rows for the CPU kernels (pagoda/csrc/quant_panels.h):
GGUF Q4_0/Q4_1/Q8_0 (gguf.py) and group-wise int4 (int4.py).

Both store a row as [quants | each parameter for every group], a group being one block of 32 inputs (GGUF)
or G inputs (int4). In a panel the same bytes go group by group: the group's blocks, each as word t (4 bytes
of quants) of every row side by side for every t, then the group's parameters, each for every row side by
side. The tensor keeps its [rows, row bytes] shape: a slice of whole panels is a layer of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pagoda.model.layers.linear import Linear

PANEL_ROWS = 16


@dataclass(frozen=True)
class PanelFormat:
    """How a row's bytes divide: ``blocks`` blocks of ``quant_bytes`` each, ``group_blocks`` blocks a group (the
    last group may have fewer), and per group one value of ``param_bytes[i]`` bytes for each parameter i."""

    quant_bytes: int
    blocks: int
    group_blocks: int
    param_bytes: tuple[int, ...]

    @property
    def groups(self) -> int:
        return -(-self.blocks // self.group_blocks)

    @property
    def row_bytes(self) -> int:
        return self.blocks * self.quant_bytes + self.groups * sum(self.param_bytes)


def _pack_width(rows: torch.Tensor, fmt: PanelFormat, width: int) -> torch.Tensor:
    """Rows of whole panels of ``width`` rows -> those panels."""
    panels = rows.shape[0] // width
    quant_end = fmt.blocks * fmt.quant_bytes
    blocks = (rows[:, :quant_end].reshape(panels, width, fmt.blocks, fmt.quant_bytes // 4, 4)
              .permute(0, 2, 3, 1, 4).reshape(panels, fmt.blocks, -1))
    params, at = [], quant_end
    for size in fmt.param_bytes:
        part = rows[:, at : at + fmt.groups * size].reshape(panels, width, fmt.groups, size)
        params.append(part.permute(0, 2, 1, 3).reshape(panels, fmt.groups, -1))
        at += fmt.groups * size
    group_params = torch.cat(params, dim=2)
    whole = fmt.blocks // fmt.group_blocks
    parts = [torch.cat([blocks[:, : whole * fmt.group_blocks].reshape(panels, whole, -1), group_params[:, :whole]],
                       dim=2).reshape(panels, -1)]
    if whole < fmt.groups:  # the short last group
        parts += [blocks[:, whole * fmt.group_blocks :].reshape(panels, -1), group_params[:, whole]]
    return torch.cat(parts, dim=1).reshape(panels * width, -1)


def _unpack_width(panels: torch.Tensor, fmt: PanelFormat, width: int) -> torch.Tensor:
    """The inverse of ``_pack_width``."""
    count = panels.shape[0] // width
    flat = panels.reshape(count, -1)
    whole = fmt.blocks // fmt.group_blocks
    block_bytes, param_bytes = fmt.quant_bytes * width, sum(fmt.param_bytes) * width
    whole_end = whole * (fmt.group_blocks * block_bytes + param_bytes)
    groups = flat[:, :whole_end].reshape(count, whole, -1)
    blocks = [groups[:, :, : fmt.group_blocks * block_bytes].reshape(count, -1, block_bytes)]
    group_params = [groups[:, :, fmt.group_blocks * block_bytes :]]
    if whole < fmt.groups:
        tail_blocks = (fmt.blocks - whole * fmt.group_blocks) * block_bytes
        blocks.append(flat[:, whole_end : whole_end + tail_blocks].reshape(count, -1, block_bytes))
        group_params.append(flat[:, whole_end + tail_blocks :].reshape(count, 1, param_bytes))
    quants = (torch.cat(blocks, dim=1).reshape(count, fmt.blocks, fmt.quant_bytes // 4, width, 4)
              .permute(0, 3, 1, 2, 4).reshape(count * width, -1))
    params, at = [quants], 0
    all_params = torch.cat(group_params, dim=1)
    for size in fmt.param_bytes:
        part = all_params[:, :, at * width : (at + size) * width].reshape(count, fmt.groups, width, size)
        params.append(part.permute(0, 2, 1, 3).reshape(count * width, -1))
        at += size
    return torch.cat(params, dim=1)


def _by_width(rows: torch.Tensor, fmt: PanelFormat, convert) -> torch.Tensor:  # noqa: ANN001 - _pack/_unpack_width
    if rows.shape[1] != fmt.row_bytes:
        raise ValueError(f"rows of {rows.shape[1]} bytes do not match their format's {fmt.row_bytes}")
    whole = rows.shape[0] // PANEL_ROWS * PANEL_ROWS
    parts = [convert(rows[:whole], fmt, PANEL_ROWS)] if whole else []
    if whole < rows.shape[0]:  # the last, narrower panel
        parts.append(convert(rows[whole:], fmt, rows.shape[0] - whole))
    return torch.cat(parts) if parts else rows.clone()


def pack(rows: torch.Tensor, fmt: PanelFormat) -> torch.Tensor:
    """uint8 rows [n, row bytes] -> the same bytes in panels (the last panel may be narrower)."""
    return _by_width(rows, fmt, _pack_width)


def unpack(panels: torch.Tensor, fmt: PanelFormat) -> torch.Tensor:
    """The inverse of ``pack``."""
    return _by_width(panels, fmt, _unpack_width)


def lay_out_once(layer: Linear, fmt: PanelFormat) -> None:
    """``layer.weight``'s rows into panels, once (``layer.in_panels``): the model's pass after loading may run
    again, as after dummy weights."""
    if not getattr(layer, "in_panels", False):
        weight: nn.Parameter = layer.weight
        weight.data.copy_(pack(weight.data, fmt))
        layer.in_panels = True
