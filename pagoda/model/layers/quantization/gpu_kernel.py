"""Whether a quantized layer's input gets the Triton kernel (triton_linear.py): on CUDA devices, when triton
imports and GPU kernels are not turned off (``PAGODA_DISABLE_GPU_KERNELS=1``, as for the other GPU kernels)."""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from types import ModuleType

import torch

logger = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def load() -> ModuleType | None:
    if os.environ.get("PAGODA_DISABLE_GPU_KERNELS") == "1":
        return None
    try:
        from pagoda.model.layers.quantization import triton_linear
    except ImportError as exc:
        logger.warning("Pagoda's Triton quantized-linear kernel unavailable (%s); quantized layers dequantize "
                       "on the GPU", exc)
        return None
    return triton_linear


def kernel_for(x: torch.Tensor) -> ModuleType | None:
    """The Triton kernel's module where ``x`` lives on a CUDA device and the kernel is available, else None."""
    return load() if x.is_cuda else None
