"""Attention backends behind one interface; ``get_backend`` picks one by name and device."""

from __future__ import annotations

from pagoda.model.attention.base import AttentionBackend, AttentionMetadata


def get_backend(name: str, device: str, batch_invariant: bool = False) -> AttentionBackend:
    if name in ("auto", "torch"):
        from pagoda.model.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend(batch_invariant=batch_invariant)
    raise ValueError(f"attention_backend {name!r} is not available on {device}; choose 'torch'")


__all__ = ["AttentionBackend", "AttentionMetadata", "get_backend"]
