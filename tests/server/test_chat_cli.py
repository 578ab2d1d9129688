"""`pagoda chat` against a live server and in-process: streamed replies, history carried between turns."""

from __future__ import annotations

import subprocess
import sys

import openai

from tests.server.conftest import API_KEY, LiveServer

TURNS = ["Name a fruit.", "What colour is it?"]
MAX_TOKENS = 12


def _chat(*args: str) -> subprocess.CompletedProcess[str]:
    stdin = "\n".join([*TURNS, "/exit"]) + "\n"
    return subprocess.run([sys.executable, "-m", "pagoda.cli", "chat", "--temperature", "0",
                           "--max-tokens", str(MAX_TOKENS), *args],
                          input=stdin, capture_output=True, text=True, timeout=300)


def test_chat_against_a_server_keeps_history(server: LiveServer) -> None:
    done = _chat("--url", server.url, "--api-key", API_KEY)
    assert done.returncode == 0, done.stderr
    # The same conversation through the API: the second turn only matches if the first was sent back as history.
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    messages: list[dict[str, str]] = []
    replies = []
    for turn in TURNS:
        messages.append({"role": "user", "content": turn})
        reply = client.chat.completions.create(model="smollm2-135m", messages=messages, temperature=0,
                                               max_tokens=MAX_TOKENS).choices[0].message.content or ""
        messages.append({"role": "assistant", "content": reply})
        replies.append(reply)
    assert done.stdout == "".join(f"> {reply}\n" for reply in replies) + "> "


def test_chat_in_process_answers_each_turn() -> None:
    done = _chat("--kv-cache-gib", "0.5")
    assert done.returncode == 0, done.stderr
    answers = done.stdout.split("> ")
    assert answers[0] == "" and answers[-1] == ""
    assert len(answers) == len(TURNS) + 2 and all(a.strip() for a in answers[1:-1]), done.stdout


def test_chat_reports_a_server_error_and_goes_on(server: LiveServer) -> None:
    done = _chat("--url", server.url, "--api-key", "wrong-key")
    assert done.returncode == 0
    assert done.stderr.count("error: server answered 401") == len(TURNS), done.stderr
