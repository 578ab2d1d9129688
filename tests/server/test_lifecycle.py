"""Overload, draining shutdown and a dead engine, each on its own live server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import start_server

STREAM = {"prompt": "Count slowly:", "max_tokens": 64, "temperature": 0, "ignore_eos": True, "stream": True}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


def test_full_queue_answers_429_with_retry_after(tmp_path: Path) -> None:
    live = start_server(tmp_path, "--max-num-seqs", "1", "--max-queued-requests", "1")

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as http:
            async with http.stream("POST", "/v1/completions", json={**STREAM, "max_tokens": 200}) as first:
                lines = first.aiter_lines()
                await lines.__anext__()  # running now
                queued = asyncio.ensure_future(http.post("/v1/completions", json={**STREAM, "stream": False}))
                for _ in range(100):  # until the second one waits in the engine's queue
                    await asyncio.sleep(0.05)
                    if 'pagoda:num_requests_waiting 1.0' in (await http.get("/metrics")).text:
                        break
                third = await http.post("/v1/completions", json={**STREAM, "stream": False})
                async for _ in lines:
                    pass
            return third, await queued

    try:
        third, queued = asyncio.run(scenario())
        assert third.status_code == 429
        assert third.headers["retry-after"] == "1"
        assert third.json()["error"]["code"] == "queue_full"
        assert queued.status_code == 200  # the queued one is served once the first is done
        assert httpx.get(f"{live.url}/health").status_code == 200
    finally:
        live.stop()


def test_sigterm_drains_in_flight_requests_and_exits(tmp_path: Path) -> None:
    live = start_server(tmp_path, "--shutdown-timeout", "60")
    engine = live.engine_pid()
    assert engine is not None
    text, finish = "", None
    with httpx.stream("POST", f"{live.url}/v1/completions", json=STREAM, timeout=60) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
                break
        live.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10  # the signal is handled asynchronously: wait until it took effect
        while httpx.get(f"{live.url}/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        refused = httpx.post(f"{live.url}/v1/completions", json={**STREAM, "stream": False}, timeout=10)
        assert refused.status_code == 503
        assert httpx.get(f"{live.url}/health").json()["status"] == "draining"
        for line in lines:
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                finish = choice["finish_reason"] or finish
    assert finish == "length" and text
    assert live.process.wait(30) == 0
    deadline = time.monotonic() + 10
    while _pid_alive(engine) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _pid_alive(engine)


def test_dead_engine_makes_health_and_requests_503(tmp_path: Path) -> None:
    live = start_server(tmp_path)
    try:
        engine = live.engine_pid()
        assert engine is not None
        os.kill(engine, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while httpx.get(f"{live.url}/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        health = httpx.get(f"{live.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "engine_dead"
        r = httpx.post(f"{live.url}/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, timeout=10)
        assert r.status_code == 503 and "engine" in r.json()["error"]["message"]
    finally:
        live.stop()
    assert live.process.returncode is not None


@pytest.mark.parametrize("flag", ["--api-key-file"])
def test_keys_file(tmp_path: Path, flag: str) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nalpha\nbeta\n")
    live = start_server(tmp_path, flag, str(keys))
    try:
        body = {"prompt": "x", "max_tokens": 1}
        for key, status in [("alpha", 200), ("beta", 200), ("gamma", 401)]:
            r = httpx.post(f"{live.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == status
    finally:
        live.stop()
