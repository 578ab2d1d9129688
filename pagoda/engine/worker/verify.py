"""Verifying draft tokens in one target step: which hidden rows become logits, and which drafts are kept.

A request with drafts d_1..d_k computes k + 1 rows this step (its last known token, then the drafts), and
each row's logits are the target model's distribution at that position given the drafts before it. Every
row is sampled by the ordinary sampler (all filters; penalties, min_tokens and the grammar's mask as they stand
after the drafts before it; the request's seeded numbers), and the drafts are kept while they equal the samples; the first sample that differs, or the one
after the last draft, ends the request's tokens for the step.

For drafts that are proposed deterministically (prompt lookup), this is rejection sampling exactly: d_j is
kept with probability p_j(d_j), and when it is not, the sample is drawn from p_j without d_j, renormalized,
which is the residual distribution max(0, p - q) / (1 - p(d_j)) for q a point mass on d_j. So every
output token follows the target distribution, greedy output is the argmax chain exactly, and a seeded request
draws each position's number from (seed, position) whatever the drafts were, so its output equals the
non-speculative output for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Verification:
    logit_rows: np.ndarray  # the flat hidden row of every position sampled this step
    owners: list[int]  # per sampled position: the index of its request among the sampling requests
    pending: list[list[int]]  # per sampled position: the drafts before it (what it samples after them)
    drafts: list[list[int]]  # per sampling request, the drafts it verifies (often none)

    @classmethod
    def plan(cls, last_rows: np.ndarray, drafts: list[list[int]]) -> Verification:
        """``last_rows``: each sampling request's last flat row; its drafts are the rows just before it."""
        rows: list[int] = []
        owners: list[int] = []
        pending: list[list[int]] = []
        for i, (last, draft) in enumerate(zip(last_rows.tolist(), drafts)):
            count = len(draft) + 1
            rows.extend(range(last - count + 1, last + 1))
            owners.extend([i] * count)
            pending.extend(draft[:j] for j in range(count))
        return cls(np.asarray(rows, dtype=np.int64), owners, pending, drafts)

    def accept(self, sampled: list[int]) -> list[list[int]]:
        """Each request's tokens for the step: its kept drafts, then the sample after them."""
        tokens: list[list[int]] = []
        first = 0
        for draft in self.drafts:
            kept = 0
            while kept < len(draft) and sampled[first + kept] == draft[kept]:
                kept += 1
            tokens.append(sampled[first : first + kept + 1])
            first += len(draft) + 1
        return tokens
