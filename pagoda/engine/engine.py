"""LLMEngine: requests in, RequestOutputs out, one ``step()`` at a time; LLM: the offline API."""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from tqdm import tqdm

from pagoda.config import EngineConfig
from pagoda.engine.output_processor import OutputProcessor
from pagoda.engine.request import FinishReason, Request, RequestOutput, SamplingParams
from pagoda.engine.runner import ModelRunner, allocate_kv_cache, kv_bytes_per_block
from pagoda.engine.sampler import Sampler
from pagoda.engine.scheduler import QueueFullError, Scheduler, SchedulerOutput
from pagoda.engine.tokenizer import Tokenizer
from pagoda.model.attention import get_backend
from pagoda.model.layers.linear import configure_linear
from pagoda.model.loader import default_dtype, load_model

logger = logging.getLogger(__name__)

PromptType = Union[str, list[int], dict[str, Any]]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineStats:
    num_steps: int = 0
    prompt_tokens_computed: int = 0  # prompt tokens that went through the model (cache hits excluded)
    generation_tokens: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        mc, cc = config.model_config, config.cache_config
        self.device = "cpu"
        torch.manual_seed(mc.seed)
        self.dtype = _DTYPES[mc.dtype] if mc.dtype != "auto" else default_dtype(self.device)
        configure_linear(mc.batch_invariant)
        loaded = load_model(mc.model, self.dtype, mc.load_format, mc.tokenizer, mc.seed)
        self.model = loaded.model.eval()
        self.arch = loaded.arch
        self.model_name = loaded.name
        self.tokenizer = Tokenizer(loaded.tokenizer)
        self.eos_token_ids = self.tokenizer.eos_token_ids | frozenset(self.arch.eos_token_ids)
        self.max_model_len = self._resolve_max_model_len()
        bytes_per_block = kv_bytes_per_block(self.model, cc.block_size)
        num_blocks = cc.num_kv_blocks or int(cc.kv_cache_gib * 2**30 // bytes_per_block)
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_gib={cc.kv_cache_gib} holds no KV block ({bytes_per_block} bytes each); raise it"
            )
        self.num_blocks = num_blocks
        self.scheduler = Scheduler(config.scheduler_config, cc, num_blocks, self.max_model_len)
        self.runner = ModelRunner(
            self.model,
            allocate_kv_cache(self.model, num_blocks, cc.block_size, self.device),
            cc.block_size,
            get_backend(mc.attention_backend, self.device, mc.batch_invariant),
            self.device,
        )
        self.sampler = Sampler(mc.seed)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.stats = EngineStats()

    def _resolve_max_model_len(self) -> int:
        limit = self.arch.max_position_embeddings
        if self.arch.sliding_window:  # without sliding-window attention, stay inside the window
            limit = min(limit, self.arch.sliding_window)
        wanted = self.config.model_config.max_model_len
        if wanted is None:
            return limit
        if wanted > limit:
            raise ValueError(f"max_model_len={wanted} exceeds the model's limit of {limit} tokens")
        return wanted

    # ---- requests ---------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
            else:
                raise ValueError("prompt dict must have 'prompt' or 'prompt_token_ids'")
        else:
            ids = prompt
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids):
            raise ValueError("prompt_token_ids must be a list of integers")
        vocab = self.arch.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids holds ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        return None, list(ids)

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> None:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        params.validate_for_vocab(self.arch.vocab_size)
        if not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if request_id in self.output_processor.parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, ids = self.tokenize_prompt(prompt)
        self.scheduler.check_admissible(len(ids), params.max_tokens)
        sched_cfg = self.config.scheduler_config
        if len(self.scheduler.waiting) + params.n > sched_cfg.max_queued_requests:
            raise QueueFullError(f"waiting queue is full ({sched_cfg.max_queued_requests} requests); retry later")
        children: list[Request] = []
        now = time.monotonic()
        for i in range(params.n):
            child_params = params
            if params.n > 1:
                seed = None if params.seed is None else params.seed + i
                child_params = dataclasses.replace(params, n=1, seed=seed)
            child_id = request_id if params.n == 1 else f"{i}_{request_id}"
            children.append(
                Request(
                    child_id,
                    ids,
                    child_params,
                    self.eos_token_ids,
                    arrival_time=now,
                    priority=priority,
                    cache_salt=cache_salt,
                    wait_for=children[0] if i > 0 and self.config.cache_config.enable_prefix_caching else None,
                )
            )
        for child in children:
            self.scheduler.add_request(child)
        self.output_processor.add(request_id, text, ids, children)

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            parent = self.output_processor.parents.get(rid)
            children = [c.request for c in parent.children] if parent else []
            for req in children:
                self.scheduler.finish(req, FinishReason.ABORT)
                self.output_processor.mark_dirty(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.output_processor.parents)

    # ---- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if out.scheduled:
            self._run(out)
        return self.output_processor.collect()

    def _run(self, out: SchedulerOutput) -> None:
        self.stats.num_steps += 1
        for s in out.scheduled:
            r = s.request
            self.stats.prompt_tokens_computed += max(0, min(r.num_prompt_tokens - r.num_computed_tokens, s.num_new_tokens))
        try:
            sampling, logits = self.runner.execute(out.scheduled)
            requests = [s.request for s in sampling]
            result = self.sampler(logits, requests) if requests else None
        except Exception as exc:  # fail this step's requests, keep the engine alive
            logger.error("model step failed: %s", traceback.format_exc())
            for s in out.scheduled:
                self.scheduler.finish(s.request, FinishReason.ERROR, error=f"{type(exc).__name__}: {exc}")
                self.output_processor.mark_dirty(s.request)
            return
        sampled = {r.request_id: t for r, t in zip(requests, result.token_ids)} if result else {}
        self.stats.generation_tokens += len(sampled)
        self.scheduler.update(out, sampled)
        for i, req in enumerate(requests):
            try:
                stop = self.output_processor.process(req, result.logprobs[i])
            except Exception as exc:  # e.g. a detokenizer failure fails one request only
                logger.error("output processing failed for %s: %s", req.request_id, exc)
                self.scheduler.finish(req, FinishReason.ERROR, error=f"{type(exc).__name__}: {exc}")
                continue
            if stop is not None:
                self.scheduler.finish(req, FinishReason.STOP, stop_reason=stop)
        for s in out.scheduled:  # finished without sampling (abort/error) still report
            if s.request.is_finished:
                self.output_processor.mark_dirty(s.request)


