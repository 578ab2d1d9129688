"""Iteration-level continuous batching with one token budget per step.

Each step first gives every running request its next tokens (one decode token,
or the next prefill chunk), then admits waiting requests in (priority, arrival)
order while budget, ``max_num_seqs`` and KV blocks last. When blocks run out the
lowest-priority, newest running request is preempted: its blocks are freed and
it is recomputed later (its prefix is usually still cached).
"""

from __future__ import annotations

import bisect
import itertools
import time
from dataclasses import dataclass, field

from pagoda.api.limits import AdmissionError, check_context
from pagoda.api.outputs import FinishReason
from pagoda.config import CacheConfig, SchedulerConfig
from pagoda.engine.kv_cache import KVCacheManager
from pagoda.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the request's known tokens (so one is sampled)."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == len(r.token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        max_model_len: int,
    ) -> None:
        self.config = scheduler_config
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(num_blocks, cache_config.block_size, cache_config.enable_prefix_caching)
        self.waiting: list[tuple[int, float, int, Request]] = []  # sorted by (priority, arrival, seq)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._seq = itertools.count()
        self.num_preemptions = 0

    # ---- admission -------------------------------------------------------------------------
    def max_tokens_for(self, request: Request) -> int:
        limit = self.max_model_len - request.num_prompt_tokens
        mt = request.sampling_params.max_tokens
        return limit if mt is None else min(mt, limit)

    def check_admissible(self, prompt_len: int, max_tokens: int | None) -> None:
        check_context(prompt_len, max_tokens, self.max_model_len)
        total = prompt_len + (max_tokens or 1)
        if self.kv.blocks_needed(total) > self.kv.num_blocks:
            raise AdmissionError(
                f"prompt + max_tokens = {total} tokens needs {self.kv.blocks_needed(total)} KV blocks "
                f"but the cache has {self.kv.num_blocks}; raise kv_cache_gib or lower max_tokens"
            )

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        bisect.insort(self.waiting, (request.priority, request.arrival_time, next(self._seq), request))

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(len(req.token_ids) - req.num_computed_tokens, budget)
            while not self.kv.allocate(req, num_new):
                victim = max(self.running[i:], key=lambda r: (r.priority, r.arrival_time))
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break
            out.scheduled.append(ScheduledRequest(req, num_new))
            budget -= num_new
            i += 1

        if not out.preempted:
            self._admit_waiting(out, budget)
        now = time.monotonic()
        for s in out.scheduled:
            if s.request.first_scheduled_time is None:
                s.request.first_scheduled_time = now
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        idx = 0
        while idx < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[idx][3]
            sibling = req.wait_for
            if sibling is not None and not sibling.is_finished and sibling.num_computed_tokens < sibling.num_prompt_tokens:
                idx += 1  # let the sibling fill the shared prompt blocks first
                continue
            cached = self._reusable_blocks(req) if req.num_computed_tokens == 0 else []
            remaining = len(req.token_ids) - req.num_computed_tokens - len(cached) * self.kv.block_size
            num_new = min(remaining, budget)
            if not self.kv.allocate(req, num_new, cached):
                if cached and req.reads_prefix_cache:  # undo the lookup's statistics: nothing was taken
                    self.kv.prefix_queries -= len(req.token_ids)
                    self.kv.prefix_hits -= len(cached) * self.kv.block_size
                break
            if req.num_preemptions == 0:
                req.num_cached_tokens = len(cached) * self.kv.block_size
            self.waiting.pop(idx)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, num_new))
            budget -= num_new

    def _reusable_blocks(self, req: Request) -> list[int]:
        """Computed blocks the request may start from: the prefix cache's, or for a request that reads none,
        its first sibling's own full prompt blocks (what this request computed, not what the cache holds)."""
        if req.reads_prefix_cache:
            return self.kv.find_cached_prefix(req)
        sibling = req.wait_for
        if sibling is None or sibling.is_finished or sibling.num_computed_tokens < sibling.num_prompt_tokens:
            return []
        return sibling.block_ids[: (req.num_prompt_tokens - 1) // self.kv.block_size]

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(request)

    # ---- after the model ran ---------------------------------------------------------------
    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed counts, append sampled tokens, finish requests. Returns the finished."""
        finished: list[Request] = []
        for s in out.scheduled:
            req = s.request
            if req.is_finished:  # aborted or failed during the step
                continue
            req.num_computed_tokens += s.num_new_tokens
            self.kv.publish_full_blocks(req)
            token = sampled.get(req.request_id)
            if token is not None:
                req.token_ids.append(token)
                self._check_stop(req, token)
            if req.is_finished:
                finished.append(req)
        return finished

    def _check_stop(self, req: Request, token: int) -> None:
        params = req.sampling_params
        n_out = req.num_output_tokens
        if n_out >= params.min_tokens:
            if not params.ignore_eos and token in req.eos_token_ids:
                self.finish(req, FinishReason.STOP)
                return
            if token in params.stop_token_ids:
                self.finish(req, FinishReason.STOP, stop_reason=token)
                return
        if n_out >= self.max_tokens_for(req) or len(req.token_ids) >= self.max_model_len:
            self.finish(req, FinishReason.LENGTH)

    def finish(self, req: Request, reason: FinishReason, stop_reason: int | str | None = None, error: str | None = None) -> None:
        """Finish a request in any state and give back its blocks. Idempotent."""
        if req.is_finished:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting = [w for w in self.waiting if w[3] is not req]
        self.kv.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        req.error = error
        self.requests.pop(req.request_id, None)

