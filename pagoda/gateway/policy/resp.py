"""A pipelined Redis connection for the gateway's hot path: one admission script call per request.

redis-py's asyncio client spends ~170 µs of Python per command here (a PING), more than the limit check
costs in Redis; this one writes each command as RESP on one shared connection and matches replies to callers
in order (Redis answers a connection's commands in the order they came), parsing with hiredis. Everything off
the hot path (keys, usage) stays on redis-py.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any
from urllib.parse import urlparse

import hiredis


class RespError(Exception):
    """Redis answered an error (the message is Redis's)."""


def encode(args: tuple[Any, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RespConnection:
    def __init__(self, url: str, timeout_s: float) -> None:
        parsed = urlparse(url)
        self.scheme = parsed.scheme
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 6379
        self.path = parsed.path
        self.db = int(parsed.path.lstrip("/") or 0) if parsed.scheme in ("redis", "rediss") else 0
        self.password = parsed.password
        self.timeout_s = timeout_s
        self.writer: asyncio.StreamWriter | None = None
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self._connecting: asyncio.Lock | None = None
        self._reader_task: asyncio.Task[None] | None = None

    async def call(self, *args: Any) -> Any:
        """Send one command and wait for its reply; OSError / asyncio.TimeoutError when Redis is away."""
        if self.writer is None:
            await self._connect()
        assert self.writer is not None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.waiting.append(future)
        self.writer.write(encode(args))
        timer = loop.call_later(self.timeout_s, _expire, future)
        try:
            reply = await future
        finally:
            timer.cancel()
        if isinstance(reply, hiredis.ReplyError):
            raise RespError(str(reply))
        return reply

    async def _connect(self) -> None:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self.writer is not None:
                return
            if self.scheme == "unix":
                opening = asyncio.open_unix_connection(self.path)
            else:
                opening = asyncio.open_connection(self.host, self.port,
                                                  ssl=ssl.create_default_context() if self.scheme == "rediss" else None)
            reader, writer = await asyncio.wait_for(opening, self.timeout_s)
            self.writer = writer
            self._reader_task = asyncio.ensure_future(self._read(reader, writer))
            if self.password:
                await self.call("AUTH", self.password)
            if self.db:
                await self.call("SELECT", self.db)

    async def _read(self, stream: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = hiredis.Reader()
        try:
            while True:
                data = await stream.read(65536)
                if not data:
                    raise ConnectionError("redis closed the connection")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    future = self.waiting.popleft()
                    if not future.done():  # a caller that timed out left its place in the line
                        future.set_result(reply)
        except (OSError, ConnectionError, IndexError, hiredis.ProtocolError) as exc:
            self._drop(writer, exc)
        except asyncio.CancelledError:
            self._drop(writer, ConnectionError("closed"))
            raise

    def _drop(self, writer: asyncio.StreamWriter, exc: BaseException) -> None:
        """The connection is gone: fail whoever waits on it; the next call connects again."""
        if self.writer is writer:
            self.writer = None
        writer.close()
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(ConnectionError(str(exc)))

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            try:
                await self._reader_task
            except asyncio.CancelledError:
                pass
            self._reader_task = None


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(asyncio.TimeoutError())
