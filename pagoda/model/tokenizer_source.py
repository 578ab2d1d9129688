"""Builds a ``tokenizers.Tokenizer`` and reads the chat template from GGUF metadata or an HF folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# llama.cpp's `tokenizer.ggml.pre` names -> the split regex that precedes byte-level BPE.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4


@dataclass
class TokenizerSource:
    tokenizer: Tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    eos_token_ids: list[int] = field(default_factory=list)

    def to_wire(self) -> dict[str, Any]:
        """Plain fields (the tokenizer as its JSON), so another process can rebuild it without the weights."""
        return {
            "tokenizer_json": self.tokenizer.to_str(),
            "chat_template": self.chat_template,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "eos_token_ids": list(self.eos_token_ids),
        }

    @classmethod
    def from_wire(cls, fields: dict[str, Any]) -> TokenizerSource:
        return cls(
            Tokenizer.from_str(fields["tokenizer_json"]),
            fields["chat_template"],
            fields["bos_token"],
            fields["eos_token"],
            list(fields["eos_token_ids"]),
        )


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    split = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if split is not None:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def tokenizer_from_gguf(meta: dict[str, Any]) -> TokenizerSource:
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"GGUF tokenizer model {kind!r} is not supported yet (only byte-level BPE, 'gpt2'); "
            "pass tokenizer=<folder with tokenizer.json> instead"
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    token_types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _byte_level_pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")))
    tok.decoder = decoders.ByteLevel()
    specials = [
        AddedToken(t, special=(tt == _GGUF_CONTROL), normalized=False)
        for t, tt in zip(tokens, token_types)
        if tt in (_GGUF_CONTROL, _GGUF_USER_DEFINED)
    ]
    tok.add_tokens(specials)
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    bos = tokens[bos_id] if bos_id is not None else None
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
    return TokenizerSource(
        tokenizer=tok,
        chat_template=meta.get("tokenizer.chat_template"),
        bos_token=bos,
        eos_token=tokens[eos_id] if eos_id is not None else None,
        eos_token_ids=[eos_id] if eos_id is not None else [],
    )


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # serialized AddedToken
        return value.get("content")
    return value


def tokenizer_from_folder(folder: Path, config_eos_ids: list[int]) -> TokenizerSource:
    path = folder / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no tokenizer.json; pass tokenizer=<folder with tokenizer.json>")
    tok = Tokenizer.from_file(str(path))
    tok_cfg: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").exists():
        tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    template = tok_cfg.get("chat_template")
    if (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    eos = _token_text(tok_cfg.get("eos_token"))
    eos_ids = list(config_eos_ids)
    gen_cfg_path = folder / "generation_config.json"
    if gen_cfg_path.exists():
        gen_eos = json.loads(gen_cfg_path.read_text()).get("eos_token_id")
        eos_ids += [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    if eos is not None and tok.token_to_id(eos) is not None:
        eos_ids.append(tok.token_to_id(eos))
    return TokenizerSource(
        tokenizer=tok,
        chat_template=template,
        bos_token=_token_text(tok_cfg.get("bos_token")),
        eos_token=eos,
        eos_token_ids=sorted(set(eos_ids)),
    )
