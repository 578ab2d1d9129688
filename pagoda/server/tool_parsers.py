"""Tool calls in a model's own text, per family (``--tool-call-parser``): how a call is written (for the history
and for templates without tool support), the structural tag that constrains one, and a parser that turns
the output, whole or as it streams, into content and OpenAI tool calls.

One parser serves both paths: a full response is the stream fed at once, so streamed deltas always add up
to what the same output returns unstreamed. A call's ``arguments`` is the model's JSON text as written.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,?\s*')
_DECODER = json.JSONDecoder()
_EXAMPLE_ARGUMENTS = '{"argument": "value"}'


@dataclass
class Region:
    """Where one call's JSON object sits in the output; ``end`` None while it is still being written."""

    start: int
    end: int | None


class HermesFormat:
    """``<tool_call>{"name": …, "arguments": {…}}</tool_call>`` blocks after optional text (Hermes, Qwen 2/2.5/3)."""

    name = "hermes"
    open, close = "<tool_call>", "</tool_call>"
    args_keys = ("arguments",)
    separator = "\n"
    trigger = open

    def call_text(self, name: str, arguments: str) -> str:
        return f'{self.open}\n{{"name": {json.dumps(name)}, "arguments": {arguments}}}\n{self.close}'

    def tag(self, name: str) -> tuple[str, str]:
        """The fixed text before and after a call's arguments, for the structural tag."""
        return f'{self.open}\n{{"name": {json.dumps(name)}, "arguments": ', f"}}\n{self.close}"

    def system_prompt(self, tool_lines: list[str]) -> str:
        return ("You can call the functions below (each line gives one, with the JSON schema of its arguments):\n"
                "<tools>\n" + "\n".join(tool_lines) + "\n</tools>\n"
                "To call one, answer with a block like this, holding its name and its arguments as JSON:\n"
                f'{self.call_text("function_name", _EXAMPLE_ARGUMENTS)}\n'
                "Function results come back inside <tool_response></tool_response>.")

    def tool_result(self, content: str) -> str:
        return f"<tool_response>\n{content}\n</tool_response>"

    def regions(self, text: str) -> tuple[int, list[Region]]:
        """(how much of ``text`` is certainly content, the call regions)."""
        pos = text.find(self.open)
        if pos < 0:
            return len(text) - _partial_suffix(text, self.open), []
        content_end, regions = pos, []
        while pos >= 0:
            start = pos + len(self.open)
            close = text.find(self.close, start)
            if close < 0:
                regions.append(Region(start, None))
                break
            regions.append(Region(start, close))
            pos = text.find(self.open, close + len(self.close))
        return content_end, regions


class Llama3JsonFormat:
    """Llama 3.1/3.2 JSON calls: the whole answer is ``{"name": …, "parameters": {…}}`` objects (``; `` between),
    optionally after ``<|python_tag|>``; anything else is content."""

    name = "llama3_json"
    python_tag = "<|python_tag|>"
    args_keys = ("parameters", "arguments")
    separator = "; "
    trigger = '{"name": '

    def call_text(self, name: str, arguments: str) -> str:
        return f'{{"name": {json.dumps(name)}, "parameters": {arguments}}}'

    def tag(self, name: str) -> tuple[str, str]:
        return f'{{"name": {json.dumps(name)}, "parameters": ', "}"

    def system_prompt(self, tool_lines: list[str]) -> str:
        return ("You can call the functions below (each line gives one, with the JSON schema of its arguments):\n"
                + "\n".join(tool_lines) + "\n"
                "To call one, answer with only a JSON object holding its name and its parameters, like this:\n"
                f'{self.call_text("function_name", _EXAMPLE_ARGUMENTS)}\n'
                "Function results come back as the next message.")

    def tool_result(self, content: str) -> str:
        return content

    def regions(self, text: str) -> tuple[int, list[Region]]:
        i = len(text) - len(text.lstrip())
        if text.startswith(self.python_tag, i):
            i += len(self.python_tag)
            i += len(text[i:]) - len(text[i:].lstrip())
        rest = text[i:]
        if not rest or self.python_tag.startswith(rest):
            return 0, []  # cannot tell yet
        if not rest.startswith("{"):
            return len(text), []
        regions = []
        while True:
            try:
                _, end = _DECODER.raw_decode(text, i)
            except ValueError:
                regions.append(Region(i, None))
                break
            regions.append(Region(i, end))
            j = end + len(text[end:]) - len(text[end:].lstrip())
            if not text.startswith(";", j):
                break
            i = j + 1 + len(text[j + 1:]) - len(text[j + 1:].lstrip())
            if i >= len(text) or text[i] != "{":
                break
        return 0, regions


