"""Qwen2: the Llama decoder with biases on the Q/K/V projections (set from the config)."""

from __future__ import annotations

from pagoda.model.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qk_norm = False
