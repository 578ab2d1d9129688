"""`pagoda chat`: a terminal chat with history, streaming, against a server (``--url``) or in-process."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import Any

EXIT_WORDS = {"/exit", "/quit"}


def _stream_http(url: str, api_key: str | None, messages: list[dict[str, str]], args: argparse.Namespace
                 ) -> Iterator[str]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"messages": messages, "stream": True, "temperature": args.temperature, "max_tokens": args.max_tokens}
    with httpx.stream("POST", f"{url.rstrip('/')}/v1/chat/completions", json=body, headers=headers,
                      timeout=None) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"server answered {response.status_code}: {response.text}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    yield text


def _stream_local(llm: Any, messages: list[dict[str, str]], args: argparse.Namespace) -> Iterator[str]:
    from pagoda import SamplingParams

    tok = llm.get_tokenizer()
    ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    for out in llm.generate_stream({"prompt_token_ids": ids}, params):
        for choice in out.outputs:  # empty when a step changed nothing visible
            if choice.text:
                yield choice.text


def run_chat(args: argparse.Namespace, engine_kwargs: dict[str, Any]) -> int:
    llm = None
    if args.url is None:
        from pagoda import LLM

        llm = LLM(**engine_kwargs)
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print("Type a message; /exit to leave, /reset to forget the conversation.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in EXIT_WORDS:
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        pieces = []
        try:
            stream = _stream_http(args.url, args.chat_api_key, messages, args) if llm is None else \
                _stream_local(llm, messages, args)
            for piece in stream:
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except (RuntimeError, OSError) as exc:
            messages.pop()
            print(f"\nerror: {exc}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(pieces)})
