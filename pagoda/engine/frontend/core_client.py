"""The server side of the engine: starts the core process, talks to it over ZeroMQ, and does the text work.

One asyncio task reads the core's outputs, runs them through the OutputProcessor
(detokenizing, stop strings, n > 1 fan-in) and hands each RequestOutput to the
queue of the HTTP handler that waits for it. A watchdog notices when the core
process dies: every waiting handler then gets ``EngineDeadError`` at once instead
of hanging, and the core is started again, with backoff, up to
``max_engine_restarts`` times within ``RESTART_WINDOW_S``; after that the client
gives up (``dead_reason``) and the server exits non-zero for its supervisor.
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

from pagoda.api.messages import CoreOutput, CoreStats, EngineInfo, child_ids, pack, params_to_wire, unpack
from pagoda.api.outputs import RequestOutput, RequestOutputKind
from pagoda.api.params import SamplingParams
from pagoda.config import EngineConfig
from pagoda.engine.frontend.errors import (
    EngineConfigError,
    EngineDeadError,
    EngineStartError,
    RequestRejected,
    StreamBacklogError,
)
from pagoda.engine.frontend.output_processor import OutputProcessor
from pagoda.engine.frontend.restarts import RESTART_WINDOW_S, RestartBudget
from pagoda.engine.frontend.tokenizer import Tokenizer
from pagoda.model.tokenizer_source import TokenizerSource

logger = logging.getLogger(__name__)
WATCHDOG_INTERVAL_S = 0.2
START_TIMEOUT_S = 300.0  # loading the model, on the first start and on each restart


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
        self.on_restart: Callable[[], None] | None = None
        self.on_gave_up: Callable[[str], None] | None = None
        self.stats = CoreStats()
        self.info: EngineInfo | None = None
        self.tokenizer: Tokenizer | None = None
        self.output_processor: OutputProcessor | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.dead_reason: str | None = None  # set once the client has given up on the core
        self.restarting = False
        self.restarts = RestartBudget(config.server_config.max_engine_restarts)
        self.start_error: Exception | None = None
        self.streams: dict[str, _Stream] = {}
        self._ipc_dir = tempfile.mkdtemp(prefix="pagoda-ipc-")
        self._context = zmq.asyncio.Context()
        self._generation = 0  # one pair of sockets per core process, so no frame reaches a successor
        self._to_core = self._context.socket(zmq.PUSH)
        self._from_core = self._context.socket(zmq.PULL)
        self._reader: asyncio.Task[None] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        self._closing = False
        self._embeddings: dict[str, asyncio.Future[list[list[float]]]] = {}

    # ---- life cycle --------------------------------------------------------------------------
    def spawn(self) -> None:
        """Start the core process without waiting for it (idempotent). `pagoda serve` calls this before
        importing the web stack so that both load at once; ``start`` waits for the model."""
        if self.process is not None:
            return
        to_core, from_core = (f"ipc://{self._ipc_dir}/{name}{self._generation}" for name in ("in", "out"))
        self._to_core.bind(to_core)
        self._from_core.bind(from_core)
        cmd = [sys.executable, "-m", "pagoda.engine.core.process", "--config-json",
               json.dumps(self.config.to_kwargs(include_server=False)), "--input", to_core, "--output", from_core]
        self.process = subprocess.Popen(cmd, env=dict(os.environ))

    def kill(self) -> None:
        """Last resort when the server never ran its shutdown (it failed to bind its port, say)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    async def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the core process (unless ``spawn`` did) and wait until it has loaded the model. Raises
        ``EngineConfigError`` when the core refuses the model or settings, ``EngineStartError`` otherwise."""
        self.spawn()
        try:
            await self._wait_ready(timeout_s)
        except Exception as exc:
            self.start_error = exc
            raise
        self._reader = asyncio.create_task(self._read_outputs())
        self._watchdog_task = asyncio.create_task(self._watchdog())

    async def _wait_ready(self, timeout_s: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise EngineStartError(f"the engine core exited with code {self.process.returncode} while starting")
            if time.monotonic() > deadline:
                raise EngineStartError(f"the engine core was not ready within {timeout_s:.0f} s")
            if await self._from_core.poll(100):
                message = unpack(await self._from_core.recv())
                if message[0] == "failed":
                    error = EngineConfigError if message[1] == "invalid" else EngineStartError
                    raise error(f"the engine core failed to start: {message[2]}")
                if message[0] == "ready":
                    self._on_ready(message[1])
                    return

    def _on_ready(self, info: dict[str, Any]) -> None:
        source = TokenizerSource.from_wire(info.pop("tokenizer"))
        self.info = EngineInfo.from_wire(info)
        self.tokenizer = Tokenizer(source, frozenset(self.info.eos_token_ids))
        self.output_processor = OutputProcessor(self.tokenizer)
        self.stats = CoreStats(num_blocks=self.info.num_blocks, num_free_blocks=self.info.num_blocks)

    @property
    def is_alive(self) -> bool:
        return (self.dead_reason is None and not self.restarting and self.process is not None
                and self.process.poll() is None)

    @property
    def unavailable_reason(self) -> str:
        if self.dead_reason is not None:
            return self.dead_reason
        return "the engine core is restarting" if self.restarting else "the engine core is not running"

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Ask the core to stop, wait for it, kill it if it does not; idempotent."""
        self._closing = True
        for task in (self._reader, self._watchdog_task):
            if task is not None:
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
        self._remove_ipc_files()
        Path(self._ipc_dir).rmdir() if Path(self._ipc_dir).exists() else None

    def _remove_ipc_files(self) -> None:
        for name in ("in", "out"):
            Path(self._ipc_dir, f"{name}{self._generation}").unlink(missing_ok=True)

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
        output_kind: RequestOutputKind = RequestOutputKind.DELTA,
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs until it finishes. Leaving the loop early (client gone)
        aborts the request in the core; so does falling ``max_stream_backlog`` outputs behind, which raises
        ``StreamBacklogError`` once the reader gets there."""
        if not self.is_alive:
            raise EngineDeadError(self.unavailable_reason)
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
                                      output_kind, arrival)
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
            self._deliver(self.output_processor.collect())  # its end reaches the metrics as "abort"
        if self.is_alive:
            self._send_nowait(["abort", [request_id]])

    def _send_nowait(self, message: list[Any]) -> None:
        # The asyncio socket queues the frame and completes the send from the event loop.
        self._to_core.send(pack(message))

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Embeddings of token-id rows, computed by the core (its sentence encoder, else the served model)."""
        if not self.is_alive:
            raise EngineDeadError(self.unavailable_reason)
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
        except Exception:  # a bug here must not leave handlers waiting forever: start over
            logger.exception("engine output reader failed; restarting the engine core")
            self.kill()

    async def _on_outputs(self, outputs: list[CoreOutput], stats: dict[str, Any]) -> None:
        assert self.output_processor is not None
        self.stats = CoreStats(**stats)
        if self.on_stats is not None:
            self.on_stats(self.stats)
        ended = self.output_processor.process(outputs)
        # Collected before any await: an abort in between collects too, and must not take these outputs.
        self._deliver(self.output_processor.collect())
        if ended:
            await self._to_core.send(pack(["finish", ended]))

    def _deliver(self, outputs: list[RequestOutput], rejected: str | None = None) -> None:
        backlog = self.config.server_config.max_stream_backlog
        too_slow = []
        for out in outputs:
            stream = self.streams.get(out.request_id)
            if out.finished and stream is not None:
                stream.finished = True
            if self.on_output is not None and out.request_id != rejected:
                self.on_output(out)
            if stream is None:
                continue
            if stream.queue.qsize() >= backlog and not stream.finished:
                too_slow.append(out.request_id)
            else:
                stream.queue.put_nowait(out)
        for request_id in too_slow:
            self._drop_slow_reader(request_id, backlog)

    def _drop_slow_reader(self, request_id: str, backlog: int) -> None:
        """Its unread outputs go (they are what grows); the reader finds the error next."""
        queue = self.streams[request_id].queue
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(StreamBacklogError(f"the client read its stream too slowly ({backlog} outputs unread); "
                                            "the request was aborted"))
        logger.warning("aborted %s: its client fell %d outputs behind", request_id, backlog)
        self.abort(request_id)

    def _on_rejected(self, request_id: str, kind: str, message: str) -> None:
        assert self.output_processor is not None
        future = self._embeddings.get(request_id)
        if future is not None and not future.done():
            future.set_exception(RequestRejected(kind, message))
            return
        stream = self.streams.get(request_id)
        if stream is not None:
            stream.finished = True
            stream.queue.put_nowait(RequestRejected(kind, message))  # ahead of its (unread) abort output
        self.output_processor.abort(request_id)
        self._deliver(self.output_processor.collect(), rejected=request_id)

    async def _watchdog(self) -> None:
        while self.dead_reason is None:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            if self._closing:
                return
            if self.process is not None and self.process.poll() is not None:
                await self._recover(f"the engine core process exited with code {self.process.returncode}")

    async def _recover(self, reason: str) -> None:
        """The core is gone: fail what it held at once, then start a new one with backoff, or give up."""
        logger.error("%s", reason)
        self.restarting = True
        self._fail_all(reason)
        assert self.tokenizer is not None
        self.output_processor = OutputProcessor(self.tokenizer)  # the failed requests' state goes with it
        if self._reader is not None:
            self._reader.cancel()
        restarts = self.restarts
        while True:
            recent = restarts.recent()
            if recent >= restarts.limit:
                self._give_up(f"{reason}; gave up after {recent} restarts within {RESTART_WINDOW_S:.0f} s")
                return
            await asyncio.sleep(restarts.backoff_s())
            if self._closing:
                return
            restarts.record()
            logger.warning("restarting the engine core (%d of %d within %.0f s)", recent + 1, restarts.limit,
                           RESTART_WINDOW_S)
            self._replace_sockets()
            try:
                self.spawn()
                await self._wait_ready(START_TIMEOUT_S)
            except Exception as exc:
                self.kill()
                reason = f"the engine core failed to restart: {exc}"
                logger.error("%s", reason)
                continue
            self.restarting = False
            self._reader = asyncio.create_task(self._read_outputs())
            if self.on_restart is not None:
                self.on_restart()
            logger.info("the engine core is back (pid %d)", self.process.pid if self.process else -1)
            return

    def _replace_sockets(self) -> None:
        self._to_core.close(linger=0)
        self._from_core.close(linger=0)
        self._remove_ipc_files()
        self._generation += 1
        self._to_core = self._context.socket(zmq.PUSH)
        self._from_core = self._context.socket(zmq.PULL)
        self.process = None

    def _give_up(self, reason: str) -> None:
        logger.error("%s", reason)
        self.dead_reason = reason
        self.restarting = False
        self._fail_all(reason)
        if self.on_gave_up is not None:
            self.on_gave_up(reason)

    def _fail_all(self, reason: str) -> None:
        for future in self._embeddings.values():
            if not future.done():
                future.set_exception(EngineDeadError(reason))
        for stream in self.streams.values():
            if not stream.finished:
                stream.finished = True
                stream.queue.put_nowait(EngineDeadError(reason))

