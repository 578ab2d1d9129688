"""Structured outputs through the OpenAI API with the official client: response_format on chat and
completions, streamed and not, vLLM's structured_outputs extra body, and a grammar the engine cannot compile
answered 400 while the server goes on."""

from __future__ import annotations

import json

import httpx
import openai
import pydantic
import pytest

from tests.server.conftest import API_KEY, LiveServer


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    population: int
    capital: bool


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def test_parse_with_a_pydantic_model_returns_a_parsed_object(client: openai.OpenAI) -> None:
    done = client.chat.completions.parse(model="smollm2-135m", response_format=City, max_tokens=80, temperature=0,
                                         messages=[{"role": "user", "content": "Describe Paris as JSON."}])
    choice = done.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, City)


def test_json_object_streamed_and_not_on_both_routes(client: openai.OpenAI) -> None:
    fmt = {"type": "json_object"}
    messages = [{"role": "user", "content": "Give me a JSON object with a key named a."}]
    whole = client.chat.completions.create(model="smollm2-135m", messages=messages, response_format=fmt,
                                           max_tokens=60, temperature=0)
    chunks = client.chat.completions.create(model="smollm2-135m", messages=messages, response_format=fmt,
                                            max_tokens=60, temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    if whole.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(streamed), dict)
    text = client.completions.create(model="smollm2-135m", prompt="JSON:", max_tokens=60, temperature=0,
                                     extra_body={"response_format": fmt}).choices[0]
    if text.finish_reason == "stop":
        assert isinstance(json.loads(text.text), dict)


def test_vllm_structured_outputs_extra_body(client: openai.OpenAI) -> None:
    choice = client.completions.create(model="smollm2-135m", prompt="Answer:", max_tokens=5, temperature=0.7, seed=3,
                                       extra_body={"structured_outputs": {"choice": ["left", "right"]}}).choices[0]
    assert choice.text in ("left", "right") and choice.finish_reason == "stop"
    regex = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "A code?"}],
                                           max_tokens=12, extra_body={"structured_outputs": {"regex": "[A-Z]{2}[0-9]{2}"}})
    assert regex.choices[0].message.content[:2].isupper() and regex.choices[0].finish_reason == "stop"


def test_a_grammar_the_engine_cannot_compile_is_a_400_and_nothing_leaks(server: LiveServer, client: openai.OpenAI) -> None:
    body = {"model": "smollm2-135m", "prompt": "x", "max_tokens": 4, "structured_outputs": {"grammar": "root ::= ("}}
    for stream in (False, True):
        r = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": stream},
                       headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "structured_outputs.grammar" in err["message"] and err["type"] == "invalid_request_error"
    after = client.completions.create(model="smollm2-135m", prompt="Hello", max_tokens=3, temperature=0)
    assert after.choices[0].text
