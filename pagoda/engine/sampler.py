"""Batched sampling: one row of logits per request that reached the end of its known tokens.

Order of operations (as in vLLM): logprobs of the raw model distribution; then
logit bias, min_tokens masking and penalties; greedy rows take the argmax; the
other rows apply temperature, top-k, top-p and min-p and draw with the
exponential-race trick, using the request's own generator when it has a seed so
that its draws do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from collections.abc import Callable

import torch

from pagoda.engine.request import Logprob, PositionLogprobs, Request
from pagoda.model.cpu_kernels import load_cpu_kernels


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[PositionLogprobs | None]  # per row; None when the request did not ask


def _argmax_fn() -> Callable[[torch.Tensor], torch.Tensor]:
    ops = load_cpu_kernels()
    return ops.argmax_rows if ops is not None else (lambda x: x.argmax(dim=-1))


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.argmax = _argmax_fn()

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SampleResult:
        """Sample one token per row of ``logits`` (model dtype; upcast to fp32 only when needed)."""
        if all(_plain_greedy(r) for r in requests):  # the common offline case: no copy, one pass
            return SampleResult(self.argmax(logits).tolist(), [None] * len(requests))
        logits = logits.float()
        raw_logprobs = (
            torch.log_softmax(logits, dim=-1)
            if any(r.sampling_params.logprobs is not None for r in requests)
            else None
        )
        logits = self._process(logits, requests)
        tokens = torch.empty(len(requests), dtype=torch.int64)
        greedy = [i for i, r in enumerate(requests) if r.sampling_params.greedy]
        random = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        if greedy:
            idx = torch.tensor(greedy)
            tokens[idx] = self.argmax(logits[idx])
        if random:
            idx = torch.tensor(random)
            tokens[idx] = self._sample(logits[idx], [requests[i] for i in random])
        token_list = tokens.tolist()
        logprobs: list[PositionLogprobs | None] = [None] * len(requests)
        if raw_logprobs is not None:
            logprobs = _gather_logprobs(raw_logprobs, requests, token_list)
        return SampleResult(token_list, logprobs)

    def _process(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        needs = [
            i
            for i, r in enumerate(requests)
            if r.sampling_params.logit_bias
            or r.num_output_tokens < r.sampling_params.min_tokens
            or r.sampling_params.repetition_penalty != 1.0
            or r.sampling_params.presence_penalty
            or r.sampling_params.frequency_penalty
        ]
        if not needs:
            return logits
        logits = logits.clone()
        vocab = logits.shape[-1]
        for i in needs:
            r = requests[i]
            p = r.sampling_params
            row = logits[i]
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias.keys()))
                row.index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), dtype=row.dtype))
            if r.num_output_tokens < p.min_tokens:
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(r.eos_token_ids))
                if banned:
                    row[torch.tensor(sorted(banned))] = float("-inf")
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(r.token_ids)))
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if p.presence_penalty or p.frequency_penalty:
                out = torch.tensor(r.output_token_ids, dtype=torch.int64)
                counts = torch.bincount(out, minlength=vocab).to(row.dtype)
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        return logits

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        params = [r.sampling_params for r in requests]
        temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype)[:, None]
        logits = logits / temps
        top_ks = [p.top_k for p in params]
        if any(top_ks):
            vocab = logits.shape[-1]
            ks = torch.tensor([k if k > 0 else vocab for k in top_ks])
            kmax = int(ks.max())
            top_vals = logits.topk(kmax, dim=-1).values
            thresholds = top_vals.gather(1, (ks - 1)[:, None])
            logits = logits.masked_fill(logits < thresholds, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        top_ps = torch.tensor([p.top_p for p in params], dtype=probs.dtype)
        if bool((top_ps < 1.0).any()):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            cum = sorted_probs.cumsum(dim=-1)
            # Drop a token when the tokens ranked above it already reach top_p.
            drop_sorted = (cum - sorted_probs) >= top_ps[:, None]
            drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
        min_ps = torch.tensor([p.min_p for p in params], dtype=probs.dtype)
        if bool((min_ps > 0).any()):
            cutoff = probs.max(dim=-1, keepdim=True).values * min_ps[:, None]
            probs = probs.masked_fill(probs < cutoff, 0.0)
        noise = torch.empty_like(probs)
        for i, r in enumerate(requests):
            noise[i].exponential_(generator=r.generator if r.generator is not None else self.generator)
        return (probs / noise).argmax(dim=-1)


def _plain_greedy(r: Request) -> bool:
    p = r.sampling_params
    return (
        p.greedy
        and p.logprobs is None
        and not p.logit_bias
        and r.num_output_tokens >= p.min_tokens
        and p.repetition_penalty == 1.0
        and not p.presence_penalty
        and not p.frequency_penalty
    )


def _gather_logprobs(logprobs: torch.Tensor, requests: list[Request], tokens: list[int]) -> list[PositionLogprobs | None]:
    result: list[PositionLogprobs | None] = []
    for i, r in enumerate(requests):
        k = r.sampling_params.logprobs
        if k is None:
            result.append(None)
            continue
        row = logprobs[i]
        chosen = float(row[tokens[i]])
        entry: PositionLogprobs = {tokens[i]: Logprob(chosen, int((row > chosen).sum()) + 1)}
        if k > 0:
            vals, ids = row.topk(k)
            for rank, (tid, val) in enumerate(zip(ids.tolist(), vals.tolist()), start=1):
                entry.setdefault(tid, Logprob(val, rank))
        result.append(entry)
    return result
