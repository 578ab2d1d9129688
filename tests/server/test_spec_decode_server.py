"""`pagoda serve --speculative-config`: drafts (prompt lookup, a draft model) verified behind the OpenAI API, the
same text as without, the spec-decode metrics, and the per-request opt-out."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.conftest import start_server

PASSAGE = (Path(__file__).parents[2] / "pagoda" / "data" / "eval_text.txt").read_text()[:600]
MESSAGES = [{"role": "user", "content": f"Repeat the following text exactly.\n\n{PASSAGE}"}]


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


@pytest.mark.slow
def test_served_with_prompt_lookup(tmp_path: Path) -> None:
    spec = json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4})
    draft = json.dumps({"method": "draft_model", "model": "smollm2-135m", "num_speculative_tokens": 2,
                        "adaptive": False})
    servers = [start_server(tmp_path, "--kv-cache-gib", "0.25", "--max-model-len", "1024", *extra)
               for extra in ((), ("--speculative-config", spec), ("--speculative-config", draft))]
    try:
        plain, speculative, drafted = (openai.OpenAI(base_url=f"{s.url}/v1", api_key="none") for s in servers)
        texts = [c.chat.completions.create(model="smollm2-135m", messages=MESSAGES, temperature=0, max_tokens=64)
                 .choices[0].message.content for c in (plain, speculative, drafted)]
        assert texts[0] == texts[1] == texts[2] and len(texts[1]) > 100
        assert metric(servers[2].url, "pagoda:spec_decode_num_accepted_tokens_total") > 30  # the model as its draft
        url = servers[1].url
        drafts, accepted = metric(url, "pagoda:spec_decode_num_draft_tokens_total"), \
            metric(url, "pagoda:spec_decode_num_accepted_tokens_total")
        assert 0 < accepted <= drafts
        assert 0 < metric(url, "pagoda:spec_decode_draft_acceptance_rate") <= 1
        assert metric(url, "pagoda:spec_decode_mean_acceptance_length") > 1
        out = speculative.chat.completions.create(model="smollm2-135m", messages=MESSAGES, temperature=0, max_tokens=32,
                                                  extra_body={"speculative_decoding": False})
        assert texts[1].startswith(out.choices[0].message.content)
        assert metric(url, "pagoda:spec_decode_num_draft_tokens_total") == drafts  # opted out: none verified
        bad = httpx.post(f"{url}/v1/chat/completions", json={"model": "smollm2-135m", "messages": MESSAGES,
                                                              "speculative_decoding": "sometimes"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "speculative_decoding"
    finally:
        for s in servers:
            s.stop()


def test_a_bad_speculative_config_stops_the_server_with_its_name(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"speculative_config\.num_speculative_tokens"):
        start_server(tmp_path, "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 99}')
