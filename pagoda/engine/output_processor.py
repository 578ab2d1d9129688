"""Core outputs -> user-facing RequestOutputs: detokenization, stop strings, logprobs, n > 1 fan-in.

Runs in front of the engine core (in-process for ``LLM``, in the server process for
``pagoda serve``). Stop strings are found here, so the caller must tell the core to
free the sequences that ``process`` reports as ended.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from pagoda.engine.messages import CoreOutput
from pagoda.engine.request import CompletionOutput, FinishReason, RequestOutput, RequestTimes, SamplingParams
from pagoda.engine.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop

logger = logging.getLogger(__name__)


@dataclass
class _Child:
    request_id: str
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    output: CompletionOutput
    text: str = ""  # full detokenized text (visible text may lag behind it, see holdback)
    emitted_chars: int = 0
    emitted_tokens: int = 0
    # Nobody reads this sequence's text before it ends and no stop string is searched in it: detokenize the
    # whole output once at the end instead of twice per token (the offline ``generate`` path).
    deferred: bool = False


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[_Child]
    arrival_time: float
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    dirty: bool = False
    error: str | None = field(default=None)

    @property
    def finished(self) -> bool:
        return all(c.output.finish_reason is not None for c in self.children)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, _Parent] = {}
        self.child_to_parent: dict[str, tuple[_Parent, _Child]] = {}

    def add(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        child_request_ids: list[str],
        arrival_time: float | None = None,
        stream: bool = True,
    ) -> None:
        """``stream=False``: the caller only reads finished outputs (see ``_Child.deferred``)."""
        kids = []
        for i, cid in enumerate(child_request_ids):
            detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens)
            out = CompletionOutput(
                index=i,
                logprobs=[] if params.logprobs is not None else None,
                cumulative_logprob=0.0 if params.logprobs is not None else None,
            )
            kids.append(_Child(cid, params, detok, out, deferred=not stream and not params.stop))
        parent = _Parent(request_id, prompt, prompt_token_ids, kids, arrival_time or time.monotonic())
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
            parent.dirty = True
            parent.num_cached_tokens = max(parent.num_cached_tokens, co.num_cached_tokens)
            if parent.first_scheduled_time is None:
                parent.first_scheduled_time = co.first_scheduled_time
            out = child.output
            if out.finish_reason is not None:
                continue  # ended here already; the core may report a step more
            if co.new_token_ids:
                parent.first_token_time = parent.first_token_time or now
                parent.last_token_time = now
                try:
                    if self._take_tokens(child, co):
                        ended.append(child.request_id)
                        continue
                except Exception as exc:  # e.g. a detokenizer failure fails one request only
                    logger.error("output processing failed for %s: %s", co.request_id, exc)
                    out.finish_reason = FinishReason.ERROR.value
                    parent.error = parent.error or f"{type(exc).__name__}: {exc}"
                    ended.append(child.request_id)
                    continue
            if co.finish_reason is not None:
                out.finish_reason = co.finish_reason
                out.stop_reason = co.stop_reason
                if co.error and parent.error is None:
                    parent.error = co.error
        return ended

    def _take_tokens(self, child: _Child, co: CoreOutput) -> bool:
        """Append new tokens; True when a stop string ended the sequence."""
        out = child.output
        new_tokens = co.new_token_ids
        if co.new_logprobs is not None and out.logprobs is not None:
            for pos, tid in zip(co.new_logprobs, new_tokens):
                for token, lp in pos.items():
                    lp.decoded_token = self.tokenizer.decode([token], skip_special_tokens=False)
                out.logprobs.append(pos)
                out.cumulative_logprob = (out.cumulative_logprob or 0.0) + pos[tid].logprob
        out.token_ids.extend(new_tokens)
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
                out.finish_reason = FinishReason.STOP.value
                out.stop_reason = stop
                return True
        return False

    def _whole_text(self, child: _Child) -> str:
        """The text the incremental detokenizer would have built, in one decode: the same unless the output
        ends inside a multi-byte character, where the incremental path stops at the last complete one."""
        tokens = child.output.token_ids
        text = child.detokenizer.add(tokens)
        if text or not tokens:
            return text
        detok = IncrementalDetokenizer(self.tokenizer, child.detokenizer.prompt_token_ids, child.params.skip_special_tokens)
        return "".join(detok.add([t]) for t in tokens)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT, error: str | None = None) -> list[str]:
        """End a request on this side (the caller frees it in the core); returns its unfinished child ids."""
        parent = self.parents.get(request_id)
        if parent is None:
            return []
        ended = []
        for child in parent.children:
            if child.output.finish_reason is None:
                child.output.finish_reason = reason.value
                ended.append(child.request_id)
        if error and parent.error is None:
            parent.error = error
        parent.dirty = True
        return ended

    def collect(self, finished_only: bool = False) -> list[RequestOutput]:
        """RequestOutputs for every parent touched since the last call; forgets finished parents.
        ``finished_only``: skip the snapshots of unfinished ones (nobody streams them: offline ``generate``)."""
        results = []
        for parent in [p for p in self.parents.values() if p.dirty and (not finished_only or p.finished)]:
            parent.dirty = False
            outputs = []
            for child in parent.children:
                out = child.output
                if child.deferred and out.finish_reason is not None:
                    child.text, child.deferred = self._whole_text(child), False
                stops = child.params.stop
                holdback = 0 if out.finish_reason is not None or not stops else max(len(s) for s in stops) - 1
                visible = child.text[: max(child.emitted_chars, len(child.text) - holdback)]
                out.text = visible
                out.delta_text = visible[child.emitted_chars :]
                child.emitted_chars = len(visible)
                out.delta_token_ids = out.token_ids[child.emitted_tokens :]
                child.emitted_tokens = len(out.token_ids)
                outputs.append(out)
            finished = parent.finished
            results.append(
                RequestOutput(
                    request_id=parent.request_id,
                    prompt=parent.prompt,
                    prompt_token_ids=parent.prompt_token_ids,
                    outputs=[_snapshot(o) for o in outputs],
                    finished=finished,
                    num_cached_tokens=parent.num_cached_tokens,
                    error=parent.error,
                    metrics=RequestTimes(
                        parent.arrival_time, parent.first_scheduled_time, parent.first_token_time,
                        parent.last_token_time,
                    ),
                )
            )
            if finished:
                del self.parents[parent.request_id]
                for child in parent.children:
                    self.child_to_parent.pop(child.request_id, None)
        return results


def _snapshot(out: CompletionOutput) -> CompletionOutput:
    """A copy the caller may keep while the engine goes on appending to the live one."""
    return CompletionOutput(
        index=out.index,
        text=out.text,
        token_ids=list(out.token_ids),
        cumulative_logprob=out.cumulative_logprob,
        logprobs=list(out.logprobs) if out.logprobs is not None else None,
        finish_reason=out.finish_reason,
        stop_reason=out.stop_reason,
        delta_text=out.delta_text,
        delta_token_ids=list(out.delta_token_ids),
    )
