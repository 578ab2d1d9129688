"""The engine core in its own process, fed and drained over ZeroMQ with msgpack frames.

Started by ``EngineClient`` as ``python -m pagoda.engine.core.process`` (nothing is
pickled: the config travels as JSON on the command line). Messages in (PULL):

    ["add", request_id, prompt_token_ids, sampling_params dict, priority, cache_salt, arrival_time]
    ["abort", [request_id, ...]]           end whole requests (client gone)
    ["finish", [child_request_id, ...]]    sequences the front end ended (stop strings)
    ["embed", request_id, [[token ids], ...]]  embeddings (answered with "embedded")
    ["shutdown"]

Messages out (PUSH): ["ready", info], ["failed", kind, message], ["rejected", request_id, kind, message]
(kind: "invalid" bad input, "queue_full" retry later, "internal" an engine fault),
["embedded", request_id, [[float, ...], ...]],
["outputs", [CoreOutput wire, ...], CoreStats dict] after every step and after every batch of input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import traceback
from typing import Any

import zmq

from pagoda.api.limits import QueueFullError
from pagoda.api.messages import pack, params_from_wire, unpack
from pagoda.config import EngineConfig

logger = logging.getLogger("pagoda.engine_core")
IDLE_POLL_MS = 500


def _request_id_of(message: list[Any]) -> str | None:
    """The request an "add" or "embed" message names, if it is well formed enough to tell."""
    if len(message) > 1 and message[0] in ("add", "embed") and isinstance(message[1], str):
        return message[1]
    return None


class CoreLoop:
    def __init__(self, config: EngineConfig, input_addr: str, output_addr: str) -> None:
        self.context = zmq.Context()
        self.inbox = self.context.socket(zmq.PULL)
        self.inbox.connect(input_addr)
        self.outbox = self.context.socket(zmq.PUSH)
        self.outbox.connect(output_addr)
        self.parent_pid = os.getppid()
        try:
            from pagoda.engine.core.engine_core import EngineCore

            self.core = EngineCore(config)
        except Exception as exc:
            logger.error("engine core failed to start: %s", traceback.format_exc())
            # A ValueError is the user's input (a malformed model file, a bad setting), anything else a fault.
            kind = "invalid" if isinstance(exc, ValueError) else "internal"
            self.outbox.send(pack(["failed", kind, f"{type(exc).__name__}: {exc}"]))
            raise
        info = self.core.info
        self.outbox.send(
            pack(
                [
                    "ready",
                    {
                        "model_name": info.name,
                        "max_model_len": info.max_model_len,
                        "vocab_size": info.vocab_size,
                        "hidden_size": info.hidden_size,
                        "num_blocks": info.num_blocks,
                        "eos_token_ids": sorted(info.eos_token_ids),
                        "tokenizer": info.tokenizer.to_wire(),
                        "encoder": None if info.encoder is None else dataclasses.asdict(info.encoder),
                        "dtype": info.dtype,
                        "pid": os.getpid(),
                    },
                ]
            )
        )
        self.running = True

    def serve(self) -> None:
        while self.running:
            busy = self.core.has_unfinished_requests()
            if self.inbox.poll(0 if busy else IDLE_POLL_MS):
                self._drain_inbox()
                if not self.core.has_unfinished_requests():
                    self._send_outputs([])  # e.g. after an abort: report the freed blocks
            if os.getppid() != self.parent_pid:
                logger.warning("front end exited; engine core stops")
                return
            if self.running and self.core.embedding_jobs:
                self._embedding_chunk()
            if self.running and self.core.has_sequences():
                self._step()

    def _step(self) -> None:
        try:
            outputs = self.core.step()
        except Exception as exc:  # the step's own model failures are handled inside; this is the scheduler
            logger.error("engine step failed: %s", traceback.format_exc())
            # Whatever the scheduler's state, every sequence ends with the error and its blocks are freed.
            # Should that fail too, the process exits and the front end restarts it.
            outputs = self.core.fail_all_sequences(f"{type(exc).__name__}: {exc}")
        for rid, reason in self.core.take_rejected():  # e.g. a grammar that did not compile: a 400
            self.outbox.send(pack(["rejected", rid, "invalid", reason]))
        self._send_outputs(outputs)

    def _embedding_chunk(self) -> None:
        job = self.core.embedding_chunk()
        if job is None:
            return
        if job.error is None:
            self.outbox.send(pack(["embedded", job.job_id, job.vectors]))
        else:
            kind = "queue_full" if isinstance(job.error, MemoryError) else "internal"
            self.outbox.send(pack(["rejected", job.job_id, kind, str(job.error)]))

    def _drain_inbox(self) -> None:
        while self.running:
            try:
                frame = self.inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._receive(frame)

    def _receive(self, frame: bytes) -> None:
        message: list[Any] = []
        try:
            message = unpack(frame)
            self._handle(message)
        except Exception as exc:  # one bad message fails only the request it names
            logger.error("engine message failed: %s", traceback.format_exc())
            rid = _request_id_of(message)
            if rid is not None:
                self.outbox.send(pack(["rejected", rid, "internal", f"{type(exc).__name__}: {exc}"]))
                if message[0] == "add":
                    self.core.abort_request([rid], report=False)

    def _handle(self, message: list[Any]) -> None:
        kind = message[0]
        if kind == "add":
            _, rid, ids, params, priority, salt, arrival = message
            try:
                self.core.add_request(rid, ids, params_from_wire(params), priority, salt, arrival)
            except QueueFullError as exc:
                self.outbox.send(pack(["rejected", rid, "queue_full", str(exc)]))
            except (ValueError, TypeError) as exc:
                self.outbox.send(pack(["rejected", rid, "invalid", str(exc)]))
        elif kind == "embed":
            _, rid, inputs = message
            try:
                self.core.add_embedding(rid, inputs)
            except (ValueError, TypeError) as exc:
                self.outbox.send(pack(["rejected", rid, "invalid", str(exc)]))
        elif kind == "abort":
            self.core.abort_request(list(message[1]), report=False)
        elif kind == "finish":
            self.core.finish_sequences(list(message[1]))
        elif kind == "shutdown":
            self.running = False
        else:
            logger.error("unknown message %r", kind)

    def _send_outputs(self, outputs: list[Any]) -> None:
        stats = dataclasses.asdict(self.core.snapshot_stats())
        self.outbox.send(pack(["outputs", [o.to_wire() for o in outputs], stats]))

    def close(self) -> None:
        self.inbox.close(linger=0)
        self.outbox.close(linger=1000)
        self.context.term()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pagoda engine core process (started by the server)")
    parser.add_argument("--config-json", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine-core %(levelname)s %(message)s")
    # Ctrl-C reaches the whole process group; the server drains in-flight requests and then sends
    # "shutdown", so the core must not die on the signal itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config = EngineConfig.from_kwargs(**json.loads(args.config_json))
    try:
        loop = CoreLoop(config, args.input, args.output)
    except Exception:
        return 1
    try:
        loop.serve()
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
