"""Core outputs -> user-facing RequestOutputs: detokenization, stop strings, logprobs, n > 1 fan-in.

Runs in front of the engine core (in-process for ``LLM``, in the server process for
``pagoda serve``). Stop strings are found here, so the caller must tell the core to
free the sequences that ``process`` reports as ended.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from pagoda.api.messages import CoreOutput
from pagoda.api.outputs import (
    CompletionOutput,
    FinishReason,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
    RequestOutputKind,
)
from pagoda.api.params import SamplingParams
from pagoda.engine.frontend.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop

logger = logging.getLogger(__name__)


# A character is at most 4 bytes, so its unfinished tail spans at most 3 tokens; a little more covers
# byte-level tokenizers that merge.
_UTF8_TAIL_TOKENS = 8

@dataclass
class _Child:
    request_id: str
    index: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    # Tokens and logprobs not yet handed out (DELTA) or all of them (CUMULATIVE, FINAL_ONLY).
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    num_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    finish_emitted: bool = False
    text: str = ""  # full detokenized text (visible text may lag behind it, see holdback)
    emitted_chars: int = 0
    # Nobody reads this sequence's text before it ends and no stop string is searched in it: detokenize the
    # whole output once at the end instead of twice per token (FINAL_ONLY, the offline ``generate`` path).
    deferred: bool = False


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[_Child]
    kind: RequestOutputKind
    arrival_time: float
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    first_token_reported: bool = False
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # [None] + what the core sent so far
    prompt_logprobs_emitted: bool = False
    pending_inter_token_latencies: list[float] = field(default_factory=list)
    error: str | None = field(default=None)

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children)

    def take_metrics(self) -> RequestMetrics:
        metrics = RequestMetrics(
            self.arrival_time, self.first_scheduled_time, self.first_token_time, self.last_token_time,
            num_generation_tokens=sum(c.num_tokens for c in self.children),
            is_first_token=self.first_token_time is not None and not self.first_token_reported,
            inter_token_latencies=self.pending_inter_token_latencies,
        )
        self.first_token_reported = self.first_token_time is not None
        self.pending_inter_token_latencies = []
        return metrics


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, _Parent] = {}
        self.child_to_parent: dict[str, tuple[_Parent, _Child]] = {}
        # Parents touched since the last collect (a FINAL_ONLY one only once a child has ended), in order.
        self._touched: dict[str, _Parent] = {}

    def add(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        child_request_ids: list[str],
        kind: RequestOutputKind,
        arrival_time: float | None = None,
    ) -> None:
        kids = []
        for i, cid in enumerate(child_request_ids):
            detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens)
            wants_logprobs = params.logprobs is not None
            kids.append(_Child(cid, i, params, detok, logprobs=[] if wants_logprobs else None,
                               cumulative_logprob=0.0 if wants_logprobs else None,
                               deferred=kind is RequestOutputKind.FINAL_ONLY and not params.stop))
        parent = _Parent(request_id, prompt, prompt_token_ids, kids, kind, arrival_time or time.monotonic(),
                         prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
        self.parents[request_id] = parent
        for kid in kids:
            self.child_to_parent[kid.request_id] = (parent, kid)

    def process(self, outputs: list[CoreOutput]) -> list[str]:
        """Take one step's core outputs. Returns the child ids this side ended (stop string, detokenizer
        failure) that the core must still free."""
        ended: list[str] = []
        now = time.monotonic()
        for co in outputs:
            found = self.child_to_parent.get(co.request_id)
            if found is None:
                continue
            parent, child = found
            if parent.kind is not RequestOutputKind.FINAL_ONLY or co.finish_reason is not None:
                self._touched[parent.request_id] = parent
            parent.num_cached_tokens = max(parent.num_cached_tokens, co.num_cached_tokens)
            if parent.first_scheduled_time is None:
                parent.first_scheduled_time = co.first_scheduled_time
            if co.prompt_logprobs and parent.prompt_logprobs is not None:
                self._decode_logprob_tokens(co.prompt_logprobs)
                parent.prompt_logprobs.extend(co.prompt_logprobs)
            if child.finish_reason is not None:
                continue  # ended here already; the core may report a step more
            if co.new_token_ids:
                _mark_token_step(parent, now)
                try:
                    if self._take_tokens(child, co):
                        self._touched[parent.request_id] = parent
                        ended.append(child.request_id)
                        continue
                except Exception as exc:  # e.g. a detokenizer failure fails one request only
                    logger.error("output processing failed for %s: %s", co.request_id, exc)
                    child.finish_reason = FinishReason.ERROR.value
                    parent.error = parent.error or f"{type(exc).__name__}: {exc}"
                    self._touched[parent.request_id] = parent
                    ended.append(child.request_id)
                    continue
            if co.finish_reason is not None:
                child.finish_reason = co.finish_reason
                child.stop_reason = co.stop_reason
                if co.error and parent.error is None:
                    parent.error = co.error
        return ended

    def _take_tokens(self, child: _Child, co: CoreOutput) -> bool:
        """Append new tokens; True when a stop string ended the sequence."""
        new_tokens = co.new_token_ids
        if co.new_logprobs is not None and child.logprobs is not None:
            self._decode_logprob_tokens(co.new_logprobs)
            for pos, tid in zip(co.new_logprobs, new_tokens):
                child.logprobs.append(pos)
                child.cumulative_logprob = (child.cumulative_logprob or 0.0) + pos[tid].logprob
        child.token_ids.extend(new_tokens)
        child.num_tokens += len(new_tokens)
        if child.deferred:
            return False
        delta = child.detokenizer.add(new_tokens)
        child.text += delta
        stops = child.params.stop
        if delta and stops:
            hit = find_stop(child.text, len(delta), stops)
            if hit is not None:
                stop, idx = hit
                keep = idx + len(stop) if child.params.include_stop_str_in_output else idx
                child.text = child.text[:keep]
                child.finish_reason = FinishReason.STOP.value
                child.stop_reason = stop
                return True
        return False

    def _decode_logprob_tokens(self, positions: list[PositionLogprobs]) -> None:
        for pos in positions:
            for token, lp in pos.items():
                lp.decoded_token = self.tokenizer.decode([token], skip_special_tokens=False)

    def _whole_text(self, child: _Child) -> str:
        """The text the incremental detokenizer would have built, in one decode: the same unless the output
        ends inside a multi-byte character, where the incremental path stops at the last complete one (found
        by dropping a few trailing tokens, else by replaying token by token)."""
        tokens = child.token_ids
        text = child.detokenizer.add(tokens)
        if text or not tokens:
            return text
        prompt, skip = child.detokenizer.prompt_token_ids, child.params.skip_special_tokens
        for end in range(len(tokens) - 1, max(0, len(tokens) - _UTF8_TAIL_TOKENS) - 1, -1):
            text = IncrementalDetokenizer(self.tokenizer, prompt, skip).add(tokens[:end])
            if text:
                return text
        detok = IncrementalDetokenizer(self.tokenizer, prompt, skip)
        return "".join(detok.add([t]) for t in tokens)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT, error: str | None = None) -> list[str]:
        """End a request on this side (the caller frees it in the core); returns its unfinished child ids."""
        parent = self.parents.get(request_id)
        if parent is None:
            return []
        ended = []
        for child in parent.children:
            if child.finish_reason is None:
                child.finish_reason = reason.value
                ended.append(child.request_id)
        if error and parent.error is None:
            parent.error = error
        self._touched[request_id] = parent
        return ended

    def collect(self) -> list[RequestOutput]:
        """RequestOutputs for every parent touched since the last call (a FINAL_ONLY one only once it has
        finished); forgets finished parents."""
        results = []
        touched, self._touched = self._touched, {}
        for parent in touched.values():
            finished = parent.finished
            if parent.kind is RequestOutputKind.FINAL_ONLY and not finished:
                continue  # one child ended, its siblings go on
            if parent.kind is RequestOutputKind.DELTA:
                outputs = [o for c in parent.children if (o := self._delta(c)) is not None]
            else:
                outputs = [self._whole(c, copy=parent.kind is RequestOutputKind.CUMULATIVE) for c in parent.children]
            results.append(
                RequestOutput(
                    request_id=parent.request_id,
                    prompt=parent.prompt,
                    prompt_token_ids=parent.prompt_token_ids,
                    outputs=outputs,
                    finished=finished,
                    num_cached_tokens=parent.num_cached_tokens,
                    error=parent.error,
                    metrics=parent.take_metrics(),
                    prompt_logprobs=_prompt_logprobs(parent, finished),
                )
            )
            if finished:
                del self.parents[parent.request_id]
                for child in parent.children:
                    self.child_to_parent.pop(child.request_id, None)
        return results

    def _visible_end(self, child: _Child) -> int:
        """How much of the text may be shown: all once ended, else all but what could still start a stop
        string."""
        if child.deferred and child.finish_reason is not None:
            child.text, child.deferred = self._whole_text(child), False
        stops = child.params.stop
        holdback = 0 if child.finish_reason is not None or not stops else max(len(s) for s in stops) - 1
        return max(child.emitted_chars, len(child.text) - holdback)

    def _whole(self, child: _Child, copy: bool) -> CompletionOutput:
        """Everything so far; ``copy``: lists the caller may keep while this child grows (CUMULATIVE)."""
        end = self._visible_end(child)
        child.emitted_chars = end
        logprobs = child.logprobs
        return CompletionOutput(
            index=child.index,
            text=child.text[:end],
            token_ids=list(child.token_ids) if copy else child.token_ids,
            cumulative_logprob=child.cumulative_logprob,
            logprobs=list(logprobs) if copy and logprobs is not None else logprobs,
            finish_reason=child.finish_reason,
            stop_reason=child.stop_reason,
        )

    def _delta(self, child: _Child) -> CompletionOutput | None:
        """What is new since this child's previous output (None: nothing, not even its end)."""
        end = self._visible_end(child)
        text = child.text[child.emitted_chars : end]
        child.emitted_chars = end
        newly_finished = child.finish_reason is not None and not child.finish_emitted
        if not text and not child.token_ids and not newly_finished:
            return None
        child.finish_emitted = child.finish_reason is not None
        out = CompletionOutput(
            index=child.index,
            text=text,
            token_ids=child.token_ids,
            cumulative_logprob=child.cumulative_logprob,
            logprobs=child.logprobs,
            finish_reason=child.finish_reason,
            stop_reason=child.stop_reason,
        )
        child.token_ids = []
        child.logprobs = [] if child.logprobs is not None else None
        return out


def _prompt_logprobs(parent: _Parent, finished: bool) -> list[PositionLogprobs | None] | None:
    """Once the prompt is done (its first token came, or the request ended): always, or once for DELTA."""
    done = parent.first_token_time is not None or finished
    if parent.prompt_logprobs is None or not done:
        return None
    if parent.kind is RequestOutputKind.DELTA:
        if parent.prompt_logprobs_emitted:
            return None
        parent.prompt_logprobs_emitted = True
    return list(parent.prompt_logprobs) if parent.kind is RequestOutputKind.CUMULATIVE else parent.prompt_logprobs


def _mark_token_step(parent: _Parent, now: float) -> None:
    """A step brought tokens: the first token's time, or one inter-token gap per step (not per child)."""
    if parent.first_token_time is None:
        parent.first_token_time = now
    elif parent.last_token_time is not None and now > parent.last_token_time:
        parent.pending_inter_token_latencies.append(now - parent.last_token_time)
    parent.last_token_time = now
