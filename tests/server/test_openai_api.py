"""The official openai client against a live `pagoda serve`."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, LiveServer

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def test_probes_models_and_docs(server: LiveServer, client: openai.OpenAI) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert "version" in httpx.get(f"{server.url}/version").json()
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/docs").status_code == 200
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize"} <= set(paths)


def test_chat_stream_matches_non_stream(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "List three colors."}]
    # ignore_eos: whether the greedy answer ends before 24 tokens turns on near-ties that any change to the order
    # of a kernel's sums may flip (it ended at 19 after one); this test is about streaming.
    same = {"model": MODEL, "messages": messages, "max_tokens": 24, "temperature": 0,
            "extra_body": {"ignore_eos": True}}
    full = client.chat.completions.create(**same)
    assert full.choices[0].message.role == "assistant" and full.choices[0].message.content
    assert full.usage.completion_tokens == 24 and full.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(**same, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_usage_counts_prompt_tokens(server: LiveServer, client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello 你好 👋"}]
    counted = httpx.post(f"{server.url}/tokenize", json={"messages": messages}, headers=_auth()).json()["count"]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0)
    assert out.usage.prompt_tokens == counted
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello 你好 👋"}, headers=_auth()).json()["tokens"]
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}, headers=_auth()).json()["prompt"]
    assert text == "Hello 你好 👋"


def test_completions_n2_seeds_and_indices(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, n=2, seed=7)
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.choices[0].text != first.choices[1].text  # children get different seeds
    streamed = client.completions.create(**kwargs, stream=True)
    texts = {0: "", 1: ""}
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert [texts[0], texts[1]] == [c.text for c in first.choices]


def test_stop_strings_and_echo(client: openai.OpenAI) -> None:
    free = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0)
    assert "," in free.choices[0].text
    stopped = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[","])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == free.choices[0].text.split(",")[0]
    echoed = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("Hi")
    ids = httpx.post(str(client.base_url).removesuffix("v1/") + "tokenize", headers={"Authorization": f"Bearer {API_KEY}"},
                     json={"prompt": "Once upon a time", "add_special_tokens": False}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0, echo=True)
    assert by_ids.choices[0].text.startswith("Once upon a time")
    streamed = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == by_ids.choices[0].text


def test_logprobs(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the best token
    comp = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=3, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(len(t) == 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == comp.choices[0].text
    zero = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=3, temperature=0, logprobs=0)
    lz = zero.choices[0].logprobs  # the sampled token's own entry at every position, as vLLM answers
    assert [list(t.items()) for t in lz.top_logprobs] == [[(t, p)] for t, p in zip(lz.tokens, lz.token_logprobs)]
    hot = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=2.0, seed=3,
                                    logprobs=1)
    lh = hot.choices[0].logprobs  # a sampled token outside the top 1 is listed beside it
    assert all(t in top and 1 <= len(top) <= 2 for t, top in zip(lh.tokens, lh.top_logprobs))


def test_echo_with_logprobs_gives_prompt_logprobs(client: openai.OpenAI) -> None:
    """As vLLM: the prompt's tokens come first, the first with null logprobs; streamed the same."""
    prompt = "The sky is blue and the grass is"
    ids = httpx.post(str(client.base_url).removesuffix("v1/") + "tokenize", headers=_auth(),
                     json={"prompt": prompt, "add_special_tokens": False}).json()["tokens"]
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2, n=2)
    whole = client.completions.create(**kwargs)
    for choice in whole.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) + 3 and "".join(lp.tokens) == choice.text
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert all(v <= 0 for v in lp.token_logprobs[1:])
        assert all(t in top and len(top) in (2, 3) for t, top in zip(lp.tokens[1:], lp.top_logprobs[1:]))
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    streamed: dict[int, list] = {0: [], 1: []}
    offsets: dict[int, list] = {0: [], 1: []}
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.logprobs.token_logprobs
            offsets[c.index] += c.logprobs.text_offset
    for choice in whole.choices:
        assert streamed[choice.index] == choice.logprobs.token_logprobs  # batch-invariant server: same bits
        assert offsets[choice.index] == choice.logprobs.text_offset


