"""Benchmark workloads: seeded random token-id prompts (vLLM's "random" dataset), shared-prefix prompts,
and JSONL prompt files, each request with its own output length."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_TOKEN_RANGE = (100, 49000)  # ids that are ordinary tokens in the bundled model's 49,152-entry vocabulary


@dataclass(frozen=True)
class OfflineWorkload:
    name: str
    num_requests: int
    input_len: tuple[int, int]  # inclusive range
    output_len: tuple[int, int]
    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE
    seed: int = 0

    def build(self) -> tuple[list[list[int]], list[int]]:
        rng = np.random.default_rng(self.seed)
        in_lens = rng.integers(self.input_len[0], self.input_len[1] + 1, self.num_requests)
        out_lens = rng.integers(self.output_len[0], self.output_len[1] + 1, self.num_requests)
        lo, hi = self.token_range
        prompts = [rng.integers(lo, hi + 1, int(n)).tolist() for n in in_lens]
        return prompts, [int(n) for n in out_lens]


WORKLOADS = {
    "offline-256": OfflineWorkload("offline-256", 256, (64, 512), (64, 256)),
    "offline-32": OfflineWorkload("offline-32", 32, (64, 512), (64, 256)),
    # Issue 5's GPU measurement (the shape of vLLM's throughput benchmark on 1000 prompts).
    "gpu-1000": OfflineWorkload("gpu-1000", 1000, (128, 1024), (128, 512)),
    "smoke": OfflineWorkload("smoke", 8, (16, 64), (8, 32)),  # seconds: checks the tool, measures nothing
}


@dataclass(frozen=True)
class BenchRequest:
    """One request of a serving benchmark: token ids or text for /v1/completions, or chat messages."""

    prompt: list[int] | str | None
    messages: list[dict[str, Any]] | None
    max_tokens: int
    prompt_tokens: int  # known for token-id prompts; 0 when only the server can count (usage replaces it)


def _check_range(name: str, lo: int, hi: int, minimum: int = 1) -> None:
    if lo < minimum or hi < lo:
        raise ValueError(f"{name} must satisfy {minimum} <= low <= high, got ({lo}, {hi})")


def random_requests(num: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int = 0,
                    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE) -> list[BenchRequest]:
    """Random token ids, lengths uniform in the inclusive ranges (the same generator as the offline workloads)."""
    _check_range("input_len", *input_len)
    _check_range("output_len", *output_len)
    _check_range("token_range", *token_range, minimum=0)
    prompts, out_lens = OfflineWorkload("random", num, input_len, output_len, token_range, seed).build()
    return [BenchRequest(p, None, n, len(p)) for p, n in zip(prompts, out_lens)]


def shared_prefix_requests(num: int, num_prefixes: int, prefix_len: int, suffix_len: tuple[int, int],
                           output_len: tuple[int, int], seed: int = 0,
                           token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE) -> list[BenchRequest]:
    """``num_prefixes`` random "system prompts" of ``prefix_len`` tokens, each request one of them (chosen at
    random) followed by its own random suffix: exercises prefix caching and prefix-aware routing."""
    if num_prefixes < 1 or prefix_len < 1:
        raise ValueError(f"num_prefixes and prefix_len must be >= 1, got {num_prefixes}, {prefix_len}")
    _check_range("suffix_len", *suffix_len)
    _check_range("output_len", *output_len)
    rng = np.random.default_rng(seed)
    lo, hi = token_range
    prefixes = [rng.integers(lo, hi + 1, prefix_len).tolist() for _ in range(num_prefixes)]
    requests = []
    for _ in range(num):
        prefix = prefixes[int(rng.integers(num_prefixes))]
        suffix = rng.integers(lo, hi + 1, int(rng.integers(suffix_len[0], suffix_len[1] + 1))).tolist()
        out = int(rng.integers(output_len[0], output_len[1] + 1))
        requests.append(BenchRequest(prefix + suffix, None, out, prefix_len + len(suffix)))
    return requests


def jsonl_requests(path: str | Path, default_max_tokens: int, num: int | None = None) -> list[BenchRequest]:
    """One JSON object per line: {"prompt": "..."} or {"messages": [...]}, optionally "max_tokens"."""
    requests = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not JSON ({exc})") from None
            if not isinstance(item, dict) or ("prompt" in item) == ("messages" in item):
                raise ValueError(f"{path}:{line_no}: need exactly one of \"prompt\" and \"messages\"")
            max_tokens = item.get("max_tokens", default_max_tokens)
            if not isinstance(max_tokens, int) or max_tokens < 1:
                raise ValueError(f"{path}:{line_no}: max_tokens must be a positive integer, got {max_tokens!r}")
            requests.append(BenchRequest(item.get("prompt"), item.get("messages"), max_tokens, 0))
            if num is not None and len(requests) >= num:
                break
    if not requests:
        raise ValueError(f"{path}: no prompts")
    return requests
