"""Integers of ``bits`` bits packed into int32 words, as GPTQ and AWQ checkpoints store them: ``32 // bits``
consecutive values along one dimension per word, value i at bits [i * bits, (i + 1) * bits) of the word
(AWQ: value ``order[i]`` of the run at position i)."""

from __future__ import annotations

import torch


def pack_int32(values: torch.Tensor, bits: int, dim: int, order: list[int] | None = None) -> torch.Tensor:
    """Unsigned ``values`` (< 2**bits) -> int32 words, ``32 // bits`` values of ``dim`` per word."""
    per_word = 32 // bits
    if values.shape[dim] % per_word:
        raise ValueError(f"cannot pack {values.shape[dim]} values of {bits} bits into whole int32 words")
    v = values.to(torch.int64).movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], -1, per_word)
    if order is not None:
        v = v[..., order]
    shifts = torch.arange(per_word, dtype=torch.int64, device=v.device) * bits
    words = (v << shifts).sum(dim=-1)  # the fields do not overlap: a sum is an or
    words = torch.where(words >= 2**31, words - 2**32, words)  # as the int32 of the same bits
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, dim: int, order: list[int] | None = None) -> torch.Tensor:
    """The inverse of ``pack_int32``: int32 words -> uint8 values (``32 // bits`` times as many along ``dim``)."""
    per_word = 32 // bits
    w = words.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64, device=w.device) * bits
    v = (w[..., None] >> shifts) & (2**bits - 1)
    if order is not None:  # position i holds value order[i] of the run: put each back at its own index
        v = v[..., torch.argsort(torch.tensor(order, device=v.device))]
    return v.reshape(*w.shape[:-1], -1).to(torch.uint8).movedim(-1, dim).contiguous()
