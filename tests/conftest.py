"""Shared fixtures: the bundled GGUF, and tiny random-weight HF checkpoints built on the fly."""

from __future__ import annotations

import json
import os

# CI has no GPU: the Triton kernels run in Triton's interpreter. Set before anything imports triton
# (its settings are read at import), whichever test module is collected first.
os.environ.setdefault("TRITON_INTERPRET", "1")
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from pagoda.model.gguf_file import GGUFFile
from pagoda.model.loader import resolve_model
from pagoda.model.tokenizer_source import tokenizer_from_gguf

TINY_VOCAB = 49152  # the bundled tokenizer's vocabulary, so tiny models can take text prompts


@pytest.fixture(scope="session")
def bundled_gguf() -> Path:
    return resolve_model("smollm2-135m").path


def tiny_hf_config(arch: str, **overrides: Any) -> Any:
    import transformers

    common = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
    }[arch]
    if arch == "qwen3":
        common.setdefault("head_dim", 16)
    return cls(**common)


def _hf_model_class(arch: str) -> Any:
    import transformers

    return {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
        "mistral": transformers.MistralForCausalLM,
    }[arch]


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory: pytest.TempPathFactory, bundled_gguf: Path) -> Callable[..., tuple[Path, Any]]:
    """Build (folder, hf_model): random weights saved as safetensors with the bundled tokenizer."""
    source = tokenizer_from_gguf(GGUFFile(bundled_gguf).metadata)

    def build(arch: str, seed: int = 0, **overrides: Any) -> tuple[Path, Any]:
        torch.manual_seed(seed)
        config = tiny_hf_config(arch, **overrides)
        model = _hf_model_class(arch)(config).eval()
        with torch.no_grad():  # non-trivial norm weights and biases, so a mix-up shows
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.1)
        folder = tmp_path_factory.mktemp(f"tiny-{arch}")
        model.save_pretrained(folder)
        source.tokenizer.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"chat_template": source.chat_template, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"})
        )
        return folder, model

    return build