def _error(server: LiveServer, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=_auth() if headers is None else headers, timeout=30)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"n": 1000}, "n"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_object"}, "stop": ["}"]}, "stop"),
        ({"structured_outputs": {"regex": "a+", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs"),
        ({"structured_outputs": {"schema": {}}}, "structured_outputs"),
        ({"no_such_parameter": 1}, "no_such_parameter"),
    ],
)
def test_bad_values_are_400_naming_the_parameter(server: LiveServer, body: dict, param: str) -> None:
    r = _error(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and param in (err["param"] or "") + err["message"]


def test_context_length_error_gives_limit_and_count(server: LiveServer) -> None:
    prompt = "hello " * 3000
    count = httpx.post(f"{server.url}/tokenize", json={"prompt": prompt}, headers=_auth()).json()["count"]
    r = _error(server, "/v1/completions", {"prompt": prompt, "max_tokens": 10})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "2048" in message and f"{count + 10} tokens ({count} in the prompt" in message


def test_auth_model_and_request_id(server: LiveServer) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    assert _error(server, "/v1/chat/completions", body, headers={}).status_code == 401
    wrong = _error(server, "/v1/chat/completions", body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    missing = _error(server, "/v1/chat/completions", {**body, "model": "gpt-9"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={**_auth(), "X-Request-Id": "abc-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-1"
    assert len(httpx.get(f"{server.url}/health").headers["x-request-id"]) >= 16


def _metric(server: LiveServer, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def test_metrics_are_exported(server: LiveServer, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="Metrics please", max_tokens=3, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ["pagoda:num_requests_running", "pagoda:num_requests_waiting", "pagoda:kv_cache_usage_perc",
                 "pagoda:prefix_cache_queries_total", "pagoda:prefix_cache_hits_total",
                 "pagoda:num_preemptions_total", "pagoda:prompt_tokens_total", "pagoda:generation_tokens_total",
                 'pagoda:request_success_total{finished_reason="length"}',
                 "pagoda:time_to_first_token_seconds_bucket", "pagoda:inter_token_latency_seconds_bucket",
                 "pagoda:e2e_request_latency_seconds_bucket", "pagoda:request_queue_time_seconds_bucket"]:
        assert name in text, name
    assert _metric(server, "pagoda:generation_tokens_total") >= 3
    before = {name: _metric(server, name) for name in HISTOGRAM_COUNTS}
    prompt_len = len(httpx.post(f"{server.url}/tokenize", headers=_auth(), json={"prompt": "Count: 1 2 3"}).json()["tokens"])
    client.completions.create(model=MODEL, prompt="Count: 1 2 3", max_tokens=5, n=2, temperature=1.0,
                              extra_body={"ignore_eos": True})
    grown = {name: _metric(server, name) - before[name] for name in HISTOGRAM_COUNTS}
    assert all(grown[name] == 1 for name in HISTOGRAM_COUNTS if "iteration" not in name), grown
    assert grown["pagoda:iteration_tokens_total_count"] >= 5  # one per step: the prefill and each decode
    sums = httpx.get(f"{server.url}/metrics").text
    assert "pagoda:request_generation_tokens_sum" in sums and "pagoda:request_params_n_bucket" in sums
    assert _bucket(server, "pagoda:request_params_max_tokens_bucket", "5.0") >= 1
    assert _bucket(server, "pagoda:request_prompt_tokens_bucket", "+Inf") >= 1 and prompt_len > 0
    info = [line for line in sums.splitlines() if line.startswith("pagoda:cache_config_info{")]
    assert len(info) == 1 and 'block_size="16"' in info[0] and 'enable_prefix_caching="True"' in info[0]


HISTOGRAM_COUNTS = [f"pagoda:{name}_count" for name in (
    "iteration_tokens_total", "request_prompt_tokens", "request_generation_tokens", "request_params_n",
    "request_params_max_tokens", "request_inference_time_seconds", "request_prefill_time_seconds",
    "request_decode_time_seconds")]


def _bucket(server: LiveServer, name: str, le: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(f'{name}{{le="{le}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} le={le} not exported")


def test_disconnect_mid_stream_frees_blocks(server: LiveServer) -> None:
    body = {"prompt": "Tell me a long story about a dragon.", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=_auth(), timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _metric(server, "pagoda:kv_cache_usage_perc") == 0 and _metric(server, "pagoda:num_requests_running") == 0:
            break
        time.sleep(0.05)
    assert _metric(server, "pagoda:kv_cache_usage_perc") == 0
    assert _metric(server, "pagoda:num_requests_running") == 0


def test_fifty_concurrent_streams(server: LiveServer, client: openai.OpenAI) -> None:
    prompts = [f"Write one sentence about the number {i}." for i in range(5)]
    expected = {}
    for p in prompts:
        choice = client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0).choices[0]
        expected[p] = (choice.text, choice.finish_reason)

    async def one(aclient: openai.AsyncOpenAI, prompt: str) -> tuple[str, str, str | None]:
        text, finish = "", None
        async for chunk in await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=16,
                                                            temperature=0, stream=True):
            for c in chunk.choices:
                text += c.text
                finish = c.finish_reason or finish
        return prompt, text, finish

    async def run() -> list[tuple[str, str, str | None]]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(aclient, prompts[i % 5]) for i in range(50)))
        finally:
            await aclient.close()

    results = asyncio.run(run())
    assert len(results) == 50
    for prompt, text, finish in results:
        assert (text, finish) == expected[prompt]


def test_embeddings(client: openai.OpenAI) -> None:
    out = client.embeddings.create(model=MODEL, input=["A cat sits on the mat.", "A kitten rests on a rug.",
                                                        "Quarterly revenue grew by four percent."])
    vectors = [d.embedding for d in out.data]
    assert [d.index for d in out.data] == [0, 1, 2] and all(len(v) == 384 for v in vectors)

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b))

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2]) + 0.2
    assert out.usage.prompt_tokens > 0


def test_embeddings_run_in_the_engine_process_and_bad_inputs_are_named(server: LiveServer,
                                                                        client: openai.OpenAI) -> None:
    client.embeddings.create(model=MODEL, input="warm up")
    # The HTTP process tokenizes and formats; the vectors come from the engine process.
    maps = {pid: open(f"/proc/{pid}/maps").read() for pid in (server.process.pid, server.engine_pid())}
    assert "libtorch" not in maps[server.process.pid] and "libtorch" in maps[server.engine_pid()]
    too_long = httpx.post(f"{server.url}/v1/embeddings", headers=_auth(),
                          json={"model": MODEL, "input": ["short", "word " * 300]})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "input"
    assert "input[1]" in too_long.json()["error"]["message"] and "256" in too_long.json()["error"]["message"]
    bad_ids = httpx.post(f"{server.url}/v1/embeddings", headers=_auth(), json={"model": MODEL, "input": [[10**6]]})
    assert bad_ids.status_code == 400 and "vocabulary" in bad_ids.json()["error"]["message"]
