"""Which fused elementwise kernels (RMSNorm, residual add + RMSNorm, SiLU-and-mul, rotary) a tensor's
device gets: Pagoda's C++ kernels on the CPU, its Triton kernels on CUDA, None (the torch paths) when those
are unavailable or turned off (``PAGODA_DISABLE_CPU_KERNELS=1``, ``PAGODA_DISABLE_GPU_KERNELS=1``). Both
sets have the same functions with the same signatures, so a layer calls whichever it is given."""

from __future__ import annotations

import importlib
import logging
import os
from functools import lru_cache
from types import ModuleType

import torch

from pagoda.model.cpu_kernels import load_cpu_kernels

logger = logging.getLogger(__name__)
# The dtypes the C++ kernels take; the Triton ones take float16 too.
FUSED_DTYPES = (torch.float32, torch.bfloat16)
GPU_FUSED_DTYPES = (*FUSED_DTYPES, torch.float16)


def import_gpu_module(module: str) -> ModuleType | None:
    """A module of Triton kernels, or None: GPU kernels turned off (``PAGODA_DISABLE_GPU_KERNELS=1``) or no triton."""
    if os.environ.get("PAGODA_DISABLE_GPU_KERNELS") == "1":
        return None
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        logger.warning("Pagoda's Triton kernels in %s unavailable (%s); using slower torch paths", module, exc)
        return None


@lru_cache(maxsize=1)
def load_gpu_kernels() -> ModuleType | None:
    return import_gpu_module("pagoda.model.layers.triton_elementwise")


def for_tensor(x: torch.Tensor) -> ModuleType | None:
    """The fused kernels for ``x`` (by its device and dtype), or None."""
    if x.device.type == "cpu" and x.dtype in FUSED_DTYPES:
        return load_cpu_kernels()
    if x.device.type == "cuda" and x.dtype in GPU_FUSED_DTYPES:
        return load_gpu_kernels()
    return None
