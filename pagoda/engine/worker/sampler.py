"""Batched sampling: one row of logits per request that reached the end of its known tokens.

Order of operations (as in vLLM): logprobs of the raw model distribution; then
logit bias, min_tokens masking and penalties; greedy rows take the argmax; the
other rows apply temperature, top-k, top-p and min-p and draw by inverse CDF
with one uniform number. A seeded request's number for its t-th output token is a hash of (seed, t), so its
draws depend neither on what else is in the batch nor on how many of its tokens one step verifies
(speculative decoding samples several positions of a request at once, see engine/worker/verify.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pagoda.api.outputs import Logprob, PositionLogprobs
from pagoda.api.params import SamplingParams
from pagoda.model.cpu_kernels import load_cpu_kernels

if TYPE_CHECKING:
    from pagoda.engine.worker.input_batch import CachedRequestState


# Rows whose logprob ranks are counted in one comparison (see _gather_logprobs).
RANK_CHUNK_ROWS = 16


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[PositionLogprobs | None]  # per row; None when the request did not ask


class Sampler:
    """Samples where the logits are (CPU: Pagoda's C++ kernels when built; GPU: torch). Random numbers
    always come from host generators, so a seed draws the same numbers on every device."""

    def __init__(self, seed: int = 0, device: str = "cpu") -> None:
        self.generator = torch.Generator().manual_seed(seed)
        ops = load_cpu_kernels() if torch.device(device).type == "cpu" else None
        self.argmax: Callable[[torch.Tensor], torch.Tensor] = (
            ops.argmax_rows if ops is not None else (lambda x: x.argmax(dim=-1))
        )
        self.sample_rows: Callable[..., torch.Tensor] = ops.sample_rows if ops is not None else _sample_rows_torch

    def __call__(self, logits: torch.Tensor, requests: list[CachedRequestState],
                 pending: list[list[int]] | None = None) -> SampleResult:
        """Sample one token per row of ``logits`` (model dtype; upcast to fp32 only when needed). Row i samples
        ``requests[i]``'s output position ``num_output_tokens + len(pending[i])``: ``pending`` holds the draft
        tokens before it when a request's drafts are verified (one row per position), else nothing."""
        if logits.dtype not in (torch.float32, torch.bfloat16):  # what the kernels read
            logits = logits.float()
        if all(r.plain_greedy for r in requests):  # the common offline case: no copy, one pass
            return SampleResult(self.argmax(logits).tolist(), [None] * len(requests))
        wants_logprobs = any(r.sampling_params.logprobs is not None for r in requests)
        if wants_logprobs or _needs_processing(requests):
            logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
        logits = self._process(logits, requests, pending)
        device = logits.device
        tokens = torch.empty(len(requests), dtype=torch.int64, device=device)
        greedy = [i for i, r in enumerate(requests) if r.sampling_params.greedy]
        random = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        if greedy:
            idx = torch.tensor(greedy, device=device)
            tokens[idx] = self.argmax(logits[idx])
        if random:
            tokens[torch.tensor(random, device=device)] = self._sample(
                logits, random, [requests[i] for i in random], [len(pending[i]) if pending else 0 for i in random])
        token_list = tokens.tolist()
        logprobs: list[PositionLogprobs | None] = [None] * len(requests)
        if raw_logprobs is not None:
            logprobs = _gather_logprobs(raw_logprobs, requests, token_list)
        return SampleResult(token_list, logprobs)

    def _process(self, logits: torch.Tensor, requests: list[CachedRequestState],
                 pending: list[list[int]] | None = None) -> torch.Tensor:
        """Logit bias, min_tokens masking, repetition then presence/frequency penalties, each applied to all
        the rows that need it in one indexed operation (the index lists built on the host). A row at a draft
        position counts the drafts before it as output."""
        needs = [i for i, r in enumerate(requests) if _row_needs_processing(r)]
        if not needs:
            return logits
        logits = logits.clone()
        bias, banned = _Edits(), _Edits()
        penalized: list[int] = []
        for i in needs:
            r = requests[i]
            p = r.sampling_params
            if p.logit_bias:
                bias.add(i, p.logit_bias.keys(), p.logit_bias.values())
            if r.num_output_tokens + (len(pending[i]) if pending else 0) < p.min_tokens:
                banned.add(i, sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else set(r.eos_token_ids))))
            if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
                penalized.append(i)
        device, dtype = logits.device, logits.dtype
        if bias.rows:
            rows, ids = bias.index(device)
            logits.index_put_((rows, ids), bias.tensor(dtype, device), accumulate=True)
        if banned.rows:
            logits[banned.index(device)] = float("-inf")
        if penalized:
            self._penalize(logits, penalized, [requests[i] for i in penalized],
                           [pending[i] for i in penalized] if pending else [[] for _ in penalized])
        return logits

    @staticmethod
    def _penalize(logits: torch.Tensor, rows: list[int], requests: list[CachedRequestState],
                  pending: list[list[int]]) -> None:
        """Repetition, then presence/frequency penalties (vLLM's order), row by row in place from each
        request's state over the vocabulary: a few passes over one row, whatever the output's length."""
        for row, r, drafts in zip(rows, requests, pending):
            state = PenaltyState.updated(r, logits.shape[-1], logits.device)
            if drafts:
                state = state.with_tokens(drafts, r.sampling_params)
            x = logits[row]
            penalty = r.sampling_params.repetition_penalty
            if penalty != 1.0:
                x.copy_(torch.where(state.seen & (x > 0), x / penalty, torch.where(state.seen, x * penalty, x)))
            if r.sampling_params.presence_penalty or r.sampling_params.frequency_penalty:
                x.sub_(state.cut)

    def _sample(self, logits: torch.Tensor, rows: list[int], requests: list[CachedRequestState],
                offsets: list[int]) -> torch.Tensor:
        """Draw for ``rows`` of ``logits``: one uniform number per row; a seeded request's is keyed by its
        seed and the output position, so its draws do not depend on what else is in the batch."""
        params = [r.sampling_params for r in requests]
        uniform = torch.empty(len(requests), dtype=torch.float64)
        unseeded = [i for i, p in enumerate(params) if p.seed is None]
        if unseeded:
            uniform[torch.tensor(unseeded)] = torch.rand(len(unseeded), dtype=torch.float64, generator=self.generator)
        for i, (r, p) in enumerate(zip(requests, params)):
            if p.seed is not None:
                uniform[i] = position_uniform(p.seed, r.num_output_tokens + offsets[i])
        on = {"device": logits.device}
        return self.sample_rows(
            logits,
            torch.tensor(rows, dtype=torch.int64, **on),
            torch.tensor([p.temperature for p in params], dtype=torch.float32, **on),
            torch.tensor([p.top_k for p in params], dtype=torch.int64, **on),
            torch.tensor([p.top_p for p in params], dtype=torch.float32, **on),
            torch.tensor([p.min_p for p in params], dtype=torch.float32, **on),
            uniform.to(logits.device),
        )


