"""HF ``architectures`` name -> model class."""

from __future__ import annotations

from pagoda.model.llama import LlamaForCausalLM
from pagoda.model.qwen3 import Qwen3ForCausalLM

MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,  # its Q/K/V biases come from the config (attention_bias)
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def model_class(architecture: str) -> type[LlamaForCausalLM]:
    if architecture not in MODEL_CLASSES:
        raise ValueError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(sorted(MODEL_CLASSES))}"
        )
    return MODEL_CLASSES[architecture]
