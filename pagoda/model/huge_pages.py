"""CPU memory on transparent huge pages for what a decode step streams: the weights and the KV cache.

A batch-1 decode step reads every weight once (~97 MB for the bundled model) and each layer's KV rows; on 4 kB
pages that is ~24,000 pages a token, each a TLB miss and a page walk whose own entries the stream has
evicted, and the hardware prefetchers stop at every page's end. Linux hands out 2 MB pages only where a
mapping asks for them (`/sys/kernel/mm/transparent_hugepage/enabled` is `madvise` on most distributions), so
the weights are moved into one mapping that asks (madvise MADV_HUGEPAGE) once they are loaded, and the KV
cache is allocated in one. ``PAGODA_DISABLE_HUGE_PAGES=1`` keeps torch's own allocations.
"""

from __future__ import annotations

import math
import mmap
import os

import torch
from torch import nn

HUGE_PAGE = 2 << 20
_ALIGN = 64  # each parameter's start: the kernels' vector loads


def enabled() -> bool:
    """Whether this platform can ask for huge pages and ``PAGODA_DISABLE_HUGE_PAGES=1`` is not set."""
    return hasattr(mmap, "MADV_HUGEPAGE") and os.environ.get("PAGODA_DISABLE_HUGE_PAGES") != "1"


def huge_page_bytes(nbytes: int) -> torch.Tensor:
    """An uninitialized uint8 CPU tensor of ``nbytes`` starting on a 2 MB boundary of a mapping that asked
    for huge pages (torch.empty where that is not possible). The mapping lives as long as the tensor's
    storage."""
    if not enabled() or nbytes < HUGE_PAGE:
        return torch.empty(nbytes, dtype=torch.uint8)
    # Private: an anonymous mmap is shared by default, i.e. shmem, whose huge pages are a separate setting.
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start : start + nbytes]


def huge_page_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(shape, dtype=dtype) on the CPU, in huge pages where possible."""
    return huge_page_bytes(math.prod(shape) * dtype.itemsize).view(dtype).view(shape)


def move_parameters(module: nn.Module) -> int:
    """Every CPU parameter of ``module`` moved into one huge-page mapping (contiguous, each 64-byte aligned);
    returns the bytes moved (0: nothing to gain, or not possible here)."""
    params = [p for p in module.parameters() if p.device.type == "cpu"]
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += (p.nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
    if not enabled() or total < HUGE_PAGE:
        return 0
    arena = huge_page_bytes(total)
    for p, at in zip(params, offsets):
        moved = arena[at : at + p.nbytes].view(p.dtype).view(p.shape)
        moved.copy_(p.data)
        p.data = moved
    return total
