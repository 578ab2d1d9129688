"""Iteration-level continuous batching with one token budget per step.

Each step first gives every running request its next tokens (one decode token
and any draft tokens, or the next prefill chunk), then admits waiting requests in (priority, arrival)
order while budget, ``max_num_seqs`` and KV blocks last. When blocks run out the
lowest-priority, newest running request is preempted: its blocks are freed and
it is recomputed later (its prefix is usually still cached). What the worker
needs to know of it goes out as a data-only ``SchedulerOutput`` (engine/step.py);
``update`` takes back a list of tokens per request.
"""

from __future__ import annotations

import bisect
import itertools
import time

from pagoda.api.limits import AdmissionError, check_context
from pagoda.api.messages import CoreOutput
from pagoda.api.outputs import FinishReason
from pagoda.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from pagoda.engine.core.draft_policy import DraftPolicy
from pagoda.engine.core.kv_cache import KVCacheManager
from pagoda.engine.core.request import Request, RequestStatus
from pagoda.engine.step import ModelRunnerOutput, NewRequestData, SchedulerOutput


class Scheduler:
    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        max_model_len: int,
        speculative: SpeculativeConfig | None = None,
    ) -> None:
        self.config = scheduler_config
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(num_blocks, cache_config.block_size, cache_config.enable_prefix_caching)
        self.waiting: list[tuple[int, float, int, Request]] = []  # sorted by (priority, arrival, seq)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._seq = itertools.count()
        self.num_preemptions = 0
        self._finished: list[str] = []  # ended since the last step, for the worker to forget
        self.spec = DraftPolicy(adaptive=False) if speculative is None \
            else DraftPolicy(speculative.adaptive, speculative.num_speculative_tokens)
        # A draft model writes its drafts' KV past a request's step before they are verified: slots held for them.
        self.lookahead = speculative.num_speculative_tokens \
            if speculative is not None and speculative.method == "draft_model" else 0

    # ---- admission -------------------------------------------------------------------------
    def max_tokens_for(self, prompt_len: int, max_tokens: int | None) -> int:
        limit = self.max_model_len - prompt_len
        return limit if max_tokens is None else min(max_tokens, limit)

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
        params = request.sampling_params
        request.max_length = request.num_prompt_tokens + self.max_tokens_for(request.num_prompt_tokens, params.max_tokens)
        request.stop_token_set = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos
                                                                     else request.eos_token_ids)
        self.requests[request.request_id] = request
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        bisect.insort(self.waiting, (request.priority, request.arrival_time, next(self._seq), request))

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished)
        self._finished = []
        budget = self.config.max_num_batched_tokens
        bs = self.kv.block_size
        running = self.running
        self.spec.trim(running)
        req_ids, num_scheduled, num_computed = out.req_ids, out.num_scheduled_tokens, out.num_computed_tokens
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            computed = req.num_computed_tokens
            known = len(req.token_ids) - computed
            num_new = known + len(req.spec_token_ids) if req.spec_token_ids else known
            if num_new > budget:
                num_new = budget
            reserve = num_new + self._lookahead(req, computed + num_new) if self.lookahead else num_new
            # The common decode step has room in its last block: no call into the KV manager.
            if computed + reserve > len(req.block_ids) * bs:
                while not self.kv.allocate(req, reserve):
                    victim = max(running[i:], key=lambda r: (r.priority, r.arrival_time))
                    self._preempt(victim)
                    out.preempted_req_ids.append(victim.request_id)
                    if victim is req:
                        break
                if req.status is not RequestStatus.RUNNING:
                    break
            if (num_new <= known and computed >= req.num_prompt_tokens and req.num_sent_blocks == len(req.block_ids)
                    and req.sent_to_worker and not req.resumed):
                req_ids.append(req.request_id)  # a plain decode step: nothing changed for the worker
                num_scheduled.append(num_new)
                num_computed.append(computed)
            else:
                self._add_scheduled(out, req, num_new, known)
            budget -= num_new
            i += 1

        if not out.preempted_req_ids:
            self._admit_waiting(out, budget)
        out.max_spec_tokens = self.spec.draft_limit(running)
        return out

    def _add_scheduled(self, out: SchedulerOutput, req: Request, num_new: int, known: int) -> None:
        """Put one request's step into ``out``: its whole payload the first time, else what changed."""
        rid = req.request_id
        out.req_ids.append(rid)
        out.num_scheduled_tokens.append(num_new)
        out.num_computed_tokens.append(req.num_computed_tokens)
        if num_new > known:  # the budget may cut into the drafts: verify what fits
            out.spec_token_ids[rid] = req.spec_token_ids[: num_new - known]
        if req.num_computed_tokens < req.num_prompt_tokens:
            out.num_prompt_tokens += min(req.num_prompt_tokens - req.num_computed_tokens, num_new)
        if not req.sent_to_worker:
            out.new_requests.append(NewRequestData(rid, req.prompt_token_ids, req.sampling_params, req.eos_token_ids,
                                                   list(req.block_ids), req.num_computed_tokens))
            req.sent_to_worker = True
        elif req.resumed:
            out.cached.resumed_req_ids.append(rid)
            out.cached.new_block_ids[rid] = list(req.block_ids)
            req.resumed = False
        elif len(req.block_ids) > req.num_sent_blocks:
            out.cached.new_block_ids[rid] = req.block_ids[req.num_sent_blocks :]
        req.num_sent_blocks = len(req.block_ids)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        idx = 0
        now = time.monotonic()
        while idx < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[idx][3]
            if req.grammar is not None and req.grammar.matcher is None:
                idx += 1  # its grammar is still compiling
                continue
            sibling = req.wait_for
            if sibling is not None and not sibling.is_finished and sibling.num_computed_tokens < sibling.num_prompt_tokens:
                idx += 1  # let the sibling fill the shared prompt blocks first
                continue
            cached = self._reusable_blocks(req) if req.num_computed_tokens == 0 else []
            remaining = len(req.token_ids) - req.num_computed_tokens - len(cached) * self.kv.block_size
            num_new = min(remaining, budget)
            end = len(req.token_ids) - remaining + num_new
            if not self.kv.allocate(req, num_new + self._lookahead(req, end), cached):
                if cached and req.reads_prefix_cache:  # undo the lookup's statistics: nothing was taken
                    self.kv.prefix_queries -= len(req.token_ids)
                    self.kv.prefix_hits -= len(cached) * self.kv.block_size
                break
            if req.num_preemptions == 0:
                req.num_cached_tokens = len(cached) * self.kv.block_size
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            self.waiting.pop(idx)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._add_scheduled(out, req, num_new, num_new)
            budget -= num_new

    def _lookahead(self, req: Request, end: int) -> int:
        """Slots to hold past the ``end`` tokens a step computes: the draft model's drafts, which stay within
        the request's length (so admission's check of prompt + max_tokens still holds)."""
        return max(0, min(self.lookahead, req.max_length - end))

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
        request.spec_token_ids = []  # it comes back as a prefill
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.resumed = request.sent_to_worker
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(request)

    # ---- after the model ran ---------------------------------------------------------------
    def update(self, out: SchedulerOutput, result: ModelRunnerOutput) -> list[CoreOutput]:
        """Advance computed counts by what was accepted, append the new tokens up to a stop, finish
        requests. Returns what each request gained (or how it ended)."""
        outputs: list[CoreOutput] = []
        requests, spec = self.requests, out.spec_token_ids
        caching, bs = self.kv.enable_prefix_caching, self.kv.block_size
        logprobs, prompt_logprobs, proposals = result.logprobs, result.prompt_logprobs, result.spec_token_ids
        num_scheduled, sampled = out.num_scheduled_tokens, result.sampled_token_ids
        finished_status = RequestStatus.FINISHED
        for i, rid in enumerate(out.req_ids):
            req = requests.get(rid)
            if req is None:  # aborted or failed during the step
                continue
            tokens = sampled[i]
            num_new = num_scheduled[i]
            drafts = spec.get(rid) if spec else None
            if drafts:  # rejected drafts hold no valid KV: their slots are overwritten by later tokens
                num_new -= len(drafts) + 1 - len(tokens)
                self.spec.record(req, len(drafts), len(tokens) - 1)
            if proposals is not None:
                req.spec_token_ids = proposals[i]
            elif req.spec_token_ids:  # verified, or cut by the budget: none stay for the next step
                req.spec_token_ids = []
            req.num_computed_tokens += num_new
            token_ids = req.token_ids
            base = len(token_ids)
            token_ids.extend(tokens)  # accepted drafts first: they are the newly computed positions' tokens
            if caching and req.num_computed_tokens >= (req.num_published_blocks + 1) * bs:
                self.kv.publish_full_blocks(req)
            taken = len(tokens)
            grammar = req.grammar
            if grammar is not None:  # the mask allowed only these; a miss would be a fault, never silent
                taken = grammar.accept(tokens)
                if taken < len(tokens):
                    self.finish(req, FinishReason.ERROR, error="the output left its grammar (structured_outputs)")
            stops, max_length = req.stop_token_set, req.max_length
            for j, token in enumerate(tokens if taken == len(tokens) else tokens[:taken]):
                if (token in stops or base + j + 1 >= max_length) and self._check_stop(req, token, base + j + 1):
                    taken = j + 1
                    break
            if grammar is not None and not req.is_finished and grammar.terminated:
                self.finish(req, FinishReason.STOP)  # the grammar is complete
            if taken < len(tokens):
                del token_ids[base + taken :]
                tokens = tokens[:taken]
            prompt_lp = prompt_logprobs.get(rid) if prompt_logprobs else None
            finished = req.status is finished_status
            if not taken and not finished and prompt_lp is None:
                continue  # a prefill chunk that did not reach the end of the prompt
            row_logprobs = logprobs[i] if logprobs is not None else None
            outputs.append(CoreOutput(
                rid, tokens, row_logprobs[:taken] if row_logprobs else None,
                req.finish_reason.value if finished else None,
                req.stop_reason, req.error, req.num_cached_tokens, req.first_scheduled_time, prompt_lp))
        return outputs

    def _check_stop(self, req: Request, token: int, length: int) -> bool:
        """Finish the request if ``token``, making it ``length`` tokens long, ends it; returns whether it did."""
        params = req.sampling_params
        n_out = length - req.num_prompt_tokens
        if n_out >= params.min_tokens:
            if not params.ignore_eos and token in req.eos_token_ids:
                self.finish(req, FinishReason.STOP)
                return True
            if token in params.stop_token_ids:
                self.finish(req, FinishReason.STOP, stop_reason=token)
                return True
        if length >= req.max_length:
            self.finish(req, FinishReason.LENGTH)
            return True
        return False

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
        if req.sent_to_worker:
            self._finished.append(req.request_id)

