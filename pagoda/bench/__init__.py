"""`pagoda bench`: serving, offline, latency, roofline and start-up benchmarks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: str | Path, report: Any) -> None:
    """A benchmark's report as indented JSON at ``path`` (its folder created)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))



def free_device_memory() -> None:
    """Return the memory of engines the caller has dropped (their KV cache, CUDA graph pools) to the device
    now, before the next engine or peer allocates on it."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
