"""Engine tokens -> user-facing RequestOutputs: detokenization, stop strings, logprobs, n > 1 fan-in."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagoda.engine.request import CompletionOutput, PositionLogprobs, Request, RequestOutput
from pagoda.engine.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop


@dataclass
class _Child:
    request: Request
    detokenizer: IncrementalDetokenizer
    output: CompletionOutput
    text: str = ""  # full detokenized text (visible text may lag behind it, see holdback)
    emitted_chars: int = 0
    emitted_tokens: int = 0
    processed_tokens: int = 0


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[_Child]
    num_cached_tokens: int = 0
    dirty: bool = False
    error: str | None = field(default=None)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, _Parent] = {}
        self.child_to_parent: dict[str, _Parent] = {}

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], children: list[Request]) -> None:
        kids = []
        for i, req in enumerate(children):
            p = req.sampling_params
            detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, p.skip_special_tokens)
            out = CompletionOutput(index=i, logprobs=[] if p.logprobs is not None else None,
                                   cumulative_logprob=0.0 if p.logprobs is not None else None)
            kids.append(_Child(req, detok, out))
        parent = _Parent(request_id, prompt, prompt_token_ids, kids)
        self.parents[request_id] = parent
        for kid in kids:
            self.child_to_parent[kid.request.request_id] = parent

    def process(self, request: Request, logprobs: PositionLogprobs | None) -> str | None:
        """Take the request's new tokens; returns a stop string if one was hit (caller finishes it)."""
        parent = self.child_to_parent.get(request.request_id)
        if parent is None:
            return None
        child = next(c for c in parent.children if c.request is request)
        parent.dirty = True
        new_tokens = request.output_token_ids[child.processed_tokens :]
        child.processed_tokens += len(new_tokens)
        out = child.output
        if out.finish_reason is not None:
            return None
        if logprobs is not None and out.logprobs is not None:
            for tid, lp in logprobs.items():
                lp.decoded_token = self.tokenizer.decode([tid], skip_special_tokens=False)
            out.logprobs.append(logprobs)
            out.cumulative_logprob = (out.cumulative_logprob or 0.0) + logprobs[new_tokens[-1]].logprob
        out.token_ids.extend(new_tokens)
        delta = child.detokenizer.add(new_tokens) if new_tokens else ""
        child.text += delta
        stops = request.sampling_params.stop
        if delta and stops:
            hit = find_stop(child.text, len(delta), stops)
            if hit is not None:
                stop, idx = hit
                keep = idx + len(stop) if request.sampling_params.include_stop_str_in_output else idx
                child.text = child.text[:keep]
                return stop
        return None

    def mark_dirty(self, request: Request) -> None:
        parent = self.child_to_parent.get(request.request_id)
        if parent is not None:
            parent.dirty = True

    def collect(self) -> list[RequestOutput]:
        """RequestOutputs for every parent touched since the last call; forgets finished parents."""
        results = []
        for parent in [p for p in self.parents.values() if p.dirty]:
            parent.dirty = False
            outputs = []
            for child in parent.children:
                req, out = child.request, child.output
                if req.is_finished and out.finish_reason is None:
                    out.finish_reason = req.finish_reason.value
                    out.stop_reason = req.stop_reason
                    if req.error and parent.error is None:
                        parent.error = req.error
                stops = req.sampling_params.stop
                holdback = 0 if req.is_finished or not stops else max(len(s) for s in stops) - 1
                visible = child.text[: max(child.emitted_chars, len(child.text) - holdback)]
                out.text = visible
                out.delta_text = visible[child.emitted_chars :]
                child.emitted_chars = len(visible)
                out.delta_token_ids = out.token_ids[child.emitted_tokens :]
                child.emitted_tokens = len(out.token_ids)
                outputs.append(out)
            parent.num_cached_tokens = parent.children[0].request.num_cached_tokens
            finished = all(c.request.is_finished for c in parent.children)
            results.append(
                RequestOutput(
                    request_id=parent.request_id,
                    prompt=parent.prompt,
                    prompt_token_ids=parent.prompt_token_ids,
                    outputs=[_snapshot(o) for o in outputs],
                    finished=finished,
                    num_cached_tokens=parent.num_cached_tokens,
                    error=parent.error,
                )
            )
            if finished:
                del self.parents[parent.request_id]
                for child in parent.children:
                    self.child_to_parent.pop(child.request.request_id, None)
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
