"""OpenAI tool calling on the chat route: the request's tools checked, the conversation (tool calls and tool
results included) rendered for the model's template, and the constraint that makes calls valid.

``tool_choice`` ``required`` or a named function constrains the whole answer to calls whose arguments follow
their schemas (a structural tag); ``auto`` leaves the model free until it opens a call, then constrains that
call. Templates that know tools (a ``tools`` variable, as Qwen's and Llama 3's) get them as the template
expects; others (the bundled SmolLM2) get them written into the system prompt in the parser's own format,
and the history's calls and results written as that format's text (docs/tools.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pagoda.api.params import StructuredOutputsParams
from pagoda.server.errors import APIError
from pagoda.server.protocol import ChatCompletionRequest, ChatMessage, Tool
from pagoda.server.structured import check_schema
from pagoda.server.tool_parsers import ToolFormat

NO_ARGUMENTS = {"type": "object", "properties": {}}


@dataclass
class ToolUse:
    tools: list[Tool]
    choice: str  # none, auto, required, or the name of the function to call
    parallel: bool
    format: ToolFormat

    @property
    def parses(self) -> bool:
        """Whether the answer may hold calls (and so is parsed for them)."""
        return self.choice != "none"

    def constraint(self) -> StructuredOutputsParams | None:
        if not self.parses:
            return None
        chosen = self.tools if self.choice in ("auto", "required") else \
            [t for t in self.tools if t.function.name == self.choice]
        tags = []
        for tool in chosen:
            begin, end = self.format.tag(tool.function.name)
            tags.append({"type": "tag", "begin": begin, "end": end,
                         "content": {"type": "json_schema", "json_schema": parameters_of(tool)}})
        if self.choice == "auto":
            fmt = {"type": "triggered_tags", "triggers": [self.format.trigger], "tags": tags,
                   "at_least_one": False, "stop_after_first": not self.parallel}
        else:
            fmt = {"type": "tags_with_separator", "tags": tags, "separator": self.format.separator,
                   "at_least_one": True, "stop_after_first": not self.parallel}
        try:
            return StructuredOutputsParams(structural_tag={"type": "structural_tag", "format": fmt})
        except ValueError as exc:
            raise APIError(400, f"tools: {exc}", "tools") from None


def parameters_of(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else NO_ARGUMENTS


def tool_use_of(req: ChatCompletionRequest, format: ToolFormat) -> ToolUse | None:
    """The request's tools, checked (400s naming the field); None when it has none."""
    if not req.tools:
        if req.tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", "tool_choice")
        return None
    seen: set[str] = set()
    for i, tool in enumerate(req.tools):
        name = tool.function.name
        if name in seen:
            raise APIError(400, f"tools holds two functions named {name!r}", f"tools[{i}].function.name")
        seen.add(name)
        if tool.function.parameters is not None:
            check_schema(tool.function.parameters, f"tools[{i}].function.parameters")
    choice = req.tool_choice
    name = choice if isinstance(choice, str) or choice is None else choice.function.name
    if not isinstance(choice, str) and choice is not None and name not in seen:
        raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
    use = ToolUse(req.tools, name or "auto", req.parallel_tool_calls, format)
    if use.parses and (req.structured_outputs is not None or
                       (req.response_format is not None and req.response_format.get("type") != "text")):
        raise APIError(400, "response_format and structured_outputs cannot be combined with tools unless "
                            "tool_choice is none", "response_format")
    return use


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template  # type: ignore[operator]


def render_messages(messages: list[ChatMessage], use: ToolUse | None, format: ToolFormat, native: bool
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the messages as the template takes them, extra template variables)."""
    for i, m in enumerate(messages):
        if m.role == "tool" and m.tool_call_id is None:
            raise APIError(400, f"messages[{i}] has role tool but no tool_call_id", f"messages[{i}].tool_call_id")
        if m.tool_calls and m.role != "assistant":
            raise APIError(400, f"messages[{i}]: only assistant messages hold tool_calls", f"messages[{i}].tool_calls")
    if native:
        rendered = [_native(m) for m in messages]
        return rendered, ({"tools": [t.model_dump(exclude_none=True) for t in use.tools]} if use else {})
    rendered = []
    for m in messages:
        if m.role == "tool":
            result = format.tool_result(m.text())
            if rendered and rendered[-1].get("tool_results"):  # consecutive results: one turn
                rendered[-1]["content"] += "\n" + result
            else:
                rendered.append({"role": "user", "content": result, "tool_results": True})
            continue
        text = m.text()
        if m.tool_calls:
            calls = [format.call_text(c.function.name, c.function.arguments) for c in m.tool_calls]
            text = "\n".join([text, *calls] if text else calls)
        rendered.append({"role": m.role, "content": text, **({"name": m.name} if m.name else {})})
    for entry in rendered:
        entry.pop("tool_results", None)
    if use is not None:
        lines = [json.dumps({"name": t.function.name, "description": t.function.description or "",
                             "parameters": parameters_of(t)}, ensure_ascii=False) for t in use.tools]
        prompt = format.system_prompt(lines)
        if rendered and rendered[0]["role"] in ("system", "developer"):
            rendered[0] = {**rendered[0], "content": rendered[0]["content"] + "\n\n" + prompt}
        else:
            rendered.insert(0, {"role": "system", "content": prompt})
    return rendered, {}


def _native(m: ChatMessage) -> dict[str, Any]:
    entry: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.name:
        entry["name"] = m.name
    if m.tool_call_id is not None:
        entry["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        # Templates (as Hugging Face's convention has it) take the arguments as an object.
        entry["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                               for c in m.tool_calls]
    return entry


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
