"""Named benchmark workloads: seeded random token-id prompts with per-request output lengths."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OfflineWorkload:
    name: str
    num_requests: int
    input_len: tuple[int, int]  # inclusive range
    output_len: tuple[int, int]
    token_range: tuple[int, int] = (100, 49000)
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
}
