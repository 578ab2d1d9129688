"""Sampling parameters: every bound on a user-controlled value is defined and checked here, once.

Torch-free: the HTTP server, the engine's front end and the engine core all use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Bounds on user-controlled sizes; the server reuses them so both paths reject the same input.
MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 256
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_STOP_TOKEN_IDS = 256
# Logits are divided by the repetition penalty: below this a large logit overflows float32 to inf.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 2.0
DEFAULT_MAX_TOKENS = 16  # vLLM's and OpenAI's completions default
MAX_GRAMMAR_CHARS = 64 * 1024  # a JSON schema, regex or EBNF grammar, as text
MAX_CHOICES = 256
# Nested objects and arrays in a schema's JSON: xgrammar's compile time grows steeply with depth (a schema
# 400 levels deep took 7 s, 100 levels 0.16 s), so depth is bounded before anything compiles.
MAX_GRAMMAR_NESTING = 128
MAX_CHOICE_CHARS = 1024
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def _check(condition: bool, parameter: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{parameter} {message}")


def _json_text(value: Any, parameter: str, types: tuple[type, ...], what: str) -> str:
    """A JSON value given as text or parsed, checked (its type, its nesting) and returned as text."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"{parameter} is not valid JSON: {exc}") from None
    else:
        parsed = value
    _check(isinstance(parsed, types), parameter, f"must be {what} (as an object or its JSON text)")
    _check(_nesting(parsed) <= MAX_GRAMMAR_NESTING, parameter,
           f"nests objects and arrays more than {MAX_GRAMMAR_NESTING} levels deep")
    return value if isinstance(value, str) else json.dumps(value)


def _nesting(value: Any) -> int:
    """How deeply objects and arrays nest in ``value`` (iteratively: the input is untrusted)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_GRAMMAR_NESTING:
                break
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


@dataclass
class StructuredOutputsParams:
    """Constrain the output (vLLM's names): exactly one of a JSON schema, a regex, a choice of strings, an EBNF
    grammar, any JSON object, or a structural tag (xgrammar's format: free text with tagged, schema-checked
    parts; what tool calling builds). ``json`` and ``structural_tag`` are held as text, so they cross the wire
    as they came."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        given = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        _check(len(given) == 1, "structured_outputs", f"must set exactly one of {', '.join(STRUCTURED_KINDS)}, got "
               f"{', '.join(given) or 'none'}")
        if self.json is not None:
            self.json = _json_text(self.json, "structured_outputs.json", (dict, bool), "a JSON schema object")
        if self.structural_tag is not None:
            self.structural_tag = _json_text(self.structural_tag, "structured_outputs.structural_tag", (dict,),
                                             "a JSON object")
        for name in ("json", "regex", "grammar", "structural_tag"):
            value = getattr(self, name)
            if value is not None:
                _check(isinstance(value, str) and 0 < len(value) <= MAX_GRAMMAR_CHARS, f"structured_outputs.{name}",
                       f"must be a non-empty string of at most {MAX_GRAMMAR_CHARS} characters")
        if self.choice is not None:
            _check(isinstance(self.choice, list) and 0 < len(self.choice) <= MAX_CHOICES, "structured_outputs.choice",
                   f"must be a list of 1 to {MAX_CHOICES} strings")
            for c in self.choice:
                _check(isinstance(c, str) and 0 < len(c) <= MAX_CHOICE_CHARS, "structured_outputs.choice",
                       f"entries must be non-empty strings of at most {MAX_CHOICE_CHARS} characters, got {c!r}")
        if self.json_object is not None:
            _check(self.json_object is True, "structured_outputs.json_object", "must be true when given")

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the compiled grammar (with the tokenizer, which one engine has one of)."""
        value = getattr(self, self.kind)
        return self.kind, value if isinstance(value, str) else json.dumps(value)


@dataclass
class SamplingParams:
    """How to sample one prompt's completions; names and defaults follow vLLM."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    max_tokens: int | None = DEFAULT_MAX_TOKENS  # None: up to max_model_len
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs besides the sampled token
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (no cached prefix)
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    # Pagoda's: false opts this request out of speculative decoding (the output is the same either way).
    speculative_decoding: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        _check(isinstance(self.n, int) and 1 <= self.n <= MAX_N, "n", f"must be an integer in [1, {MAX_N}], got {self.n}")
        _check(self.temperature >= 0.0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", f"must be -1, 0 (disabled) or a positive integer, got {self.top_k}")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        _check(MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY, "repetition_penalty",
               f"must be in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}], got {self.repetition_penalty}")
        if self.max_tokens is not None:
            _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", f"must be an integer >= 1, got {self.max_tokens}")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", f"must be an integer >= 0, got {self.min_tokens}")
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", f"({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None:
            _check(isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs is not None:
            _check(isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                   "prompt_logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}")
        _check(len(self.stop) <= MAX_STOP_SEQUENCES, "stop", f"may hold at most {MAX_STOP_SEQUENCES} strings, got {len(self.stop)}")
        for s in self.stop:
            _check(isinstance(s, str) and 0 < len(s) <= MAX_STOP_SEQUENCE_CHARS, "stop", f"entries must be non-empty strings of at most {MAX_STOP_SEQUENCE_CHARS} characters, got {s!r}")
        _check(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids", f"may hold at most {MAX_STOP_TOKEN_IDS} ids")
        if self.logit_bias:
            _check(len(self.logit_bias) <= MAX_LOGIT_BIAS_ENTRIES, "logit_bias", f"may hold at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(self.logit_bias)}")
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            for k, v in self.logit_bias.items():
                _check(-100.0 <= v <= 100.0, "logit_bias", f"values must be in [-100, 100], got {v} for token {k}")
        _check(isinstance(self.speculative_decoding, bool), "speculative_decoding",
               f"must be true or false, got {self.speculative_decoding!r}")
        if self.seed is not None:
            _check(isinstance(self.seed, int), "seed", f"must be an integer, got {self.seed!r}")
        if isinstance(self.structured_outputs, dict):  # from the wire or a plain caller
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
               "structured_outputs", "must be a StructuredOutputsParams or a dict of its fields")
        if self.structured_outputs is not None:
            # Fail-closed: an output that ends as "stop" must be complete, so nothing else may stop it early,
            # and the grammar must be free to end it. A structural tag is free text around its tags: a stop string
            # may end it (a tag it cuts is not parsed as one).
            _check(self.structured_outputs.kind == "structural_tag" or not (self.stop or self.stop_token_ids), "stop",
                   "cannot be combined with structured outputs (a stop string could cut the output short)")
            _check(self.min_tokens == 0, "min_tokens", "cannot be combined with structured outputs")
            _check(not self.ignore_eos, "ignore_eos", "cannot be combined with structured outputs (the grammar "
                   "ends the output with end of sequence)")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def validate_for_vocab(self, vocab_size: int) -> None:
        for name, tokens in (("logit_bias", list(self.logit_bias or {})), ("stop_token_ids", self.stop_token_ids or [])):
            bad = [t for t in tokens if not 0 <= t < vocab_size]
            _check(not bad, name, f"holds token ids outside the vocabulary [0, {vocab_size}): {bad[:20]}")