def _sample_rows_torch(
    logits: torch.Tensor,
    rows: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    uniform: torch.Tensor,
) -> torch.Tensor:
    """The C++ ``sample_rows`` in torch (for machines without the kernels): same filters, same draw."""
    logits = logits[rows].float() / temperature[:, None]
    vocab = logits.shape[-1]
    if bool((top_k > 0).any()):
        ks = torch.where((top_k > 0) & (top_k < vocab), top_k, torch.full_like(top_k, vocab))
        thresholds = logits.topk(int(ks.max()), dim=-1).values.gather(1, (ks - 1)[:, None])
        logits = logits.masked_fill(logits < thresholds, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if bool((top_p < 1.0).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cum = sorted_probs.cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = (cum - sorted_probs) >= top_p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    if bool((min_p > 0).any()):
        cutoff = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        probs = probs.masked_fill(probs < cutoff, 0.0)
    cdf = probs.double().cumsum(dim=-1)
    targets = uniform[:, None] * cdf[:, -1:]
    picked = torch.searchsorted(cdf, targets, right=True).squeeze(1)
    # Rounding can leave a target at the top of the mass: take the last token with probability.
    last_kept = vocab - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(picked, last_kept)


_MASK64 = (1 << 64) - 1


def position_uniform(seed: int, position: int) -> float:
    """A uniform number in [0, 1) that is a fixed function of (seed, position): SplitMix64's finalizer over
    both, 53 bits kept."""
    z = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return ((z ^ (z >> 31)) >> 11) * (1.0 / (1 << 53))


@dataclass
class PenaltyState:
    """One request's penalties over the vocabulary, brought up to date with the tokens added since the
    last step (never rebuilt from the whole history): tokens seen in the prompt or the output, output
    counts, and what presence and frequency take off each logit (0 for tokens not yet generated)."""

    seen: torch.Tensor  # [vocab] bool
    counts: torch.Tensor  # [vocab] fp32
    cut: torch.Tensor  # [vocab] fp32: frequency * count + presence, where count > 0
    num_counted: int = 0  # output tokens already in ``counts``

    @classmethod
    def updated(cls, r: CachedRequestState, vocab: int, device: torch.device) -> PenaltyState:
        state = r.penalty_state
        if state is None:
            seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            seen[torch.tensor(r.prompt_token_ids, device=device)] = True
            zeros = {"dtype": torch.float32, "device": device}
            state = r.penalty_state = cls(seen, torch.zeros(vocab, **zeros), torch.zeros(vocab, **zeros))
        new = r.output_token_ids[state.num_counted :]
        if new:
            state._count(new, r.sampling_params)
        return state

    def with_tokens(self, tokens: list[int], params: SamplingParams) -> PenaltyState:
        """A copy that also counts ``tokens`` as output (the drafts before a verified position)."""
        copy = PenaltyState(self.seen.clone(), self.counts.clone(), self.cut.clone(), self.num_counted)
        copy._count(tokens, params)
        return copy

    def _count(self, tokens: list[int], params: SamplingParams) -> None:
        ids = torch.tensor(tokens, device=self.seen.device)
        self.counts.index_put_((ids,), torch.ones(len(tokens), dtype=torch.float32, device=ids.device), accumulate=True)
        self.seen[ids] = True
        self.cut[ids] = params.frequency_penalty * self.counts[ids] + params.presence_penalty
        self.num_counted += len(tokens)


@dataclass
class _Edits:
    """(row, token id, value) triples gathered on the host for one indexed update of the logits."""

    rows: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, row: int, ids: Iterable[int], values: Iterable[float] = ()) -> None:
        ids = list(ids)
        self.rows += [row] * len(ids)
        self.ids += ids
        self.values += list(values)

    def index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(self.rows, dtype=torch.int64, device=device),
                torch.tensor(self.ids, dtype=torch.int64, device=device))

    def tensor(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.values, dtype=dtype, device=device)


