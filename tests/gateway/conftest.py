"""Gateway and responder processes for the live and fault tests."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.server.conftest import free_port

ADMIN = "admin-key-1"


def spawn(log: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, *args], stdout=log.open("wb"), stderr=subprocess.STDOUT)


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url, timeout=1).status_code in (200, 503):
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"{url} not ready: {log.read_text()[-3000:]}")


def responder(tmp: Path, name: str, *args: str) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    log = tmp / f"{name}.log"
    process = spawn(log, "-m", "pagoda.bench.responder", "--port", str(port), "--name", name, *args)
    url = f"http://127.0.0.1:{port}"
    wait_ready(f"{url}/health", process, log)
    return url, process


class Gateway:
    def __init__(self, tmp: Path, config: dict, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.path = tmp / f"gateway-{self.port}.yaml"
        self.write_config(config)
        self.log = tmp / f"gateway-{self.port}.log"
        self.process = subprocess.Popen([sys.executable, "-m", "pagoda.cli", "gateway", "--config", str(self.path), *args],
                                        stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
                                        env=None if env is None else {**os.environ, **env})
        self.url = f"http://127.0.0.1:{self.port}"
        wait_ready(f"{self.url}/health", self.process, self.log)

    def write_config(self, config: dict) -> None:
        self.path.write_text(json.dumps({"port": self.port, "admin_key": ADMIN, **config}))

    def admin(self, method: str, path: str, **kw) -> httpx.Response:
        return httpx.request(method, f"{self.url}{path}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10, **kw)

    def upstreams(self) -> dict[str, dict]:
        """The gateway's view of each upstream, by URL (the first group's entry where several share one)."""
        rows = self.admin("GET", "/admin/upstreams").json()["upstreams"]
        return {row["url"]: row for row in reversed(rows)}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)


@dataclass
class Result:
    status: int  # 0: the request raised
    latency_s: float
    detail: str


class Load:
    """``concurrency`` clients sending ``body`` back to back from a thread until ``stop``: a bounded load to
    run faults under."""

    def __init__(self, url: str, body: dict, concurrency: int, timeout_s: float = 60) -> None:
        self.url, self.body, self.concurrency, self.timeout_s = url, body, concurrency, timeout_s
        self.results: list[Result] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> list[Result]:
        self._stop.set()
        self._thread.join(self.timeout_s + 10)
        assert not self._thread.is_alive(), "the load's clients hung"
        return self.results

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=self.timeout_s, limits=httpx.Limits(max_connections=self.concurrency)) as client:
            await asyncio.gather(*(self._client(client) for _ in range(self.concurrency)))

    async def _client(self, client: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                answer = await client.post(f"{self.url}/v1/completions", json=self.body)
                result = Result(answer.status_code, time.monotonic() - started, answer.text[:300])
            except httpx.HTTPError as exc:
                result = Result(0, time.monotonic() - started, repr(exc))
            self.results.append(result)


def failures(results: list[Result]) -> list[Result]:
    return [r for r in results if r.status != 200]
