"""What the engine core asks of whatever runs the model: one data-only step at a time.

The core never touches a tensor. An executor owns the model, its KV cache and the workers that run them;
today one worker in the core's own process (``pagoda.engine.worker.worker.Worker``), later several processes for
tensor parallelism, behind the same calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pagoda.api.messages import EncoderInfo
from pagoda.engine.step import ModelRunnerOutput, SchedulerOutput
from pagoda.model.tokenizer_source import TokenizerSource


@dataclass(frozen=True)
class ModelInfo:
    """What the core and the front end learn of the loaded model."""

    name: str
    max_model_len: int
    vocab_size: int
    hidden_size: int
    eos_token_ids: frozenset[int]
    tokenizer: TokenizerSource
    dtype: str
    num_blocks: int  # the KV cache's size, planned by the executor from its device's memory
    encoder: EncoderInfo | None  # None: embeddings are the served model's mean-pooled hidden states


class Executor(Protocol):
    info: ModelInfo

    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step: apply ``out``'s changes, compute its tokens, sample."""

    def sum_hidden(self, token_ids: list[int], start: int, count: int, block_ids: list[int]) -> list[float]:
        """Sum over tokens ``start:start + count`` of one sequence of the final hidden states (fp32), its KV
        written to ``block_ids`` (borrowed blocks, for embeddings)."""

    def encode(self, rows: list[list[int]]) -> list[list[float]]:
        """Unit vectors from the sentence encoder (``info.encoder``), one per row of its token ids."""
