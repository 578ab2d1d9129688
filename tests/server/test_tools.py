"""Tool calling through the OpenAI API with the official client, on the bundled model (whose template has no
tool support, so tools are rendered into the system prompt): required and named calls always validate,
streamed deltas add up to the unstreamed answer, and a whole tool loop (call, run, result, answer) works."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

from tests.server.conftest import API_KEY, LiveServer

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def _create(client: openai.OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(model="smollm2-135m", **{"max_tokens": 80, **kwargs})


@pytest.mark.parametrize("seed", range(4))
def test_required_calls_always_validate_against_their_schema(client: openai.OpenAI, seed: int) -> None:
    done = _create(client, messages=QUESTION, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                   temperature=1.0, seed=seed)
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_a_named_function_is_the_one_called(client: openai.OpenAI) -> None:
    # One call: with parallel calls a sampled model may go on calling until max_tokens cuts the last one off.
    done = _create(client, messages=QUESTION, tools=TOOLS, temperature=0.8, seed=1, parallel_tool_calls=False,
                   tool_choice={"type": "function", "function": {"name": "add"}})
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), ADD)


def test_streamed_deltas_add_up_to_the_unstreamed_calls(client: openai.OpenAI) -> None:
    kwargs = dict(messages=QUESTION, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=60)
    whole = _create(client, **kwargs).choices[0]
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in _create(client, stream=True, **kwargs):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                if delta.id is not None:  # the first delta of a call: its id and name, no arguments yet
                    assert delta.index not in calls and delta.function.name and delta.type == "function"
                    calls[delta.index] = {"name": delta.function.name, "arguments": ""}
                else:
                    assert delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments or ""
    assert finish == whole.finish_reason
    assert [calls[i] for i in sorted(calls)] == [
        {"name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls]


def test_none_answers_in_text_and_auto_is_well_formed(client: openai.OpenAI) -> None:
    none = _create(client, messages=QUESTION, tools=TOOLS, tool_choice="none", temperature=0).choices[0]
    assert none.message.tool_calls is None and none.message.content and none.finish_reason in ("stop", "length")
    for seed in range(3):
        auto = _create(client, messages=QUESTION, tools=TOOLS, temperature=1.0, seed=seed).choices[0]
        for call in auto.message.tool_calls or []:  # any call the model opens is held to its schema
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        assert auto.finish_reason == ("tool_calls" if auto.message.tool_calls else auto.finish_reason)


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_loop_runs_to_an_answer(client: openai.OpenAI, stream: bool) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is 2 + 3? Use the add tool."}]
    call = _create(client, messages=messages, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
                   parallel_tool_calls=False, temperature=0).choices[0].message.tool_calls[0]
    args = json.loads(call.function.arguments)
    messages.append({"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "add", "arguments": call.function.arguments}}]})
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sum": args["a"] + args["b"]})})
    if stream:
        pieces, finish = [], None
        for chunk in _create(client, messages=messages, tools=TOOLS, tool_choice="none", temperature=0, stream=True):
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        answer = "".join(pieces)
    else:
        final = _create(client, messages=messages, tools=TOOLS, tool_choice="none", temperature=0).choices[0]
        answer, finish = final.message.content, final.finish_reason
    assert answer and finish in ("stop", "length")


def test_the_history_reaches_the_prompt_in_the_documented_format(server: LiveServer) -> None:
    import httpx

    messages = [{"role": "user", "content": "Add 2 and 3."},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    ids = httpx.post(f"{server.url}/tokenize", json={"messages": messages},
                     headers={"Authorization": f"Bearer {API_KEY}"}).json()["tokens"]
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": ids},
                      headers={"Authorization": f"Bearer {API_KEY}"}).json()["prompt"]
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>" in text


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"messages": [{"role": "tool", "content": "5"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages[0].tool_calls"),
])
def test_bad_tool_requests_are_400_naming_the_field(server: LiveServer, body: dict, param: str) -> None:
    import httpx

    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 4, **body},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert param in (err["param"] or "") + err["message"], err
