"""Pagoda: a self-hostable LLM inference and serving stack."""

from pagoda.engine.engine import LLM, LLMEngine
from pagoda.engine.request import CompletionOutput, RequestOutput, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
