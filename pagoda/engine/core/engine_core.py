"""EngineCore: token ids in, new token ids out, one ``step()`` at a time. No text.

The core owns the scheduler and the KV cache's bookkeeping; its executor (engine/worker/) owns the
model, the cache's tensors and the sampler, and runs one data-only step at a time (engine/step.py). Text work
(tokenizing, detokenizing, stop strings) happens in front of it: in-process for
the offline ``LLM``, in the server process when the core runs in its own process
(``engine/core/process.py``). What it reports are plain ``CoreOutput`` records
(``api/messages.py``) that cross a socket as msgpack.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

from pagoda.api.limits import check_queue_room
from pagoda.api.messages import CoreOutput, CoreStats, child_ids
from pagoda.api.outputs import FinishReason
from pagoda.api.params import SamplingParams
from pagoda.config import EngineConfig
from pagoda.engine.worker.executor import Executor, ModelInfo
from pagoda.engine.core.request import Request
from pagoda.engine.core.scheduler import Scheduler
from pagoda.engine.core.structured_output import StructuredOutputManager

logger = logging.getLogger(__name__)


@dataclass
class EmbeddingJob:
    """One embeddings request: its inputs, done one after another in budget-sized chunks."""

    job_id: str
    inputs: list[list[int]]
    vectors: list[list[float]] = field(default_factory=list)
    request: Request | None = None  # the input in progress, holding borrowed KV blocks
    hidden_sum: list[float] | None = None
    error: Exception | None = None


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        self.config = config
        if executor is None:
            from pagoda.engine.worker.worker import Worker  # the model's process: torch comes with it

            executor = Worker(config)
        self.executor = executor
        self.info: ModelInfo = executor.info
        self.max_model_len = self.info.max_model_len
        self.num_blocks = self.info.num_blocks
        self.eos_token_ids = self.info.eos_token_ids
        self.scheduler = Scheduler(config.scheduler_config, config.cache_config, self.num_blocks, self.max_model_len,
                                   config.speculative_config)
        self.stats = CoreStats(num_blocks=self.num_blocks)
        self.parents: dict[str, list[Request]] = {}
        self._parent_of: dict[str, str] = {}  # child id -> parent id
        self._reported: list[CoreOutput] = []  # ends decided between steps (abort), reported by the next step
        self.embedding_jobs: deque[EmbeddingJob] = deque()
        self.structured = StructuredOutputManager(self.info.tokenizer, self.info.vocab_size,
                                                  config.decoding_config.structured_outputs_backend)
        # Requests refused after they were queued (a grammar that does not compile): (parent id, reason).
        self.rejected: list[tuple[str, str]] = []

    # ---- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
        arrival_time: float | None = None,
    ) -> list[str]:
        """Queue a request (n sequences); returns the child ids. Raises ValueError / QueueFullError."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        params.validate_for_vocab(self.info.vocab_size)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if request_id in self.parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not isinstance(prompt_token_ids, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt_token_ids
        ):
            raise ValueError("prompt_token_ids must be a list of integers")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.info.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids holds ids outside the vocabulary [0, {self.info.vocab_size}): {bad[:5]}")
        self.scheduler.check_admissible(len(prompt_token_ids), params.max_tokens)
        check_queue_room(len(self.scheduler.waiting), params.n, self.config.scheduler_config.max_queued_requests)
        now = time.monotonic() if arrival_time is None else arrival_time
        ids = list(prompt_token_ids)
        # A cached prefix was computed in other chunks than a full prefill, which changes the low bits of the
        # logits; a seeded draw must not depend on it. Batch-invariant kernels make both the same.
        reads_cache = (self.config.cache_config.enable_prefix_caching
                       and (params.seed is None or params.greedy or self.config.model_config.batch_invariant))
        children: list[Request] = []
        for i, cid in enumerate(child_ids(request_id, params.n)):
            child_params = params
            if params.n > 1:  # the first child alone computes the prompt logprobs, its siblings reuse its blocks
                seed = None if params.seed is None else params.seed + i
                child_params = dataclasses.replace(params, n=1, seed=seed,
                                                   prompt_logprobs=params.prompt_logprobs if i == 0 else None)
            children.append(
                Request(
                    cid,
                    ids,
                    child_params,
                    self.eos_token_ids,
                    arrival_time=now,
                    priority=priority,
                    cache_salt=cache_salt,
                    # A cached position has no logits to give its prompt logprob from.
                    reads_prefix_cache=reads_cache and child_params.prompt_logprobs is None,
                    # Siblings wait for the first child's prompt so they reuse its cached blocks.
                    wait_for=children[0] if i > 0 and self.config.cache_config.enable_prefix_caching else None,
                )
            )
        for child in children:
            if params.structured_outputs is not None:
                self.structured.submit(child)
            self.scheduler.add_request(child)
        self.parents[request_id] = children
        for c in children:
            self._parent_of[c.request_id] = request_id
        return [c.request_id for c in children]

    def abort_request(self, request_ids: list[str], report: bool = True) -> None:
        """Finish every sequence of these requests (parent ids) and free their blocks. Unknown ids are
        ignored (the request may have finished already). ``report``: emit their end in the next step."""
        for rid in request_ids:
            for req in self.parents.get(rid, []):
                self._finish_between_steps(req, report)
        self._forget_finished([c.request_id for rid in request_ids for c in self.parents.get(rid, [])])

    def finish_sequences(self, child_request_ids: list[str]) -> None:
        """Free the sequences the front end has ended itself (a stop string, a detokenizer error)."""
        for cid in child_request_ids:
            req = self.scheduler.requests.get(cid)
            if req is not None:
                self._finish_between_steps(req, report=False)
        self._forget_finished(child_request_ids)

    def _finish_between_steps(self, req: Request, report: bool) -> None:
        if req.is_finished:
            return
        self.scheduler.finish(req, FinishReason.ABORT)
        if report:
            self._reported.append(CoreOutput(req.request_id, finish_reason=FinishReason.ABORT.value))

    def _forget_finished(self, child_request_ids: list[str]) -> None:
        """Drop the parents whose last sequence is among these (just-ended) children."""
        for cid in child_request_ids:
            rid = self._parent_of.get(cid)
            kids = self.parents.get(rid) if rid is not None else None
            if kids is not None and all(k.is_finished for k in kids):
                del self.parents[rid]
                for k in kids:
                    self._parent_of.pop(k.request_id, None)
                    self.structured.forget(k.request_id)

    def add_embedding(self, job_id: str, inputs: list[list[int]]) -> None:
        """Queue embedding inputs for the executor's sentence encoder, or without one the served model's
        mean-pooled, L2-normalised final hidden states. Raises ValueError naming a bad input;
        ``embedding_chunk`` computes them."""
        encoder = self.info.encoder
        max_tokens = encoder.max_tokens if encoder is not None else self.max_model_len
        vocab_size = encoder.vocab_size if encoder is not None else self.info.vocab_size
        model = encoder.name if encoder is not None else self.info.name
        for index, ids in enumerate(inputs):
            if not ids or len(ids) > max_tokens:
                raise ValueError(f"input[{index}] has {len(ids)} tokens; {model} takes 1 to {max_tokens}")
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"input[{index}] holds token ids outside {model}'s vocabulary [0, {vocab_size}): "
                                 f"{bad[:5]}")
        self.embedding_jobs.append(EmbeddingJob(job_id, [list(ids) for ids in inputs]))

    def embedding_chunk(self) -> EmbeddingJob | None:
        """Run at most one scheduler token budget of the oldest embedding job, so a long job never stalls the
        running sequences for more than one step's worth of work. Returns the job once it is done
        (``vectors`` filled) or failed (``error`` set)."""
        job = self.embedding_jobs[0]
        try:
            if self.info.encoder is not None:
                self._encode_chunk(job)
            else:
                self._hidden_state_chunk(job)
        except Exception as exc:  # this job fails; the engine and the other requests go on
            if not isinstance(exc, MemoryError):
                logger.error("embedding failed: %s", traceback.format_exc())
            job.error = exc
            self._release_embedding(job)
        if job.error is None and len(job.vectors) < len(job.inputs):
            return None
        self.embedding_jobs.popleft()
        return job

    def _encode_chunk(self, job: EmbeddingJob) -> None:
        """The next inputs whose tokens fit the budget together (at least one), as one encoder batch."""
        budget = self.config.scheduler_config.max_num_batched_tokens
        end, tokens = len(job.vectors), 0
        while end < len(job.inputs) and (end == len(job.vectors) or tokens + len(job.inputs[end]) <= budget):
            tokens += len(job.inputs[end])
            end += 1
        job.vectors.extend(self.executor.encode(job.inputs[len(job.vectors):end]))

    def _hidden_state_chunk(self, job: EmbeddingJob) -> None:
        """One budget of the current input's prefill through the served model, over borrowed KV blocks."""
        kv = self.scheduler.kv
        if job.request is None:
            ids = job.inputs[len(job.vectors)]
            req = Request(f"{job.job_id}-{len(job.vectors)}", ids, SamplingParams(max_tokens=1), self.eos_token_ids)
            if not kv.allocate(req, len(ids)):
                raise MemoryError("not enough free KV blocks for this embedding input right now; retry later")
            job.request, job.hidden_sum = req, None
        req = job.request
        chunk = min(req.num_prompt_tokens - req.num_computed_tokens, self.config.scheduler_config.max_num_batched_tokens)
        part = self.executor.sum_hidden(req.token_ids, req.num_computed_tokens, chunk, req.block_ids)
        job.hidden_sum = part if job.hidden_sum is None else [a + b for a, b in zip(job.hidden_sum, part)]
        req.num_computed_tokens += chunk
        if req.num_computed_tokens == req.num_prompt_tokens:
            job.vectors.append(_normalized_mean(job.hidden_sum, req.num_prompt_tokens))
            self._release_embedding(job)

    def _release_embedding(self, job: EmbeddingJob) -> None:
        # Borrowed blocks, never published to the prefix cache.
        if job.request is not None:
            self.scheduler.kv.free(job.request)
            job.request = None

    def has_unfinished_requests(self) -> bool:
        return self.has_sequences() or bool(self.embedding_jobs)

    def has_sequences(self) -> bool:
        """Sequences (or ends to report) for ``step``; embedding jobs run apart from it."""
        return bool(self.parents) or bool(self._reported)

    def fail_all_sequences(self, error: str) -> list[CoreOutput]:
        """End every sequence with ``error`` and free its blocks: the way out of a step that failed outside
        the model (the scheduler's state can no longer be trusted for these requests)."""
        outputs, self._reported = self._reported, []
        for kids in self.parents.values():
            for req in kids:
                if not req.is_finished:
                    self.scheduler.finish(req, FinishReason.ERROR, error=error)
                    outputs.append(self._output(req, []))
        for cid in self._parent_of:
            self.structured.forget(cid)
        self.parents.clear()
        self._parent_of.clear()
        return outputs

    # ---- the loop ---------------------------------------------------------------------------
    def step(self) -> list[CoreOutput]:
        outputs, self._reported = self._reported, []
        outputs.extend(self._run())
        self._forget_finished([o.request_id for o in outputs if o.finish_reason is not None])
        return outputs

    def _run(self) -> list[CoreOutput]:
        self._reject_failed_compiles(wait=False)
        out = self.scheduler.schedule()
        if not out.req_ids:
            self._reject_failed_compiles(wait=True)  # only compiling requests: wait for one, not spin
            return []
        requests = self.scheduler.requests
        out.grammar_bitmask = self.structured.bitmask([requests[rid] for rid in out.req_ids], out.spec_token_ids) \
            if self.structured.active else None
        self.stats.num_steps += 1
        self.stats.prompt_tokens += out.num_prompt_tokens
        try:
            started = time.perf_counter()
            result = self.executor.execute_model(out)
            if self.scheduler.spec.adaptive and not out.num_prompt_tokens:  # decode steps fit a draft row's cost
                self.scheduler.spec.observe_step(out.total_num_scheduled_tokens, time.perf_counter() - started,
                                                 result.draft_forwards)
        except Exception as exc:  # fail this step's requests, keep the engine alive
            logger.error("model step failed: %s", traceback.format_exc())
            ended = []
            for rid in out.req_ids:
                req = self.scheduler.requests.get(rid)
                if req is not None:
                    self.scheduler.finish(req, FinishReason.ERROR, error=f"{type(exc).__name__}: {exc}")
                    ended.append(self._output(req, []))
            return ended
        outputs = self.scheduler.update(out, result)
        self.stats.generation_tokens += sum(len(o.new_token_ids) for o in outputs)
        return outputs

    def _reject_failed_compiles(self, wait: bool) -> None:
        for req, reason in self.structured.collect_compiled(wait):
            parent = self._parent_of.get(req.request_id)
            if parent is not None and parent in self.parents:
                self.abort_request([parent], report=False)
                self.rejected.append((parent, reason))

    def take_rejected(self) -> list[tuple[str, str]]:
        rejected, self.rejected = self.rejected, []
        return rejected

    def _output(self, req: Request, tokens: list[int]) -> CoreOutput:
        return CoreOutput(
            req.request_id,
            tokens,
            None,
            req.finish_reason.value if req.finish_reason is not None else None,
            req.stop_reason,
            req.error,
            req.num_cached_tokens,
            req.first_scheduled_time,
        )

    def snapshot_stats(self) -> CoreStats:
        kv = self.scheduler.kv
        free = kv.pool.num_free_blocks
        self.stats.num_running = len(self.scheduler.running)
        self.stats.num_waiting = len(self.scheduler.waiting)
        self.stats.num_free_blocks = free
        self.stats.kv_cache_usage = 1.0 - free / self.num_blocks
        self.stats.num_preemptions = self.scheduler.num_preemptions
        self.stats.prefix_cache_queries = kv.prefix_queries
        self.stats.prefix_cache_hits = kv.prefix_hits
        spec = self.scheduler.spec
        self.stats.spec_decode_num_drafts = spec.num_drafts
        self.stats.spec_decode_num_draft_tokens = spec.num_draft_tokens
        self.stats.spec_decode_num_accepted_tokens = spec.num_accepted_tokens
        return dataclasses.replace(self.stats)


def _normalized_mean(total: list[float], count: int) -> list[float]:
    norm = math.sqrt(sum(x * x for x in total)) / count
    scale = 1.0 / (count * max(norm, 1e-12))  # as torch.nn.functional.normalize: eps keeps a zero vector zero
    return [x * scale for x in total]
