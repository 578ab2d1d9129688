"""Llama-family decoder (Llama 2/3/3.1, Mistral, SmolLM2); Qwen2 and Qwen3 set two switches.

Q/K/V and gate/up projections are stored fused so each layer runs two big
matmuls instead of five small ones; ``load_weights`` takes HF tensor names and
stacks the pieces into place.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Protocol

import torch
from torch import nn

from pagoda.model.arch_config import ArchConfig
from pagoda.model.attention.base import AttentionBackend, AttentionMetadata
from pagoda.model.cpu_kernels import load_cpu_kernels
from pagoda.model import huge_pages
from pagoda.model.fused_decode import FusedDecode
from pagoda.model.layers.linear import Linear, LinearMethod, default_weight_loader
from pagoda.model.layers.norm import RMSNorm
from pagoda.model.layers.activation import silu_and_mul
from pagoda.model.layers.rotary import RotaryAngles, RotaryEmbedding, apply_rotary_, inverse_frequencies


class QuantConfig(Protocol):
    def linear_method(self, checkpoint_names: list[str]) -> LinearMethod | None:
        """The method for the layer made of these HF-named checkpoint weights (None: dense)."""


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, dtype: torch.dtype, qk_norm: bool, quant: QuantConfig | None,
                 prefix: str) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        hidden = cfg.hidden_size
        self.input_layernorm = RMSNorm(hidden, cfg.rms_norm_eps, dtype)

        def method(*parts: str) -> LinearMethod | None:
            return quant.linear_method([f"{prefix}.{p}" for p in parts]) if quant else None

        self.qkv_proj = Linear(hidden, [self.q_size, self.kv_size, self.kv_size], cfg.attention_bias, dtype,
                               method("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
        self.o_proj = Linear(self.q_size, hidden, False, dtype, method("self_attn.o_proj"))
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype) if qk_norm else None
        self.post_attention_layernorm = RMSNorm(hidden, cfg.rms_norm_eps, dtype)
        # A checkpoint's per-tensor scales for an fp8 KV cache (vLLM's k_scale / v_scale), else 1.0.
        self.kv_scales = (1.0, 1.0)
        self.gate_up_proj = Linear(hidden, [cfg.intermediate_size] * 2, False, dtype, method("mlp.gate_proj", "mlp.up_proj"))
        self.down_proj = Linear(cfg.intermediate_size, hidden, False, dtype, method("mlp.down_proj"))

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        angles: RotaryAngles,
        kv_cache: torch.Tensor,
        attn: AttentionBackend,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it); the next norm adds the two."""
        if residual is None:
            residual = hidden
            normed = self.input_layernorm(hidden)
        else:
            normed, residual = self.input_layernorm.add_forward(hidden, residual)
        tokens = normed.shape[0]
        qkv = self.qkv_proj(normed)
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)
        # Queries and keys side by side: one rotary pass for both.
        q, k = apply_rotary_(qk, angles).split([self.num_heads, self.num_kv_heads], dim=1)
        o = attn.forward(q, k, v, kv_cache, metadata, self.scale, self.kv_scales)
        normed, residual = self.post_attention_layernorm.add_forward(self.o_proj(o.reshape(tokens, self.q_size)), residual)
        return self.down_proj(silu_and_mul(self.gate_up_proj(normed))), residual


_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
_KV_SCALE = re.compile(r"model\.layers\.(\d+)\.self_attn\.(k|v)_scale")
# HF sub-name -> (our parameter, which shard of the fused tensor).
_STACKED = {
    "self_attn.q_proj": ("qkv_proj", 0),
    "self_attn.k_proj": ("qkv_proj", 1),
    "self_attn.v_proj": ("qkv_proj", 2),
    "mlp.gate_proj": ("gate_up_proj", 0),
    "mlp.up_proj": ("gate_up_proj", 1),
}
RENAMED_MODULES = {
    "self_attn.o_proj": "o_proj",
    "mlp.down_proj": "down_proj",
    "self_attn.q_norm": "q_norm",
    "self_attn.k_norm": "k_norm",
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
}


