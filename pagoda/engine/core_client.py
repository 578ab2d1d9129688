"""The server side of the engine: starts the core process, talks to it over ZeroMQ, and does the text work.

One asyncio task reads the core's outputs, runs them through the OutputProcessor
(detokenizing, stop strings, n > 1 fan-in) and hands each RequestOutput to the
queue of the HTTP handler that waits for it. A watchdog notices when the core
process dies: every waiting handler then gets ``EngineDeadError`` instead of
hanging.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from pagoda.config import EngineConfig
from pagoda.engine.core_proc import pack, params_to_wire, unpack
from pagoda.engine.messages import CoreOutput, CoreStats, child_ids
from pagoda.engine.output_processor import OutputProcessor
from pagoda.engine.request import RequestOutput, SamplingParams
from pagoda.engine.tokenizer import Tokenizer
from pagoda.model.tokenizer_source import TokenizerSource

logger = logging.getLogger(__name__)
WATCHDOG_INTERVAL_S = 0.2


class EngineDeadError(RuntimeError):
    """The engine core process is gone; no request can be served."""


class RequestRejected(ValueError):
    """The core refused a request: ``kind`` is "invalid" (bad input) or "queue_full" (retry later)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class EngineInfo:
    """What the core reports once ready."""

    model_name: str
    max_model_len: int
    vocab_size: int
    hidden_size: int
    num_blocks: int
    eos_token_ids: list[int]
    dtype: str
    pid: int


@dataclass
class _Stream:
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)
    num_sequences: int = 1
    finished: bool = False


