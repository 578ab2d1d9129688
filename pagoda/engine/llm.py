"""LLMEngine: requests in, RequestOutputs out, one ``step()`` at a time; LLM: the offline API."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, Union

from tqdm import tqdm

from pagoda.api.messages import CoreStats
from pagoda.api.outputs import FinishReason, RequestOutput, RequestOutputKind
from pagoda.api.params import SamplingParams
from pagoda.config import EngineConfig
from pagoda.engine.core.engine_core import EngineCore
from pagoda.engine.frontend.output_processor import OutputProcessor
from pagoda.engine.worker.model_runner import ModelRunner
from pagoda.engine.worker.worker import Worker
from pagoda.engine.core.scheduler import Scheduler
from pagoda.engine.frontend.tokenizer import Tokenizer

PromptType = Union[str, list[int], dict[str, Any]]


class LLMEngine:
    """The engine core plus, in the same process, the text side in front of it."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.worker = Worker(config)
        self.core = EngineCore(config, self.worker)
        self.tokenizer = Tokenizer(self.core.info.tokenizer, self.core.eos_token_ids)
        self.output_processor = OutputProcessor(self.tokenizer)

    # The core's parts, for tests and benchmarks.
    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler

    @property
    def runner(self) -> ModelRunner:
        return self.worker.runner

    @property
    def stats(self) -> CoreStats:
        return self.core.stats

    @property
    def num_blocks(self) -> int:
        return self.core.num_blocks

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    # ---- requests ---------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return None, prompt["prompt_token_ids"]
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
            raise ValueError("prompt dict must have 'prompt' or 'prompt_token_ids'")
        return None, prompt

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE,
    ) -> None:
        params = params or SamplingParams()
        if request_id in self.output_processor.parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, ids = self.tokenize_prompt(prompt)
        now = time.monotonic()
        children = self.core.add_request(request_id, ids, params, priority, cache_salt, arrival_time=now)
        self.output_processor.add(request_id, text, list(ids), params, children, output_kind, arrival_time=now)

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for rid in ids:
            self.output_processor.abort(rid)
        self.core.abort_request(ids, report=False)

    def has_unfinished_requests(self) -> bool:
        return bool(self.output_processor.parents)

    # ---- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step; the outputs of the requests it changed (a FINAL_ONLY one once it has finished)."""
        ended = self.output_processor.process(self.core.step())
        for rid, reason in self.core.take_rejected():  # refused once queued (a grammar that did not compile)
            self.output_processor.abort(rid, FinishReason.ERROR, error=reason)
        if ended:  # stop strings and detokenizer failures: free those sequences before the next step
            self.core.finish_sequences(ended)
        return self.output_processor.collect()


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
                self.engine.add_request(rid, prompt, p, priority=prio, output_kind=RequestOutputKind.FINAL_ONLY)
        except Exception:
            self.engine.abort_request(ids)
            self.engine.output_processor.collect()  # forget them
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

    def generate_stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                        output_kind: RequestOutputKind = RequestOutputKind.DELTA) -> Iterator[RequestOutput]:
        """Yield this prompt's output after every step that changed it: by default only what is new (DELTA);
        CUMULATIVE outputs hold everything so far."""
        rid = uuid.uuid4().hex
        self.engine.add_request(rid, prompt, sampling_params, output_kind=output_kind)
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