class LlamaForCausalLM(nn.Module):
    qk_norm = False

    def __init__(self, cfg: ArchConfig, dtype: torch.dtype, quant: QuantConfig | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.dtype = dtype
        # The embedding table as a linear layer [vocab, hidden]: a tied lm_head multiplies by it.
        self.embed_tokens = Linear(cfg.hidden_size, cfg.vocab_size, False, dtype,
                                   quant.linear_method(["model.embed_tokens"]) if quant else None)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, self.qk_norm, quant, f"model.layers.{i}")
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, False, dtype,
                        quant.linear_method(["lm_head"]) if quant else None)
        )
        self.fused_decode: FusedDecode | None = None  # set once the weights are in
        inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.rotary = RotaryEmbedding(inv_freq.to(self.embed_tokens.weight.device))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: AttentionBackend,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Final hidden states [num_tokens, hidden] (normed) for a flat batch."""
        hidden = self.embed_tokens.embed(input_ids)
        angles = self.rotary.angles(positions)
        if self.fused_decode is not None and attn.name == "torch" and self.fused_decode.fits(hidden):
            return self.fused_decode.run(hidden, angles, kv_caches, metadata)
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(hidden, residual, angles, kv_cache, attn, metadata)
        if residual is None:
            return self.norm(hidden)
        return self.norm.add_forward(hidden, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model dtype (the sampler upcasts only when it needs to)."""
        return (self.embed_tokens if self.lm_head is None else self.lm_head)(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Hand HF-named tensors to their parameters' weight loaders (which check the shapes); every
        parameter, and every shard of a fused one, must be written exactly once."""
        params = dict(self.named_parameters())
        written: set[str] = set()
        for name, tensor in weights:
            kv_scale = _KV_SCALE.fullmatch(name)
            if kv_scale:
                index = int(kv_scale.group(1))
                value = float(tensor.reshape(-1)[0]) if tensor.numel() == 1 else math.nan
                if index >= len(self.layers) or not (math.isfinite(value) and value > 0):
                    raise ValueError(f"checkpoint tensor {name!r} is not one positive scale of one of the "
                                     f"{len(self.layers)} layers")
                layer = self.layers[index]
                layer.kv_scales = (value, layer.kv_scales[1]) if kv_scale.group(2) == "k" else (layer.kv_scales[0], value)
                continue
            target, shard = self._locate(name)
            if target is None:
                continue
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            param = params[target]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard, name)
            written.add(target if shard is None else f"{target}#{shard}")
        expected = set()
        for pname, param in params.items():
            shards = getattr(param, "num_shards", 1)
            expected.update([pname] if shards == 1 else (f"{pname}#{i}" for i in range(shards)))
        missing = sorted(expected - written)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
        self.process_weights_after_loading()

    def process_weights_after_loading(self) -> None:
        """Layers loaded in a checkpoint's layout (GPTQ, AWQ) take the form their kernels multiply; the CPU
        weights move to huge pages (huge_pages.py); then the one-call decode path is set up where every layer
        runs on the CPU's quantized kernels."""
        for module in self.modules():
            finish = getattr(getattr(module, "method", None), "process_weights_after_loading", None)
            if finish is not None:
                finish(module)
        huge_pages.move_parameters(self)
        self.fused_decode = FusedDecode.of(self, load_cpu_kernels())

    def _locate(self, name: str) -> tuple[str | None, int | None]:
        """Our parameter for an HF tensor name, and which shard of it (None: all of it)."""
        if name == "model.embed_tokens.weight":
            return "embed_tokens.weight", None
        if name == "model.norm.weight":
            return "norm.weight", None
        if name == "lm_head.weight":
            return (None if self.lm_head is None else "lm_head.weight"), None
        if name.endswith("rotary_emb.inv_freq"):
            return None, None
        m = _LAYER_NAME.fullmatch(name)
        if not m:
            raise ValueError(f"unexpected checkpoint tensor {name!r}")
        layer, rest = m.group(1), m.group(2)
        module, _, leaf = rest.rpartition(".")
        if module in _STACKED:
            target, shard = _STACKED[module]
            return f"layers.{layer}.{target}.{leaf}", shard
        if module in RENAMED_MODULES:
            return f"layers.{layer}.{RENAMED_MODULES[module]}.{leaf}", None
        raise ValueError(f"unexpected checkpoint tensor {name!r}")

    def init_dummy_weights(self, seed: int = 0) -> None:
        # Drawn where the weights live: an 8B model's worth of host-side randn would take minutes.
        device = self.embed_tokens.weight.device
        generator = torch.Generator(device=device).manual_seed(seed)
        for name, param in self.named_parameters():
            if name.endswith("g_idx"):  # GPTQ's column groups: the default (in order) is the valid one
                continue
            if "norm" in name:
                param.data.fill_(1.0)
            elif not param.dtype.is_floating_point:  # quantized weights: small codes
                low = -8 if param.dtype.is_signed else 0
                param.data.copy_(torch.randint(low, 8, param.shape, generator=generator, device=device, dtype=param.dtype))
            elif name.endswith("weight_scale"):
                param.data.fill_(0.02 / 4)
            else:
                param.data.copy_(torch.randn(param.shape, generator=generator, device=device) * 0.02)
        self.process_weights_after_loading()