class EngineClient:
    def __init__(self, config: EngineConfig, on_stats: Callable[[CoreStats], None] | None = None,
                 on_output: Callable[[RequestOutput], None] | None = None) -> None:
        self.config = config
        self.on_stats = on_stats
        self.on_output = on_output
        self.stats = CoreStats()
        self.info: EngineInfo | None = None
        self.tokenizer: Tokenizer | None = None
        self.output_processor: OutputProcessor | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.dead_reason: str | None = None
        self.streams: dict[str, _Stream] = {}
        self._ipc_dir = tempfile.mkdtemp(prefix="pagoda-ipc-")
        self._context = zmq.asyncio.Context()
        self._to_core = self._context.socket(zmq.PUSH)
        self._from_core = self._context.socket(zmq.PULL)
        self._tasks: list[asyncio.Task[None]] = []
        self._embeddings: dict[str, asyncio.Future[list[list[float]]]] = {}

    # ---- life cycle --------------------------------------------------------------------------
    def spawn(self) -> None:
        """Start the core process without waiting for it (idempotent). `pagoda serve` calls this before
        importing the web stack so that both load at once; ``start`` waits for the model."""
        if self.process is not None:
            return
        to_core = f"ipc://{self._ipc_dir}/in"
        from_core = f"ipc://{self._ipc_dir}/out"
        self._to_core.bind(to_core)
        self._from_core.bind(from_core)
        cmd = [sys.executable, "-m", "pagoda.engine.core_proc", "--config-json",
               json.dumps(self.config.to_kwargs(include_server=False)), "--input", to_core, "--output", from_core]
        self.process = subprocess.Popen(cmd, env=dict(os.environ))

    def kill(self) -> None:
        """Last resort when the server never ran its shutdown (it failed to bind its port, say)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    async def start(self, timeout_s: float = 300.0) -> None:
        """Start the core process (unless ``spawn`` did) and wait until it has loaded the model."""
        self.spawn()
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the engine core exited with code {self.process.returncode} while starting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the engine core was not ready within {timeout_s:.0f} s")
            if await self._from_core.poll(100):
                message = unpack(await self._from_core.recv())
                if message[0] == "failed":
                    raise RuntimeError(f"the engine core failed to start: {message[1]}")
                if message[0] == "ready":
                    self._on_ready(message[1])
                    break
        self._tasks = [asyncio.create_task(self._read_outputs()), asyncio.create_task(self._watchdog())]

    def _on_ready(self, info: dict[str, Any]) -> None:
        source = TokenizerSource.from_wire(info.pop("tokenizer"))
        self.info = EngineInfo(**info)
        self.tokenizer = Tokenizer(source)
        self.tokenizer.eos_token_ids = frozenset(self.info.eos_token_ids)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.stats.num_blocks = self.info.num_blocks
        self.stats.num_free_blocks = self.info.num_blocks

    @property
    def is_alive(self) -> bool:
        return self.dead_reason is None and self.process is not None and self.process.poll() is None

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Ask the core to stop, wait for it, kill it if it does not; idempotent."""
        for task in self._tasks:
            task.cancel()
        if self.process is not None and self.process.poll() is None:
            try:
                await self._to_core.send(pack(["shutdown"]))
            except zmq.ZMQError:
                pass
            try:
                await asyncio.wait_for(asyncio.to_thread(self.process.wait), timeout_s)
            except asyncio.TimeoutError:
                self.process.kill()
                await asyncio.to_thread(self.process.wait)
        self._fail_all("the server is shutting down")
        self._to_core.close(linger=0)
        self._from_core.close(linger=0)
        self._context.term()
        for name in ("in", "out"):
            Path(self._ipc_dir, name).unlink(missing_ok=True)
        Path(self._ipc_dir).rmdir() if Path(self._ipc_dir).exists() else None

    # ---- requests ----------------------------------------------------------------------------
    @property
    def num_unfinished(self) -> int:
        """Sequences this server has sent to the core that have not ended."""
        return sum(s.num_sequences for s in self.streams.values() if not s.finished)

    async def generate(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs until it finishes. Leaving the loop early (client gone)
        aborts the request in the core."""
        if not self.is_alive:
            raise EngineDeadError(self.dead_reason or "the engine core is not running")
        assert self.output_processor is not None
        if request_id in self.streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        arrival = time.monotonic()
        stream = _Stream(num_sequences=params.n)
        # Everything that registers the request sits inside the try whose finally removes it: a failure
        # before the core has it (a value the codec refuses, a cancelled send) must not leak queue room.
        try:
            try:
                frame = pack(["add", request_id, prompt_token_ids, params_to_wire(params), priority, cache_salt,
                              arrival])
            except (OverflowError, TypeError) as exc:  # e.g. an integer wider than 64 bits
                raise RequestRejected("invalid", f"the request holds a value the engine cannot take: {exc}") from None
            self.streams[request_id] = stream
            self.output_processor.add(request_id, prompt, prompt_token_ids, params, child_ids(request_id, params.n),
                                      arrival)
            await self._to_core.send(frame)
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if self.streams.get(request_id) is stream:
                if not stream.finished:
                    self.abort(request_id)
                del self.streams[request_id]

    def abort(self, request_id: str) -> None:
        """End a request now (no await: this runs while the handler's task is being cancelled)."""
        stream = self.streams.get(request_id)
        if stream is not None:
            stream.finished = True
        if self.output_processor is not None:
            self.output_processor.abort(request_id)
            self.output_processor.collect()  # drop it
        if self.is_alive:
            self._send_nowait(["abort", [request_id]])

    def _send_nowait(self, message: list[Any]) -> None:
        # The asyncio socket queues the frame and completes the send from the event loop.
        self._to_core.send(pack(message))

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Embeddings from the served model (mean-pooled final hidden states), computed by the core."""
        if not self.is_alive:
            raise EngineDeadError(self.dead_reason or "the engine core is not running")
        request_id = f"embd-{uuid.uuid4().hex}"
        future: asyncio.Future[list[list[float]]] = asyncio.get_running_loop().create_future()
        self._embeddings[request_id] = future
        try:
            await self._to_core.send(pack(["embed", request_id, inputs]))
            return await future
        finally:
            self._embeddings.pop(request_id, None)

    # ---- the output side ---------------------------------------------------------------------
    async def _read_outputs(self) -> None:
        assert self.output_processor is not None
        try:
            while True:
                message = unpack(await self._from_core.recv())
                kind = message[0]
                if kind == "outputs":
                    await self._on_outputs([CoreOutput.from_wire(o) for o in message[1]], message[2])
                elif kind == "rejected":
                    self._on_rejected(message[1], message[2], message[3])
                elif kind == "embedded":
                    future = self._embeddings.get(message[1])
                    if future is not None and not future.done():
                        future.set_result(message[2])
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not leave handlers waiting forever
            logger.exception("engine output reader failed")
            self._mark_dead("the engine output reader failed")

    async def _on_outputs(self, outputs: list[CoreOutput], stats: dict[str, Any]) -> None:
        assert self.output_processor is not None
        self.stats = CoreStats(**stats)
        if self.on_stats is not None:
            self.on_stats(self.stats)
        ended = self.output_processor.process(outputs)
        if ended:
            await self._to_core.send(pack(["finish", ended]))
        for out in self.output_processor.collect():
            stream = self.streams.get(out.request_id)
            if out.finished and stream is not None:
                stream.finished = True
            if self.on_output is not None:
                self.on_output(out)
            if stream is not None:
                stream.queue.put_nowait(out)

    def _on_rejected(self, request_id: str, kind: str, message: str) -> None:
        assert self.output_processor is not None
        future = self._embeddings.get(request_id)
        if future is not None and not future.done():
            future.set_exception(RequestRejected(kind, message))
            return
        self.output_processor.abort(request_id)
        self.output_processor.collect()
        stream = self.streams.get(request_id)
        if stream is not None:
            stream.finished = True
            stream.queue.put_nowait(RequestRejected(kind, message))

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            if self.process is not None and self.process.poll() is not None:
                self._mark_dead(f"the engine core process exited with code {self.process.returncode}")
                return

    def _mark_dead(self, reason: str) -> None:
        if self.dead_reason is None:
            logger.error("%s", reason)
            self.dead_reason = reason
        self._fail_all(reason)

    def _fail_all(self, reason: str) -> None:
        for future in self._embeddings.values():
            if not future.done():
                future.set_exception(EngineDeadError(reason))
        for stream in self.streams.values():
            if not stream.finished:
                stream.finished = True
                stream.queue.put_nowait(EngineDeadError(reason))

