"""Bounded fault checks on a live server: an abort storm, an overload burst. (Longer runs: `pagoda bench soak`.)"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from pathlib import Path

import httpx

from tests.server.conftest import API_KEY, LiveServer, start_server

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
ABORTED = 'pagoda:request_success_total{finished_reason="abort"}'


def _metrics(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _finished_choices(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("pagoda:request_success_total{"))


def _wait_idle(url: str) -> dict[str, float]:
    for _ in range(200):
        metrics = _metrics(url)
        if metrics["pagoda:num_requests_running"] == 0 and metrics["pagoda:num_requests_waiting"] == 0:
            break
        time.sleep(0.05)
    return metrics


def test_abort_storm_leaks_nothing_and_ends_every_choice_once(server: LiveServer) -> None:
    rng = random.Random(13)
    before = _finished_choices(_metrics(server.url))
    plan = [(rng.random() < 0.5, rng.randint(1, 4), rng.randint(1, 24), rng.random() < 0.2, rng.random())
            for _ in range(200)]
    statuses: list[int] = []

    async def one(http: httpx.AsyncClient, gate: asyncio.Semaphore, stream: bool, n: int, max_tokens: int,
                  cut: bool, when: float) -> None:
        body = {"prompt": f"Story {max_tokens}:", "n": n, "max_tokens": max_tokens, "temperature": 1.0,
                "ignore_eos": True, "stream": stream}
        async with gate:
            if not stream:
                task = asyncio.ensure_future(http.post("/v1/completions", json=body))
                if cut:  # the client gives up at a random point, maybe before its first token
                    await asyncio.sleep(when * 0.3)
                    task.cancel()
                    return
                statuses.append((await task).status_code)
                return
            async with http.stream("POST", "/v1/completions", json=body) as r:
                statuses.append(r.status_code)
                lines = 0
                async for _ in r.aiter_lines():
                    lines += 1
                    if cut and lines > when * 10:
                        return  # leaving the block closes the connection mid-stream

    async def storm() -> None:
        gate = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=server.url, headers=HEADERS, timeout=120) as http:
            await asyncio.gather(*(one(http, gate, *p) for p in plan))

    asyncio.run(storm())
    assert statuses and all(s == 200 for s in statuses)
    metrics = _wait_idle(server.url)
    assert metrics["pagoda:num_requests_running"] == 0 and metrics["pagoda:num_requests_waiting"] == 0
    assert metrics["pagoda:kv_cache_usage_perc"] == 0.0  # no block leaked
    # Every choice of every request ended exactly once (cut ones as "abort").
    assert _finished_choices(metrics) - before == sum(n for _, n, *_ in plan)
    assert metrics[ABORTED] >= 1
    after = httpx.post(f"{server.url}/v1/completions", headers=HEADERS, timeout=60,
                       json={"prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert after.status_code == 200 and after.json()["choices"][0]["text"]


def test_an_overload_burst_gets_only_200_429_and_503(tmp_path: Path) -> None:
    queue = 8
    live = start_server(tmp_path, "--max-num-seqs", "4", "--max-queued-requests", str(queue))

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=live.url, timeout=120,
                                     limits=httpx.Limits(max_connections=None)) as http:
            body = {"prompt": "Go:", "max_tokens": 16, "ignore_eos": True}
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(10 * queue)))

    try:
        rss_before = _rss_kib(live)
        responses = asyncio.run(burst())
        codes = {r.status_code for r in responses}
        assert codes <= {200, 429, 503} and 200 in codes and 429 in codes
        assert all(r.headers.get("retry-after") for r in responses if r.status_code != 200)
        assert _rss_kib(live) - rss_before < 200 * 1024  # bounded: no per-request growth that stays
        assert httpx.post(f"{live.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    finally:
        live.stop()


def _rss_kib(live: LiveServer) -> int:
    for line in Path(f"/proc/{live.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_reader_too_far_behind_is_aborted_with_an_error_event(tmp_path: Path) -> None:
    """A client that stops reading a stream: once its socket buffers are full and the backlog limit is
    reached, the request is aborted (KV freed, counted as abort) and the stream ends with an error event."""
    live = start_server(tmp_path, "--max-stream-backlog", "4")
    try:
        host, port = live.url.removeprefix("http://").split(":")
        # ~50 KB of chunks per step fill the socket buffers (up to 4 MB on the sending side) within seconds.
        body = json.dumps({"messages": [{"role": "user", "content": "Count:"}], "n": 32, "max_tokens": 1000,
                           "ignore_eos": True, "stream": True, "logprobs": True, "top_logprobs": 20}).encode()
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, int(port)))
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            metrics = _metrics(live.url)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not metrics.get(ABORTED):
                time.sleep(0.2)
                metrics = _metrics(live.url)
            assert metrics.get(ABORTED) == 32  # each choice ends once, as an abort
            metrics = _wait_idle(live.url)
            assert metrics["pagoda:kv_cache_usage_perc"] == 0.0
            sock.settimeout(30)
            received = b""
            while chunk := sock.recv(1 << 16):
                received += chunk
        assert received.startswith(b"HTTP/1.1 200")
        assert b'"code": "client_too_slow"' in received and b"data: [DONE]" in received
        assert b'"finish_reason": "length"' not in received
        assert httpx.post(f"{live.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    finally:
        live.stop()
