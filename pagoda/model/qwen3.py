"""Qwen3: the Llama decoder with per-head RMSNorm on queries and keys before rotary."""

from __future__ import annotations

from pagoda.model.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