def _as_list(value: Any, count: int, name: str) -> list[Any]:
    if isinstance(value, list):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries but there are {count} prompts")
        return value
    return [value] * count


class LLM:
    """Offline inference, mirroring vLLM: ``LLM(model=...).generate(prompts, sampling_params)``."""

    def __init__(self, model: str = EngineConfig().model_config.model, **engine_args: Any) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **engine_args))

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = _as_list(sampling_params or SamplingParams(), len(prompts), "sampling_params")
        priorities = _as_list(priority if priority is not None else 0, len(prompts), "priority")
        ids = [uuid.uuid4().hex for _ in prompts]
        try:
            for rid, prompt, p, prio in zip(ids, prompts, params, priorities):
                self.engine.add_request(rid, prompt, p, priority=prio)
        except Exception:
            self.engine.abort_request(ids)
            self.engine.output_processor.collect()
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finals: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm or None, leave=False) as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finals[output.request_id] = output
                        bar.update(1)
        return [finals[i] for i in ids]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        tok = self.engine.tokenizer
        prompts = [
            {"prompt_token_ids": tok.encode(tok.apply_chat_template(c, add_generation_prompt), add_special_tokens=False)}
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def generate_stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield this prompt's output after every step that changed it (``delta_text`` holds the new text)."""
        rid = uuid.uuid4().hex
        self.engine.add_request(rid, prompt, sampling_params)
        try:
            done = False
            while not done:
                for output in self.engine.step():
                    if output.request_id == rid:
                        done = output.finished
                        yield output
        finally:
            if not done:
                self.engine.abort_request(rid)
                self.engine.output_processor.collect()
