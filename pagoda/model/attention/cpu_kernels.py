"""Builds (once, cached by torch) and loads the C++ CPU attention kernels; None when no compiler works."""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)
_SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"


@lru_cache(maxsize=1)
def load_cpu_kernels() -> ModuleType | None:
    if os.environ.get("PAGODA_DISABLE_CPU_KERNELS") == "1":
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="pagoda_cpu_attention",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler / ninja: the pure-torch path still works
        logger.warning("CPU attention kernel unavailable (%s); using the slower torch path", exc)
        return None