ToolFormat = HermesFormat | Llama3JsonFormat
TOOL_FORMATS: dict[str, ToolFormat] = {f.name: f for f in (HermesFormat(), Llama3JsonFormat())}


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that begins ``marker`` (held back: it may become one)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class _Call:
    id: str
    name: str | None = None
    args_sent: str = ""
    arguments: str | None = None  # set once the call is complete


@dataclass
class ToolCallParser:
    """Feed the output's text deltas; each feed returns the OpenAI deltas it completes."""

    format: ToolFormat
    text: str = ""
    content_sent: int = 0
    calls: list[_Call] = field(default_factory=list)
    complete: int = 0  # calls whose object closed

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        """(new content, new tool-call deltas); ``final`` flushes text held back as a possible call opener."""
        self.text += delta
        content_end, regions = self.format.regions(self.text)
        if final and not regions:
            content_end = len(self.text)
        content = self.text[self.content_sent:content_end] if content_end > self.content_sent else ""
        self.content_sent = max(self.content_sent, content_end)
        deltas = []
        for index, region in enumerate(regions):
            if index == len(self.calls):
                self.calls.append(_Call(new_call_id()))
            deltas.extend(self._advance(index, region))
        return content, deltas

    def _advance(self, index: int, region: Region) -> list[dict[str, Any]]:
        call = self.calls[index]
        if call.arguments is not None:
            return []
        body = self.text[region.start:region.end] if region.end is not None else self.text[region.start:]
        out: list[dict[str, Any]] = []
        name = _NAME.match(body)
        if name is None:
            return out
        if call.name is None:
            try:
                call.name = json.loads(f'"{name.group(1)}"')
            except ValueError:
                return out
            out.append({"index": index, "id": call.id, "type": "function",
                        "function": {"name": call.name, "arguments": ""}})
        key = re.compile(r'"(?:' + "|".join(self.format.args_keys) + r')"\s*:\s*').match(body, name.end())
        if key is None:
            return out
        try:
            value, end = _DECODER.raw_decode(body, key.end())
            args = body[key.end():end] if isinstance(value, dict) else json.dumps(value)
            done = region.end is not None
        except ValueError:
            args, done = body[key.end():], False  # the object is still open: all of it so far is arguments
        if done:
            call.arguments = args
            self.complete = max(self.complete, index + 1)
        if args.startswith(call.args_sent) and len(args) > len(call.args_sent):
            out.append({"index": index, "function": {"arguments": args[len(call.args_sent):]}})
            call.args_sent = args
        return out

    def result(self) -> tuple[str | None, list[dict[str, Any]]]:
        """The whole output as a message's content and tool_calls. A call cut short (finish_reason length) keeps
        the arguments written so far, as the stream sent them and as OpenAI returns a cut call."""
        content_end, _ = self.format.regions(self.text)
        calls = [{"id": c.id, "type": "function",
                  "function": {"name": c.name, "arguments": c.arguments if c.arguments is not None else c.args_sent}}
                 for c in self.calls if c.name is not None]
        if not calls:  # no call got as far as its name: the whole output is content
            return self.text.strip() or None, []
        return self.text[:content_end].strip() or None, calls
