"""The gateway as a process in front of real upstreams: a `pagoda serve` replica and minimal responders
(a fixed error status, a slow stream) for the faults. Loopback only, bounded."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.gateway.conftest import Gateway, responder, spawn, wait_ready
from tests.server.conftest import LiveServer, free_port, start_server

@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, LiveServer, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("gateway")
    replica = start_server(tmp, "--max-model-len", "1024", "--kv-cache-gib", "0.25")
    responders = {name: responder(tmp, name, *args) for name, args in {
        "ok": (), "busy": ("--status", "503"), "broken": ("--status", "500"),
        "slow": ("--stream-chunks", "5", "--chunk-delay-ms", "300")}.items()}
    urls = {name: url for name, (url, _) in responders.items()}
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = Gateway(tmp, {
        "health": {"interval_s": 0.5, "timeout_s": 1},
        "retries": {"max_attempts": 3},
        "models": [
            {"name": "smol", "aliases": ["gpt-4o-mini"], "policy": "prefix",
             "upstreams": [{"url": replica.url, "model": "smollm2-135m"}]},
            {"name": "retry", "policy": "round_robin",
             "upstreams": [{"url": urls["busy"]}, {"url": urls["ok"]}]},
            {"name": "busy", "upstreams": [{"url": urls["busy"]}]},
            {"name": "broken", "upstreams": [{"url": urls["broken"]}, {"url": urls["ok"]}], "policy": "round_robin"},
            {"name": "slow", "upstreams": [{"url": urls["slow"]}]},
            {"name": "gone", "fallbacks": ["retry"], "upstreams": [{"url": dead}]},
        ]})
    yield gateway, replica, urls
    gateway.stop()
    replica.stop()
    for _, process in responders.values():
        process.terminate()
        process.wait(10)


def test_openai_client_through_the_gateway(live) -> None:
    gateway, replica, _ = live
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    out = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=5, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=5, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content
    ids = {m.id for m in client.models.list().data}
    assert {"smol", "gpt-4o-mini", "retry", "gone"} <= ids
    emb = client.embeddings.create(model="smol", input=["a cat"])
    assert len(emb.data[0].embedding) == 384
    answer = httpx.post(f"{gateway.url}/v1/completions", headers={"X-Request-Id": "trace-42"},
                        json={"model": "smol", "prompt": "Once", "max_tokens": 2})
    assert answer.status_code == 200 and answer.headers["x-request-id"] == "trace-42"


def test_sse_is_passed_through_as_it_comes(live) -> None:
    gateway, _, _ = live
    started = time.monotonic()
    arrivals = []
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", timeout=30,
                      json={"model": "slow", "messages": [{"role": "user", "content": "x"}], "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - started)
    # Five events 300 ms apart upstream: the first must reach the client long before the last is sent.
    assert len(arrivals) == 6 and arrivals[-1] - arrivals[0] > 0.9


@pytest.mark.parametrize(("kwargs", "status", "named"), [
    ({"content": b"{not json"}, 400, "not valid JSON"),
    ({"content": b"[1, 2]"}, 400, "JSON object"),
    ({"json": {"messages": []}}, 400, "model"),
    ({"json": {"model": "nope", "messages": []}}, 404, "smol"),
    ({"content": b"{" + b" " * (9 * 2**20) + b"}"}, 413, "bytes"),
])
def test_bad_requests_get_openai_errors(live, kwargs, status, named) -> None:
    gateway, _, _ = live
    r = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=30, headers={"Content-Type": "application/json"},
                   **kwargs)
    assert r.status_code == status and named in r.json()["error"]["message"]
    assert httpx.get(f"{gateway.url}/v1/unknown").json()["error"]["type"] == "not_found_error"


def test_retries_failover_fallbacks_and_passthrough(live) -> None:
    gateway, _, _ = live
    body = {"messages": [{"role": "user", "content": "x"}]}
    # A 503 before any byte: retried on the next upstream, every time.
    for _ in range(6):
        r = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "retry", **body})
        assert r.status_code == 200 and r.headers["x-responder"] == "ok"
    # Only a 503 upstream: its answer is passed through.
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "busy", **body})
    assert r.status_code == 503 and r.json()["error"]["message"] == "responder answers 503"
    # A 500 is not retried (the upstream may have acted on it); it comes back as it was.
    statuses = {httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "broken", **body}).status_code
                for _ in range(4)}
    assert 500 in statuses
    # A dead upstream: the fallback model answers.
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "gone", **body})
    assert r.status_code == 200 and r.headers["x-responder"] == "ok"
    page = httpx.get(f"{gateway.url}/metrics").text
    assert "pagoda_gateway_retries_total" in page and "pagoda_gateway_upstream_breaker_state" in page


def test_client_disconnect_aborts_the_replica_request(live) -> None:
    gateway, replica, _ = live
    body = {"model": "smol", "prompt": "Count:", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        running = [line for line in httpx.get(f"{replica.url}/metrics").text.splitlines()
                   if line.startswith("pagoda:num_requests_running")]
        if running and float(running[0].split()[-1]) == 0:
            return
        time.sleep(0.2)
    raise AssertionError("the replica kept generating for a client that left")


def test_admin_routes_reload_drain_and_roll_back(live) -> None:
    gateway, _, urls = live
    assert httpx.post(f"{gateway.url}/admin/reload").status_code == 401
    config = gateway.admin("GET", "/admin/config").json()
    version = config["version"]
    added = gateway.admin("POST", "/admin/upstreams", json={"model": "busy", "url": urls["ok"]})
    assert added.status_code == 200 and added.json()["version"] == version + 1
    body = {"model": "busy", "messages": [{"role": "user", "content": "x"}]}
    assert httpx.post(f"{gateway.url}/v1/chat/completions", json=body).status_code == 200
    drained = gateway.admin("POST", "/admin/drain", json={"url": urls["ok"]})
    assert drained.status_code == 200
    assert httpx.post(f"{gateway.url}/v1/chat/completions", json=body).status_code == 503
    assert gateway.admin("POST", "/admin/drain", json={"url": urls["ok"], "drain": False}).status_code == 200
    assert gateway.admin("POST", "/admin/rollback").json()["version"] == version
    assert httpx.post(f"{gateway.url}/v1/chat/completions", json=body).status_code == 503
    bad = gateway.admin("POST", "/admin/reload", content=json.dumps({"models": [{"name": "x"}]}))
    assert bad.status_code == 400 and "upstreams" in bad.json()["error"]["message"]
    assert gateway.admin("GET", "/admin/config").json()["version"] == version  # the bad config never ran


def test_pagoda_up_runs_replicas_behind_a_gateway_and_cleans_up(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "up.log"
    process = spawn(log, "-m", "pagoda.cli", "up", "--replicas", "2", "--port", str(port), "--kv-cache-gib", "0.1",
                     "--", "--max-model-len", "512")
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", process, log, timeout_s=240)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "smollm2-135m", "prompt": "Hello", "max_tokens": 2})
        assert r.status_code == 200, r.text
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        assert len(children) == 2
    finally:
        process.terminate()
        process.wait(60)
    assert all(not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
               for pid in children)
