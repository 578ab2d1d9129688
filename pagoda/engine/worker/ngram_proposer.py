"""Draft tokens by prompt lookup (vLLM's ``ngram`` method): the tokens that followed the latest earlier
occurrence of the sequence's last n tokens, trying n from ``prompt_lookup_max`` down to ``prompt_lookup_min``.

Costs a few vectorized comparisons over the sequence per step (no model), and finds nothing in text that
does not repeat itself, so a request whose prompt never recurs in its output is not slowed down.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pagoda.engine.worker.input_batch import CachedRequestState, InputBatch


@dataclass(frozen=True)
class NgramProposer:
    min_n: int
    max_n: int
    num_tokens: int  # drafts proposed at most

    def propose_batch(self, batch: InputBatch, states: list[CachedRequestState], limits: list[int]) -> list[list[int]]:
        """Up to ``limits[i]`` drafts to follow each of ``states``' known tokens."""
        return [self.propose(batch.known_tokens(state), limit) for state, limit in zip(states, limits)]

    def propose(self, tokens: np.ndarray, limit: int) -> list[int]:
        """Up to ``min(limit, num_tokens)`` drafts to follow ``tokens`` (1-D: prompt and output so far)."""
        length = len(tokens)
        limit = min(limit, self.num_tokens)
        if limit <= 0 or length < 2:
            return []
        # Earlier positions holding the last token: the ends of every candidate match, latest last.
        ends = np.flatnonzero(tokens[: length - 1] == tokens[length - 1])
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            matched = ends[ends >= n - 1]
            for back in range(1, n):
                matched = matched[tokens[matched - back] == tokens[length - 1 - back]]
            if len(matched):
                start = int(matched[-1]) + 1  # the continuation may run into the suffix itself
                return tokens[start : start + limit].tolist()
        return []
