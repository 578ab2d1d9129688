"""A BERT encoder for sentence embeddings (all-MiniLM-L6-v2 and its kin): mean pooling + L2 norm.

Small and self-contained: it serves ``/v1/embeddings`` next to the generative model
and is never batched with it. Weights come from safetensors with HF names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.nn import functional as F


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text())
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported BERT activation {raw['hidden_act']!r} (only gelu)")
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__})


class BertEncoder:
    def __init__(self, folder: Path, dtype: torch.dtype = torch.float32) -> None:
        self.config = BertConfig.from_file(folder / "config.json")
        self.w = {k: v.to(dtype) for k, v in load_file(str(folder / "model.safetensors")).items()
                  if not k.endswith("position_ids")}

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.w[f"{name}.weight"], self.w[f"{name}.bias"],
                            self.config.layer_norm_eps)

    def _dense(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[batch, seq] ids and 0/1 mask -> [batch, hidden] unit vectors (mean over real tokens)."""
        cfg = self.config
        batch, seq = input_ids.shape
        positions = torch.arange(seq)[None, :]
        x = (self.w["embeddings.word_embeddings.weight"][input_ids]
             + self.w["embeddings.position_embeddings.weight"][positions]
             + self.w["embeddings.token_type_embeddings.weight"][torch.zeros_like(input_ids)])
        x = self._ln(x, "embeddings.LayerNorm")
        heads, dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        mask = (attention_mask[:, None, None, :] > 0)
        for i in range(cfg.num_hidden_layers):
            p = f"encoder.layer.{i}"

            def split(t: torch.Tensor) -> torch.Tensor:
                return t.view(batch, seq, heads, dim).transpose(1, 2)

            q = split(self._dense(x, f"{p}.attention.self.query"))
            k = split(self._dense(x, f"{p}.attention.self.key"))
            v = split(self._dense(x, f"{p}.attention.self.value"))
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            attn = attn.transpose(1, 2).reshape(batch, seq, cfg.hidden_size)
            x = self._ln(x + self._dense(attn, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
            h = F.gelu(self._dense(x, f"{p}.intermediate.dense"))
            x = self._ln(x + self._dense(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        weights = attention_mask[:, :, None].to(x.dtype)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled.float(), dim=-1)
