"""Tool-call parsing per format (torch-free): streamed deltas add up to the whole answer whatever the chunking,
openers split across deltas are held back, cut calls keep what was written, and the history renders for
templates with and without tool support."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pagoda.server.protocol import ChatMessage, Tool
from pagoda.server.tool_parsers import TOOL_FORMATS, ToolCallParser
from pagoda.server.tools import ToolUse, render_messages

HERMES = TOOL_FORMATS["hermes"]
LLAMA = TOOL_FORMATS["llama3_json"]


def _stream(fmt: Any, text: str, step: int) -> tuple[str, list[dict[str, str]], ToolCallParser]:
    parser = ToolCallParser(fmt)
    content, calls = "", {}
    for i in range(0, len(text), step):
        piece, deltas = parser.feed(text[i:i + step], final=i + step >= len(text))
        content += piece
        for d in deltas:
            if "id" in d:
                calls[d["index"]] = {"name": d["function"]["name"], "arguments": ""}
            calls[d["index"]]["arguments"] += d["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)], parser


CASES = [
    (HERMES, 'Let me check.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": {"c": [2, "}"]}}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
     "Let me check.", [("add", '{"a": 1, "b": {"c": [2, "}"]}}'), ("get_time", "{}")]),
    (HERMES, "No call here, only a < and a <tool", "No call here, only a < and a <tool", []),
    (LLAMA, '<|python_tag|>{"name": "add", "parameters": {"a": 1}}; {"name": "x", "parameters": {"q": "s;"}}', None,
     [("add", '{"a": 1}'), ("x", '{"q": "s;"}')]),
    (LLAMA, '{"name": "add", "arguments": {"a": 1}}', None, [("add", '{"a": 1}')]),
    (LLAMA, "  Plain answer {not json}", "Plain answer {not json}", []),
]


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CASES)
def test_stream_and_whole_agree_at_any_chunking(fmt: Any, text: str, content: str | None,
                                                calls: list[tuple[str, str]], step: int) -> None:
    streamed_content, streamed_calls, parser = _stream(fmt, text, step)
    whole_content, whole_calls = parser.result()
    assert whole_content == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in whole_calls] == calls
    assert [(c["name"], c["arguments"]) for c in streamed_calls] == calls
    assert streamed_content.strip() == (content or "")
    for call in whole_calls:
        json.loads(call["function"]["arguments"])
        assert call["id"].startswith("call_") and call["type"] == "function"


def test_a_cut_call_keeps_the_arguments_written_so_far() -> None:
    _, streamed, parser = _stream(HERMES, '<tool_call>\n{"name": "add", "arguments": {"a": 1', 3)
    content, calls = parser.result()
    assert content is None and calls[0]["function"] == {"name": "add", "arguments": '{"a": 1'}
    assert streamed == [{"name": "add", "arguments": '{"a": 1'}]
    assert parser.complete == 0  # so the finish reason stays length


def test_call_text_round_trips_through_the_parser() -> None:
    for fmt in (HERMES, LLAMA):
        parser = ToolCallParser(fmt)
        parser.feed(fmt.call_text("f", '{"x": [1, 2]}'), final=True)
        assert parser.result()[1][0]["function"] == {"name": "f", "arguments": '{"x": [1, 2]}'}


TOOL = Tool.model_validate({"type": "function", "function": {"name": "add", "description": "Add",
                                                             "parameters": {"type": "object"}}})
HISTORY = [ChatMessage(role="user", content="2+3?"),
           ChatMessage.model_validate({"role": "assistant", "content": None, "tool_calls": [
               {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]}),
           ChatMessage(role="tool", tool_call_id="c1", content="5"),
           ChatMessage(role="tool", tool_call_id="c2", content="6")]


def test_templates_without_tools_get_them_in_the_system_prompt() -> None:
    use = ToolUse([TOOL], "auto", True, HERMES)
    rendered, extra = render_messages(HISTORY, use, HERMES, native=False)
    assert extra == {} and rendered[0]["role"] == "system" and '"name": "add"' in rendered[0]["content"]
    assert rendered[2] == {"role": "assistant", "content": HERMES.call_text("add", '{"a": 2, "b": 3}')}
    assert rendered[3] == {"role": "user", "content": "<tool_response>\n5\n</tool_response>\n"
                                                      "<tool_response>\n6\n</tool_response>"}


def test_templates_with_tools_get_them_as_variables() -> None:
    use = ToolUse([TOOL], "auto", True, HERMES)
    rendered, extra = render_messages(HISTORY, use, HERMES, native=True)
    assert extra["tools"][0]["function"]["name"] == "add"
    assert rendered[1]["tool_calls"][0]["function"]["arguments"] == {"a": 2, "b": 3}
    assert rendered[2] == {"role": "tool", "content": "5", "tool_call_id": "c1"}


def test_the_constraint_follows_tool_choice() -> None:
    import json as j

    auto = j.loads(ToolUse([TOOL], "auto", False, HERMES).constraint().structural_tag)["format"]
    assert auto["type"] == "triggered_tags" and auto["stop_after_first"] and not auto["at_least_one"]
    required = j.loads(ToolUse([TOOL], "required", True, LLAMA).constraint().structural_tag)["format"]
    assert required["type"] == "tags_with_separator" and required["at_least_one"]
    assert required["tags"][0]["begin"] == '{"name": "add", "parameters": '
    assert ToolUse([TOOL], "none", True, HERMES).constraint() is None
