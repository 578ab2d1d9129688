"""Hostile and careless input against a live `pagoda serve`: bounds, tenants, keys, exposure, disconnects."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import API_KEY, LiveServer, free_port, start_server

KEY_A, KEY_B = "tenant-a-key", "tenant-b-key"
ORIGIN = "http://app.example"
QUEUE_LIMIT = 64
BODY_LIMIT = 65536
MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Two tenants' keys (and an indented comment) in a key file, a small queue, body limit and context,
    one batch slot so a second request waits, and one allowed CORS origin."""
    tmp = tmp_path_factory.mktemp("tight")
    keys = tmp / "keys.txt"
    keys.write_text(f"# tenants\n{KEY_A}\n   # an indented comment\n  {KEY_B}  \n")
    live = start_server(tmp, "--api-key-file", str(keys), "--max-queued-requests", str(QUEUE_LIMIT),
                        "--max-request-body-bytes", str(BODY_LIMIT), "--max-model-len", str(MAX_MODEL_LEN),
                        "--max-num-seqs", "1", "--allowed-origins", ORIGIN, "--kv-cache-gib", "0.25")
    yield live
    live.stop()


def _post(server: LiveServer, path: str, body: dict, key: str = API_KEY, headers: dict | None = None
          ) -> httpx.Response:
    # json.dumps escapes to ASCII, so lone surrogates travel as "\ud800" the way a JSON client sends them.
    return httpx.post(f"{server.url}{path}", content=json.dumps(body), timeout=60,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json", **(headers or {})})


def _chat(content: str = "hi", **extra: object) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def _metric(server: LiveServer, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def _assert_400(r: httpx.Response, param: str) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and param in (err["param"] or ""), err
    return err


HUGE = 10**30


@pytest.mark.parametrize(("extra", "param"), [
    ({"top_k": HUGE, "n": 60}, "top_k"),
    ({"stop_token_ids": [HUGE]}, "stop_token_ids"),
    ({"min_tokens": HUGE, "max_tokens": None}, "min_tokens"),
    ({"max_tokens": HUGE}, "max_tokens"),
    ({"max_completion_tokens": 2**40}, "max_completion_tokens"),
    ({"model": "m" * 10_000}, "model"),
    ({"user": "u" * 10_000}, "user"),
    ({"cache_salt": "s" * 10_000}, "cache_salt"),
])
def test_huge_integers_and_strings_are_400_and_leak_nothing(server: LiveServer, extra: dict, param: str) -> None:
    _assert_400(_post(server, "/v1/chat/completions", _chat(**extra)), param)
    assert _post(server, "/v1/chat/completions", _chat()).status_code == 200


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": [HUGE], "max_tokens": 1}, "prompt"),
    ("/detokenize", {"tokens": [HUGE]}, "tokens"),
    ("/v1/embeddings", {"input": "x", "dimensions": HUGE}, "dimensions"),
])
def test_huge_integers_on_other_routes(server: LiveServer, path: str, body: dict, param: str) -> None:
    _assert_400(_post(server, path, body), param)


def test_every_bad_logit_bias_key_is_named(server: LiveServer) -> None:
    bias = {"abc": 1, "-5": 1, "99999999999999999999": 1, "7": 1}
    err = _assert_400(_post(server, "/v1/chat/completions", _chat(logit_bias=bias)), "logit_bias")
    for key in ("abc", "-5", "99999999999999999999"):
        assert repr(key) in err["message"], err["message"]
    assert "'7'" not in err["message"]
    err = _assert_400(_post(server, "/v1/chat/completions", _chat(logit_bias={"99999999": 1})), "logit_bias")
    assert "vocabulary" in err["message"]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", _chat("a\ud800b"), "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}],
                              "max_tokens": 1}, "messages"),
    ("/v1/chat/completions", _chat(stop=["\ud800"]), "stop"),
    ("/v1/completions", {"prompt": "a\ud800b", "max_tokens": 1}, "prompt"),
    ("/tokenize", {"prompt": "a\ud800b"}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages"),
    ("/v1/embeddings", {"input": "a\ud800b"}, "input"),
])
def test_lone_surrogates_are_400(server: LiveServer, path: str, body: dict, param: str) -> None:
    err = _assert_400(_post(server, path, body), param)
    assert "surrogate" in err["message"]