def _row_needs_processing(r: CachedRequestState) -> bool:
    p = r.sampling_params
    return bool(
        p.logit_bias
        or r.num_output_tokens < p.min_tokens
        or p.repetition_penalty != 1.0
        or p.presence_penalty
        or p.frequency_penalty
    )


def _needs_processing(requests: list[CachedRequestState]) -> bool:
    return any(_row_needs_processing(r) for r in requests)


def is_plain_greedy(p: SamplingParams) -> bool:
    """Whether every step of a request with these parameters is the argmax of the raw logits."""
    return bool(p.greedy and p.logprobs is None and not p.logit_bias and p.min_tokens == 0
                and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty)


def _gather_logprobs(logprobs: torch.Tensor, requests: list[CachedRequestState], tokens: list[int]) -> list[PositionLogprobs | None]:
    """Each asking row's sampled token with its rank, plus its top ``logprobs`` tokens."""
    result: list[PositionLogprobs | None] = [None] * len(requests)
    rows = [i for i, r in enumerate(requests) if r.sampling_params.logprobs is not None]
    if not rows:
        return result
    asked = logprobs if len(rows) == len(requests) else logprobs[torch.tensor(rows, device=logprobs.device)]
    entries = position_logprobs(asked, [tokens[i] for i in rows], [requests[i].sampling_params.logprobs for i in rows])
    for i, entry in zip(rows, entries):
        result[i] = entry
    return result


def position_logprobs(logprobs: torch.Tensor, tokens: list[int], ks: list[int]) -> list[PositionLogprobs]:
    """Per row of ``logprobs`` [rows, vocab]: the entry of ``tokens[row]`` with its rank, plus the top
    ``ks[row]`` tokens. Batched over the rows (a gather, a top-k, ranks in chunks of rows, three copies to
    the host), not one row at a time."""
    on = {"device": logprobs.device}
    chosen = logprobs.gather(1, torch.tensor(tokens, **on)[:, None])
    # Counting over a whole [rows, vocab] comparison is ~3x slower on the CPU than chunk by chunk.
    ranks = (torch.cat([(logprobs[c:c + RANK_CHUNK_ROWS] > chosen[c:c + RANK_CHUNK_ROWS]).sum(dim=-1)
                        for c in range(0, len(tokens), RANK_CHUNK_ROWS)]) + 1).tolist()
    chosen_values = chosen.squeeze(1).tolist()
    most = max(ks)
    top_values: list[list[float]] = [[]] * len(tokens)
    top_ids: list[list[int]] = [[]] * len(tokens)
    if most:
        values, ids = logprobs.topk(most, dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    result = []
    for j, (token, k) in enumerate(zip(tokens, ks)):
        entry: PositionLogprobs = {token: Logprob(chosen_values[j], ranks[j])}
        for rank, (tid, val) in enumerate(zip(top_ids[j][:k], top_values[j][:k]), start=1):
            entry.setdefault(tid, Logprob(val, rank))
        result.append(entry)
    return result
