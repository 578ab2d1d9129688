"""Tokenizer facade, chat templates, incremental detokenization and stop strings."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pagoda.model.tokenizer_source import TokenizerSource

# Tokens of context kept before the unread tail, so merges across the boundary decode correctly.
_DETOKENIZE_CONTEXT = 5


class ChatTemplateError(ValueError):
    pass


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


class Tokenizer:
    def __init__(self, source: TokenizerSource, eos_token_ids: frozenset[int] | None = None) -> None:
        """``eos_token_ids``: the engine's set (the tokenizer's and the model config's), when known."""
        self._tok = source.tokenizer
        self.chat_template = source.chat_template
        self.bos_token = source.bos_token
        self.eos_token = source.eos_token
        self.eos_token_ids = frozenset(source.eos_token_ids) if eos_token_ids is None else eos_token_ids

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    @cached_property
    def _template(self) -> Any:
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template; send a plain prompt instead")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise ChatTemplateError(f"messages[{i}] must be an object with a 'role'")
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **extra,
            )
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc


@dataclass
class IncrementalDetokenizer:
    """Turns a growing token list into text deltas; never emits a partial UTF-8 character."""

    tokenizer: Tokenizer
    prompt_token_ids: list[int]
    skip_special_tokens: bool = True
    tokens: list[int] = field(init=False)
    prefix_offset: int = field(init=False)
    read_offset: int = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt_token_ids[-_DETOKENIZE_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)

    def add(self, token_ids: list[int]) -> str:
        self.tokens.extend(token_ids)
        decode = self.tokenizer.decode
        prefix_text = decode(self.tokens[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full_text = decode(self.tokens[self.prefix_offset :], self.skip_special_tokens)
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            delta = full_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            return delta
        return ""


def find_stop(text: str, new_chars: int, stops: list[str]) -> tuple[str, int] | None:
    """The earliest stop string that ends within the last ``new_chars`` characters: (stop, start index)."""
    best: tuple[str, int] | None = None
    for stop in stops:
        start = max(0, len(text) - new_chars - len(stop) + 1)
        idx = text.find(stop, start)
        if idx != -1 and (best is None or idx < best[1]):
            best = (stop, idx)
    return best
