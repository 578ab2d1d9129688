"""A small tool-using agent over Pagoda's OpenAI API with the official ``openai`` client.

Two tools: a calculator (arithmetic only, evaluated from the parsed expression, never ``eval``) and a search
in the text files under a folder. Each step asks the model; its tool calls are run and their results (or
errors, which the model sees and may correct) sent back, until it answers in text or the step limit is
reached, when it is asked to answer with what it has.

    pagoda serve &
    python examples/agent.py --root docs "How many tokens per second does Pagoda decode?"
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression such as (2 + 3) * 4 / 5",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["expression"],
                       "properties": {"expression": {"type": "string", "maxLength": 80}}}}},
    {"type": "function", "function": {
        "name": "search_files", "description": "Find the lines of text files that contain a phrase",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["phrase"],
                       "properties": {"phrase": {"type": "string", "minLength": 1, "maxLength": 60}}}}},
]
MAX_MATCHES = 20
MAX_FILE_BYTES = 1_000_000
MAX_POWER = 1000  # exponents beyond this make numbers no answer needs

_OPERATORS: dict[type, Any] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                               ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
                               ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


class ToolError(Exception):
    """A tool could not run on the arguments it was given; the message goes back to the model."""


def calculator(expression: str) -> float | int:
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise ToolError(f"not an arithmetic expression: {exc.msg}") from None

    def value(node: ast.AST) -> float | int:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_POWER:
                raise ToolError(f"exponent {right} is too large (at most {MAX_POWER})")
            try:
                return _OPERATORS[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ToolError("division by zero") from None
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ToolError(f"only numbers and + - * / // % ** are allowed, not {ast.unparse(node)!r}")

    return value(tree.body)


def search_files(root: Path, phrase: str) -> list[str]:
    """``path:line: text`` for each line under ``root`` holding ``phrase`` (case-insensitive), the first few."""
    matches = []
    needle = phrase.lower()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.stat().st_size <= MAX_FILE_BYTES):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError):
            continue  # not a text file
        for number, line in enumerate(lines, 1):
            if needle in line.lower():
                matches.append(f"{path.relative_to(root)}:{number}: {line.strip()[:200]}")
                if len(matches) == MAX_MATCHES:
                    return matches
    return matches


@dataclass
class Step:
    tool: str
    arguments: str
    result: str
    ok: bool


@dataclass
class AgentResult:
    answer: str
    steps: list[Step] = field(default_factory=list)


def run_tool(name: str, arguments: str, root: Path) -> tuple[str, bool]:
    """The tool's result as JSON text, and whether it succeeded; a failure is an error the model can read."""
    try:
        args = json.loads(arguments)
        if name == "calculator":
            return json.dumps({"result": calculator(str(args["expression"]))}), True
        if name == "search_files":
            return json.dumps({"matches": search_files(root, str(args["phrase"]))}), True
        raise ToolError(f"there is no tool named {name!r}; use one of {[t['function']['name'] for t in TOOLS]}")
    except (ToolError, ValueError, KeyError, TypeError) as exc:
        return json.dumps({"error": f"{type(exc).__name__}: {exc}"}), False


def run_agent(client: openai.OpenAI, model: str, question: str, root: Path, max_steps: int = 4,
              first_tool_choice: str = "required", max_tokens: int = 200) -> AgentResult:
    messages: list[Any] = [
        {"role": "system", "content": "You answer questions. Use the tools to calculate and to look things up."},
        {"role": "user", "content": question}]
    result = AgentResult(answer="")
    for step in range(max_steps):
        reply = client.chat.completions.create(
            model=model, messages=messages, tools=TOOLS, max_tokens=max_tokens, temperature=0,
            tool_choice=first_tool_choice if step == 0 else "auto", parallel_tool_calls=False).choices[0]
        calls = reply.message.tool_calls or []
        if not calls:
            result.answer = reply.message.content or ""
            return result
        messages.append({"role": "assistant", "content": reply.message.content, "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in calls]})
        for call in calls:
            output, ok = run_tool(call.function.name, call.function.arguments, root)
            result.steps.append(Step(call.function.name, call.function.arguments, output, ok))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": output})
    final = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="none",
                                           max_tokens=max_tokens, temperature=0).choices[0]
    result.answer = final.message.content or ""
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("question")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--root", type=Path, default=Path("."), help="the folder search_files looks in")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--first-tool-choice", default="required", choices=["auto", "required", "none"])
    args = parser.parse_args(argv)
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    result = run_agent(client, args.model, args.question, args.root, args.max_steps, args.first_tool_choice)
    for step in result.steps:
        print(f"[{step.tool}] {step.arguments} -> {step.result}", file=sys.stderr)
    print(result.answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
