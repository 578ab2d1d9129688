"""Pagoda: a self-hostable LLM inference and serving stack."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "RequestOutputKind", "CompletionOutput",
           "__version__"]

_LAZY = {
    "LLM": "pagoda.engine.llm",
    "LLMEngine": "pagoda.engine.llm",
    "SamplingParams": "pagoda.api.params",
    "RequestOutput": "pagoda.api.outputs",
    "RequestOutputKind": "pagoda.api.outputs",
    "CompletionOutput": "pagoda.api.outputs",
}


def __getattr__(name: str) -> Any:
    # Imported on first use: the server process must not pay for torch, which the engine pulls in.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pagoda' has no attribute {name!r}")