def test_stream_options_require_stream(server: LiveServer) -> None:
    body = _chat(stream_options={"include_usage": True})
    _assert_400(_post(server, "/v1/chat/completions", body), "stream_options")
    _assert_400(_post(server, "/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}),
                "stream_options")


def test_a_request_that_can_never_fit_the_queue_is_400_not_429(tight: LiveServer) -> None:
    body = {"prompt": ["one", "two"], "n": QUEUE_LIMIT // 2 + 1, "max_tokens": 1}
    err = _assert_400(_post(tight, "/v1/completions", body, KEY_A), "n")
    assert f"max_queued_requests={QUEUE_LIMIT}" in err["message"]


def test_body_and_prompt_size_caps(tight: LiveServer) -> None:
    r = _post(tight, "/v1/completions", {"prompt": "x" * (BODY_LIMIT + 10), "max_tokens": 1}, KEY_A)
    assert r.status_code == 413 and str(BODY_LIMIT) in r.json()["error"]["message"]
    # Chunked (no Content-Length): counted while it arrives.
    chunks = iter([b'{"prompt": "', b"x" * BODY_LIMIT, b'"}'])
    r = httpx.post(f"{tight.url}/tokenize", content=chunks, headers={"Authorization": f"Bearer {KEY_A}"})
    assert r.status_code == 413
    too_many_chars = "hello " * (MAX_MODEL_LEN * 6)  # under the body cap, over 32 characters a token
    for path, body, param in [("/tokenize", {"prompt": too_many_chars}, "prompt"),
                              ("/v1/completions", {"prompt": too_many_chars}, "prompt"),
                              ("/v1/chat/completions", _chat(too_many_chars), "messages")]:
        err = _assert_400(_post(tight, path, body, KEY_A), param)
        assert err["code"] == "context_length_exceeded"
    assert httpx.get(f"{tight.url}/health").status_code == 200


def test_prefix_cache_is_private_to_each_key(tight: LiveServer) -> None:
    prompt = " ".join(f"word{i}" for i in range(150))

    def cached(key: str, text: str, **extra: object) -> int:
        r = _post(tight, "/v1/completions", {"prompt": text, "max_tokens": 1, "temperature": 0, **extra}, key)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached(KEY_A, prompt) == 0
    assert cached(KEY_A, prompt + " more") > 100  # the same tenant still hits
    assert cached(KEY_B, prompt + " more") == 0
    assert cached(KEY_B, prompt + " again") > 100
    assert cached(KEY_A, prompt + " more", cache_salt="other") == 0  # vLLM's per-request salt


def test_key_file_lines_are_stripped(tight: LiveServer) -> None:
    assert _post(tight, "/v1/chat/completions", _chat(), KEY_B).status_code == 200
    for not_a_key in ("# an indented comment", "   # an indented comment"):
        assert _post(tight, "/v1/chat/completions", _chat(), not_a_key).status_code == 401


def _serve_exit(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pagoda.cli", "serve", "--port", str(free_port()), *args]
    env = {k: v for k, v in os.environ.items() if k != "PAGODA_API_KEY"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n   # and another\n"])
def test_a_key_file_without_keys_refuses_to_start(tmp_path: Path, content: str) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(content)
    done = _serve_exit(tmp_path, "--api-key-file", str(keys))
    assert done.returncode == 2 and "holds no keys" in done.stderr


def test_a_public_bind_needs_a_key_or_an_explicit_flag(tmp_path: Path) -> None:
    done = _serve_exit(tmp_path, "--host", "0.0.0.0")
    assert done.returncode == 2 and "without an API key" in done.stderr and "--allow-unauthenticated" in done.stderr


def test_host_header_is_checked_on_a_loopback_bind(server: LiveServer) -> None:
    port = server.url.rsplit(":", 1)[1]
    for host, status in [("evil.example", 400), (f"rebind.attacker.com:{port}", 400), (f"localhost:{port}", 200),
                         (f"127.0.0.1:{port}", 200), (f"[::1]:{port}", 200)]:
        r = httpx.get(f"{server.url}/health", headers={"Host": host})
        assert r.status_code == status, (host, r.text)


def test_cors_preflight_only_for_allowed_origins(server: LiveServer, tight: LiveServer) -> None:
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(f"{tight.url}/v1/chat/completions", headers={"Origin": ORIGIN, **ask})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    other = httpx.options(f"{tight.url}/v1/chat/completions", headers={"Origin": "http://evil.example", **ask})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    actual = _post(tight, "/v1/chat/completions", _chat(), KEY_A, headers={"Origin": ORIGIN})
    assert actual.headers["access-control-allow-origin"] == ORIGIN
    # No origins configured: no CORS answers at all (a browser page elsewhere cannot read responses).
    default = httpx.options(f"{server.url}/v1/chat/completions", headers={"Origin": ORIGIN, **ask})
    assert "access-control-allow-origin" not in default.headers


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_stream_left_before_its_first_token_leaves_the_queue(tight: LiveServer, path: str) -> None:
    """One batch slot: the second request waits. Its client leaves before any token; the queue must empty
    while the first request is still running, not when it is done."""
    long_body = {"prompt": "Count:", "max_tokens": MAX_MODEL_LEN - 16, "ignore_eos": True, "temperature": 0,
                 "stream": True}
    waiting_body = ({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
    waiting_body |= {"max_tokens": 8, "stream": True, "n": 2}
    headers = {"Authorization": f"Bearer {KEY_A}"}

    async def scenario() -> tuple[bool, bool]:
        async with httpx.AsyncClient(base_url=tight.url, timeout=120, headers=headers) as http:
            async with http.stream("POST", "/v1/completions", json=long_body) as first:
                lines = first.aiter_lines()
                await lines.__anext__()  # running now
                queued = asyncio.ensure_future(http.post(path, json=waiting_body))
                saw_waiting = False
                for _ in range(200):
                    await asyncio.sleep(0.05)
                    if _metric(tight, "pagoda:num_requests_waiting") > 0:
                        saw_waiting = True
                        break
                queued.cancel()  # the client leaves before its first token
                await asyncio.gather(queued, return_exceptions=True)
                emptied_while_first_runs = False
                seen = 0
                async for _ in lines:  # ~MAX_MODEL_LEN lines in all; the queue must empty in the first quarter
                    seen += 1
                    if seen > MAX_MODEL_LEN // 4:
                        break
                    if _metric(tight, "pagoda:num_requests_waiting") == 0:
                        emptied_while_first_runs = True
                        break
            return saw_waiting, emptied_while_first_runs

    saw_waiting, emptied = asyncio.run(scenario())
    assert saw_waiting and emptied


def _sse_chunks(server: LiveServer, path: str, body: dict) -> list[dict]:
    chunks = []
    with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True}, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
    return chunks


@pytest.mark.parametrize("path, body, choices", [
    ("/v1/chat/completions", _chat("Name three colours.", n=2, temperature=1.0, max_tokens=12), 2),
    ("/v1/completions", {"prompt": ["One", "Two"], "n": 3, "temperature": 1.0, "max_tokens": 10}, 6),
])
def test_streams_send_exactly_one_finish_per_choice(server: LiveServer, path: str, body: dict, choices: int) -> None:
    chunks = _sse_chunks(server, path, body)
    finishes = [c["index"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"] is not None]
    assert sorted(finishes) == list(range(choices))
    for index in range(choices):  # nothing of a choice after its finish
        last = max(i for i, chunk in enumerate(chunks) for c in chunk["choices"] if c["index"] == index)
        assert any(c["index"] == index and c["finish_reason"] for c in chunks[last]["choices"])


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", _chat("Count to five.", max_tokens=8, temperature=0, ignore_eos=True)),
    ("/v1/completions", {"prompt": "Count to five:", "max_tokens": 8, "temperature": 0, "ignore_eos": True}),
])
def test_continuous_usage_stats_put_usage_on_every_chunk(server: LiveServer, path: str, body: dict) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = _sse_chunks(server, path, {**body, "stream_options": options})
    content = [c for c in chunks if c["choices"]][1:]  # after the role chunk (chat) or the first text
    assert content and all(c["usage"] is not None for c in content)
    generated = [c["usage"]["completion_tokens"] for c in content]
    assert generated == sorted(generated) and generated[-1] == 8
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    plain = _sse_chunks(server, path, {**body, "stream_options": {"include_usage": True}})
    assert all(c["usage"] is None for c in plain if c["choices"])
