"""Incremental detokenization never emits broken UTF-8; stop strings match across chunk boundaries."""

from __future__ import annotations

import pytest

from pagoda.engine.frontend.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop
from pagoda.model.gguf_file import GGUFFile
from pagoda.model.tokenizer_source import tokenizer_from_gguf

TEXTS = [
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "Emoji: 🙂👍🏽🎉 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 done",
    "Mixed 中文 and English with 数字 12345 and ümlauts çà.",
    "日本語のテキストも大丈夫です。한국어도 됩니다.",
]


@pytest.fixture(scope="module")
def tokenizer(bundled_gguf) -> Tokenizer:
    return Tokenizer(tokenizer_from_gguf(GGUFFile(bundled_gguf).metadata))


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_deltas_are_valid_utf8(tokenizer: Tokenizer, text: str) -> None:
    prompt = tokenizer.encode("Say:")
    ids = tokenizer.encode(text)
    assert any(len(tokenizer.decode([t])) == 0 or "\ufffd" in tokenizer.decode([t]) for t in ids), \
        "test text should contain characters split across tokens"
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add([t]) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids)


def test_chat_template_renders_chatml(tokenizer: Tokenizer) -> None:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")


def test_find_stop_across_boundaries() -> None:
    # "END" arrives split as "...E" then "ND": found when the second chunk lands.
    assert find_stop("abc E", 2, ["END"]) is None
    assert find_stop("abc END", 2, ["END"]) == ("END", 4)
    # The earliest of several stops wins.
    assert find_stop("xx STOP yy END", 14, ["END", "STOP"]) == ("STOP", 3)
    # A stop entirely before the new characters was already handled.
    assert find_stop("END and more", 4, ["END"]) is None


@pytest.mark.parametrize("text", TEXTS)
def test_every_output_kind_gives_the_streamed_text(tokenizer: Tokenizer, text: str) -> None:
    """Offline generate decodes a finished output once (FINAL_ONLY); every cut point of the output,
    mid-character ones included, must give the text the incremental path builds (CUMULATIVE), and the
    DELTA pieces must add up to it."""
    from pagoda.api.messages import CoreOutput
    from pagoda.engine.frontend.output_processor import OutputProcessor
    from pagoda.api.outputs import RequestOutputKind
    from pagoda.api.params import SamplingParams

    prompt = tokenizer.encode("Say:")
    ids = tokenizer.encode(text)
    for cut in range(1, len(ids) + 1):
        texts = []
        for kind in RequestOutputKind:
            proc = OutputProcessor(tokenizer)
            proc.add("r", None, prompt, SamplingParams(max_tokens=cut), ["r"], kind)
            outputs = []
            for i, t in enumerate(ids[:cut]):
                proc.process([CoreOutput("r", [t], finish_reason="length" if i == cut - 1 else None)])
                outputs += proc.collect()
            assert outputs[-1].finished
            if kind is RequestOutputKind.DELTA:
                texts.append("".join(c.text for o in outputs for c in o.outputs))
            else:
                texts.append(outputs[-1].outputs[0].text)
        assert texts[0] == texts[1] == texts[2], f"cut at {cut} tokens"
        assert "\ufffd" not in texts[0]
