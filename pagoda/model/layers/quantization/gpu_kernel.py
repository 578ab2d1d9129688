"""Whether a quantized layer's input gets the Triton kernel (triton_linear.py): on CUDA devices, when triton
imports and GPU kernels are not turned off (``PAGODA_DISABLE_GPU_KERNELS=1``, as for the other GPU kernels)."""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType

import torch

from pagoda.model.fused_ops import import_gpu_module


@lru_cache(maxsize=1)
def load() -> ModuleType | None:
    return import_gpu_module("pagoda.model.layers.quantization.triton_linear")


def kernel_for(x: torch.Tensor) -> ModuleType | None:
    """The Triton kernel's module where ``x`` lives on a CUDA device and the kernel is available, else None."""
    return load() if x.is_cuda else None
