"""Overload, draining shutdown and a dead engine, each on its own live server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import free_port, start_server

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


def _wait_for_health(url: str, wanted: str, timeout_s: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            body = httpx.get(f"{url}/health", timeout=5).json()
        except httpx.TransportError:
            body = {"status": "unreachable"}
        if body["status"] == wanted or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def test_killed_engine_fails_in_flight_requests_at_once_then_comes_back(tmp_path: Path) -> None:
    live = start_server(tmp_path)
    try:
        engine = live.engine_pid()
        assert engine is not None
        streaming = asyncio.Event()

        async def one(http: httpx.AsyncClient, stream: bool) -> str:
            body = {"prompt": "Count slowly:", "max_tokens": 2000, "ignore_eos": True, "stream": stream}
            if not stream:
                r = await http.post("/v1/completions", json=body)
                return f"http {r.status_code}"
            async with http.stream("POST", "/v1/completions", json=body) as r:
                last = ""
                async for line in r.aiter_lines():
                    streaming.set()
                    if line.startswith("data: {"):
                        last = line
                return "error event" if '"error"' in last else f"ended: {last[:80]}"

        async def scenario() -> list[str]:
            async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
                tasks = [asyncio.ensure_future(one(http, stream=i % 2 == 0)) for i in range(6)]
                await asyncio.wait_for(streaming.wait(), 30)
                await asyncio.sleep(0.3)
                os.kill(engine, signal.SIGKILL)
                # Every in-flight request ends promptly, none hangs until the client's timeout.
                return await asyncio.wait_for(asyncio.gather(*tasks), 20)

        results = asyncio.run(scenario())
        assert results == ["error event", "http 503"] * 3
        assert _wait_for_health(live.url, "ok", 120)["status"] == "ok"
        assert live.engine_pid() not in (None, engine)
        r = httpx.post(f"{live.url}/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        assert "pagoda:engine_restarts_total 1.0" in httpx.get(f"{live.url}/metrics").text
    finally:
        live.stop()
    assert live.process.returncode == 0


def test_engine_that_keeps_dying_makes_the_server_exit_non_zero(tmp_path: Path) -> None:
    live = start_server(tmp_path, "--max-engine-restarts", "1")
    try:
        first = live.engine_pid()
        assert first is not None
        os.kill(first, signal.SIGKILL)
        restarting = _wait_for_health(live.url, "engine_restarting", 10)
        assert restarting["status"] == "engine_restarting"
        r = httpx.post(f"{live.url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] and "restarting" in r.json()["error"]["message"]
        assert _wait_for_health(live.url, "ok", 120)["status"] == "ok"
        second = live.engine_pid()
        assert second not in (None, first)
        os.kill(second, signal.SIGKILL)  # the second death within the window: give up
        assert live.process.wait(30) == 1
    finally:
        live.stop()


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


def test_a_malformed_model_file_exits_2_naming_it(tmp_path: Path, bundled_gguf: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(bundled_gguf.read_bytes()[:5000])
    done = subprocess.run([sys.executable, "-m", "pagoda.cli", "serve", str(truncated), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "error: " in done.stderr and "truncated.gguf" in done.stderr and "GGUFError" in done.stderr
