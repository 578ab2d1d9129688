"""Attention backends behind one interface; ``get_backend`` picks one by name and device."""

from __future__ import annotations

import os

from pagoda.model.attention.base import AttentionBackend, AttentionMetadata
from pagoda.model.attention.kv_format import KVCacheFormat


def get_backend(name: str, device: str, kv_format: KVCacheFormat, batch_invariant: bool = False,
                query_heads_per_kv: int = 1) -> AttentionBackend:
    """``auto``: triton on CUDA devices, torch elsewhere. ``triton`` on a CPU runs only under TRITON_INTERPRET=1.
    ``kv_format``: how the cache stores keys and values, and the model dtype; with the model's grouped-query
    ratio, that sizes the triton backend's prefill programs."""
    if name == "auto":
        name = "triton" if device.startswith("cuda") and not batch_invariant else "torch"
    if name == "torch":
        from pagoda.model.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend(kv_format, use_cpu_kernel=device == "cpu", batch_invariant=batch_invariant)
    if name == "triton":
        if batch_invariant:
            raise ValueError("batch_invariant=True needs attention_backend='torch'")
        if not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"attention_backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1), got {device}")
        try:
            from pagoda.model.attention.triton_backend import TritonAttentionBackend
        except ImportError as exc:
            raise ValueError(f"attention_backend 'triton' needs the triton package ({exc})") from None
        return TritonAttentionBackend(kv_format, query_heads_per_kv)
    raise ValueError(f"attention_backend {name!r} is not one of 'auto', 'torch', 'triton'")


__all__ = ["AttentionBackend", "AttentionMetadata", "get_backend"]
