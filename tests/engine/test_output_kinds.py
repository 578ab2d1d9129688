"""OutputProcessor output kinds: DELTA hands out only what is new (no history copied per step), FINAL_ONLY
one output at the end, CUMULATIVE copies the caller may keep; each output carries its own latency marks."""

from __future__ import annotations

import pytest

from pagoda.api.messages import CoreOutput
from pagoda.api.outputs import Logprob, RequestOutput, RequestOutputKind
from pagoda.api.params import SamplingParams
from pagoda.engine.frontend.output_processor import OutputProcessor
from pagoda.engine.frontend.tokenizer import Tokenizer
from pagoda.model.gguf_file import GGUFFile
from pagoda.model.tokenizer_source import tokenizer_from_gguf

STEPS = 6


@pytest.fixture(scope="module")
def tokenizer(bundled_gguf) -> Tokenizer:
    return Tokenizer(tokenizer_from_gguf(GGUFFile(bundled_gguf).metadata))


def _run(tokenizer: Tokenizer, kind: RequestOutputKind, ends: tuple[int, int] = (3, STEPS)) -> list[RequestOutput]:
    """A request with n=2 whose choices end after ``ends`` steps; one token (with logprobs) per step each."""
    proc = OutputProcessor(tokenizer)
    tokens = tokenizer.encode(" one two three four five six seven")
    proc.add("r", None, [1, 2, 3], SamplingParams(n=2, max_tokens=STEPS, logprobs=1), ["r-0", "r-1"], kind)
    outputs = []
    for step in range(STEPS):
        batch = []
        for child, end in zip(("r-0", "r-1"), ends):
            if step < end:
                tid = tokens[step]
                batch.append(CoreOutput(child, [tid], [{tid: Logprob(-0.5, 1)}],
                                        finish_reason="length" if step == end - 1 else None))
        proc.process(batch)
        outputs += proc.collect()
    assert not proc.parents and not proc.child_to_parent  # a finished request leaves nothing behind
    return outputs


def test_delta_outputs_hold_only_the_new_tokens_and_each_end_once(tokenizer: Tokenizer) -> None:
    deltas = _run(tokenizer, RequestOutputKind.DELTA)
    (final,) = _run(tokenizer, RequestOutputKind.FINAL_ONLY)
    assert [o.finished for o in deltas] == [False] * (STEPS - 1) + [True]
    for index, whole in enumerate(final.outputs):
        pieces = [c for o in deltas for c in o.outputs if c.index == index]
        assert all(len(c.token_ids) == 1 and len(c.logprobs) == 1 for c in pieces)  # no history re-sent
        assert [t for c in pieces for t in c.token_ids] == whole.token_ids
        assert [p for c in pieces for p in c.logprobs] == whole.logprobs
        assert "".join(c.text for c in pieces) == whole.text
        assert [c.finish_reason for c in pieces if c.finished] == ["length"]
        assert pieces[-1].cumulative_logprob == pytest.approx(whole.cumulative_logprob)
    assert deltas[-1].metrics.num_generation_tokens == 3 + STEPS


def test_final_only_gives_one_output(tokenizer: Tokenizer) -> None:
    (final,) = _run(tokenizer, RequestOutputKind.FINAL_ONLY)
    assert final.finished and [len(c.token_ids) for c in final.outputs] == [3, STEPS]


def test_cumulative_outputs_are_copies_the_caller_may_keep(tokenizer: Tokenizer) -> None:
    outputs = _run(tokenizer, RequestOutputKind.CUMULATIVE)
    assert [len(o.outputs[1].token_ids) for o in outputs] == list(range(1, STEPS + 1))
    assert [len(o.outputs[1].logprobs) for o in outputs] == list(range(1, STEPS + 1))
    assert outputs[-1].outputs[0].token_ids == outputs[2].outputs[0].token_ids


@pytest.mark.parametrize("kind", list(RequestOutputKind))
def test_latency_marks_come_once_with_the_outputs(tokenizer: Tokenizer, kind: RequestOutputKind) -> None:
    """The first token is reported by exactly one output and each later token step by one gap, so that
    the server's metrics keep no state per request (FINAL_ONLY: all of them in its one output)."""
    outputs = _run(tokenizer, kind)
    assert sum(o.metrics.is_first_token for o in outputs) == 1
    gaps = [g for o in outputs for g in o.metrics.inter_token_latencies]
    assert len(gaps) <= STEPS - 1 and all(g > 0 for g in gaps)


def test_abort_ends_each_unfinished_choice_once_in_delta(tokenizer: Tokenizer) -> None:
    proc = OutputProcessor(tokenizer)
    proc.add("r", None, [1, 2], SamplingParams(n=2, max_tokens=8), ["r-0", "r-1"], RequestOutputKind.DELTA)
    proc.process([CoreOutput("r-0", [5], finish_reason="length"), CoreOutput("r-1", [6])])
    (first,) = proc.collect()
    assert [(c.index, c.finish_reason) for c in first.outputs] == [(0, "length"), (1, None)]
    assert sorted(proc.abort("r")) == ["r-1"]
    (last,) = proc.collect()
    assert last.finished and [(c.index, c.finish_reason, c.token_ids) for c in last.outputs] == [(1, "abort", [])]
