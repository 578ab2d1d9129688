"""Builds (once; torch caches the build) and loads Pagoda's C++ CPU kernels.

Returns None when they cannot be built (no compiler or ninja) or are disabled with
PAGODA_DISABLE_CPU_KERNELS=1; every caller keeps a pure-torch path.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)
_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_SOURCES = ["module.cpp", "paged_decode.cpp", "linear_rowwise.cpp", "argmax.cpp", "sample.cpp", "elementwise.cpp"]


@lru_cache(maxsize=1)
def load_cpu_kernels() -> ModuleType | None:
    if os.environ.get("PAGODA_DISABLE_CPU_KERNELS") == "1":
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="pagoda_cpu_ops",
            sources=[str(_CSRC / s) for s in _SOURCES],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(_CSRC)],
            verbose=False,
        )
    except Exception as exc:  # no compiler / ninja: the pure-torch paths still work
        logger.warning("Pagoda CPU kernels unavailable (%s); using slower torch paths", exc)
        return None
