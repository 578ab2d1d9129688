"""Builds a ``tokenizers.Tokenizer`` and reads the chat template from GGUF metadata or an HF folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from pagoda.model.arch_config import gguf_value

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


def _token_id(meta: dict[str, Any], key: str, tokens: list[str]) -> int | None:
    token_id = gguf_value(meta, key, int, None)
    if token_id is not None and not 0 <= token_id < len(tokens):
        raise ValueError(f"GGUF metadata key {key!r} is {token_id}, outside the {len(tokens)}-token vocabulary")
    return token_id


def _merges(meta: dict[str, Any]) -> list[tuple[str, str]]:
    merges = []
    for merge in gguf_value(meta, "tokenizer.ggml.merges", list[str], []):
        first, space, second = merge.partition(" ")
        if not space:
            raise ValueError(f"GGUF metadata key 'tokenizer.ggml.merges' holds {merge!r}, not a space-separated pair")
        merges.append((first, second))
    return merges


def _bpe(tokens: list[str], merges: list[tuple[str, str]]) -> models.BPE:
    try:
        return models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    except Exception as exc:  # tokenizers raises a bare Exception, e.g. for a merge of unknown tokens
        raise ValueError(f"GGUF metadata 'tokenizer.ggml.tokens'/'tokenizer.ggml.merges': {exc}") from None


def tokenizer_from_gguf(meta: dict[str, Any]) -> TokenizerSource:
    kind = gguf_value(meta, "tokenizer.ggml.model", str, None)
    if kind != "gpt2":
        raise ValueError(
            f"GGUF tokenizer model {kind!r} is not supported yet (only byte-level BPE, 'gpt2'); "
            "pass tokenizer=<folder with tokenizer.json> instead"
        )
    tokens: list[str] = gguf_value(meta, "tokenizer.ggml.tokens", list[str])
    token_types: list[int] = gguf_value(meta, "tokenizer.ggml.token_type", list[int], [1] * len(tokens))
    tok = Tokenizer(_bpe(tokens, _merges(meta)))
    tok.pre_tokenizer = _byte_level_pre_tokenizer(gguf_value(meta, "tokenizer.ggml.pre", str, "default"))
    tok.decoder = decoders.ByteLevel()
    specials = [
        AddedToken(t, special=(tt == _GGUF_CONTROL), normalized=False)
        for t, tt in zip(tokens, token_types)
        if tt in (_GGUF_CONTROL, _GGUF_USER_DEFINED)
    ]
    tok.add_tokens(specials)
    bos_id = _token_id(meta, "tokenizer.ggml.bos_token_id", tokens)
    eos_id = _token_id(meta, "tokenizer.ggml.eos_token_id", tokens)
    bos = tokens[bos_id] if bos_id is not None else None
    if gguf_value(meta, "tokenizer.ggml.add_bos_token", bool, False) and bos is not None:
        # A template piece starting with '$' or holding ':' is parsed as a placeholder, which tokenizers
        # then panics on (a BaseException) at the first encode.
        if bos.startswith("$") or ":" in bos:
            raise ValueError(f"GGUF bos token {bos!r} cannot be added by a tokenizers template")
        tok.post_processor = processors.TemplateProcessing(single=[bos, "$A"], special_tokens=[(bos, bos_id)])
    return TokenizerSource(
        tokenizer=tok,
        chat_template=gguf_value(meta, "tokenizer.chat_template", str, None),
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
