"""Writes a quantized model as an HF folder in GPTQ's or AWQ's layout (what AutoGPTQ / AutoAWQ write and vLLM,
transformers and Pagoda load): config.json with its ``quantization_config``, model.safetensors, and the
tokenizer (tokenizer.json, tokenizer_config.json with the chat template, generation_config.json).
The packed layouts are the loaders' (pagoda/model/layers/quantization/gptq.py, awq.py), written by
``pack_int32``; the fused q/k/v and gate/up projections are split back into the checkpoint's tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pagoda.model.arch_config import ArchConfig
from pagoda.model.layers.quantization import awq
from pagoda.model.layers.quantization.packing import pack_int32
from pagoda.model.llama import RENAMED_MODULES, LlamaForCausalLM
from pagoda.model.tokenizer_source import TokenizerSource
from pagoda.quantize.gptq import QuantizedWeight

_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                "Qwen3ForCausalLM": "qwen3"}
DENSE_DTYPE = torch.float16  # what GPTQ/AWQ checkpoints keep their unquantized tensors and scales in


def hf_config(arch: ArchConfig) -> dict[str, Any]:
    """config.json fields that ArchConfig.from_hf reads back to ``arch``."""
    return {
        "architectures": [arch.architecture],
        "model_type": _MODEL_TYPES.get(arch.architecture, "llama"),
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_hidden_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads,
        "head_dim": arch.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta,
        "rope_scaling": arch.rope_scaling,
        "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "attention_bias": arch.attention_bias,
        "sliding_window": arch.sliding_window,
        "use_sliding_window": arch.sliding_window is not None,
        "bos_token_id": arch.bos_token_id,
        "eos_token_id": arch.eos_token_ids[0] if len(arch.eos_token_ids) == 1 else arch.eos_token_ids,
        "torch_dtype": "float16",
    }


def _parts(model: LlamaForCausalLM, fused: str) -> list[tuple[str, slice]]:
    """HF projection names within one of our (possibly fused) projections, with their output rows."""
    cfg = model.config
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {
        "qkv_proj": [("self_attn.q_proj", slice(0, q)), ("self_attn.k_proj", slice(q, q + kv)),
                     ("self_attn.v_proj", slice(q + kv, q + 2 * kv))],
        "o_proj": [("self_attn.o_proj", slice(None))],
        "gate_up_proj": [("mlp.gate_proj", slice(0, cfg.intermediate_size)),
                         ("mlp.up_proj", slice(cfg.intermediate_size, None))],
        "down_proj": [("mlp.down_proj", slice(None))],
    }[fused]


def _gptq_tensors(w: QuantizedWeight, bits: int) -> dict[str, torch.Tensor]:
    stored_zero = (w.zero.to(torch.int16) - 1) & (2**bits - 1)  # v1 stores zero - 1 (zeros are >= 1 here)
    return {"qweight": pack_int32(w.q.T, bits, dim=0), "qzeros": pack_int32(stored_zero.T, bits, dim=1),
            "scales": w.scale.T.contiguous(), "g_idx": w.g_idx.clone()}


def _awq_tensors(w: QuantizedWeight) -> dict[str, torch.Tensor]:
    return {"qweight": pack_int32(w.q.T, 4, dim=1, order=awq.ORDER),
            "qzeros": pack_int32(w.zero.T, 4, dim=1, order=awq.ORDER), "scales": w.scale.T.contiguous()}


_GLOBAL_NAMES = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "lm_head.weight": "lm_head.weight"}
_HF_MODULES = {ours: hf for hf, ours in RENAMED_MODULES.items()}


def checkpoint_tensors(model: LlamaForCausalLM, quantized: dict[str, QuantizedWeight], layout: str,
                       bits: int) -> dict[str, torch.Tensor]:
    """HF-named tensors: the quantized projections packed in ``layout`` (gptq / awq), the rest in fp16."""
    params = dict(model.named_parameters())
    tensors: dict[str, torch.Tensor] = {}
    for name, param in params.items():
        owner, leaf = name.rsplit(".", 1)
        if owner in quantized:
            continue
        if name in _GLOBAL_NAMES:
            hf = _GLOBAL_NAMES[name]
        else:
            _, index, module = owner.split(".", 2)
            hf = f"model.layers.{index}.{_HF_MODULES[module]}.{leaf}"
        tensors[hf] = param.detach().to(DENSE_DTYPE).contiguous()
    for owner, weight in quantized.items():
        _, index, fused = owner.split(".")
        bias = params.get(f"{owner}.bias")
        for part, rows in _parts(model, fused):
            piece = QuantizedWeight(weight.q[rows], weight.scale[rows], weight.zero[rows], weight.g_idx)
            packed = _gptq_tensors(piece, bits) if layout == "gptq" else _awq_tensors(piece)
            if bias is not None:
                packed["bias"] = bias.detach()[rows].to(DENSE_DTYPE)
            for leaf, tensor in packed.items():
                tensors[f"model.layers.{index}.{part}.{leaf}"] = tensor.contiguous()
    return tensors


def write_checkpoint(folder: Path, arch: ArchConfig, tokenizer: TokenizerSource, tensors: dict[str, torch.Tensor], quantization_config: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(arch) | {"quantization_config": quantization_config}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": tokenizer.chat_template, "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token},
        indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": arch.bos_token_id, "eos_token_id": tokenizer.eos_token_ids or arch.eos_token_ids},
        indent=2) + "\n")
