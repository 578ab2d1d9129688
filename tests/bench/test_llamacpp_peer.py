"""The llama.cpp peer (optional extra `pagoda-llm[peers]`): runs when llama-cpp-python is installed."""

from __future__ import annotations

import pytest

from pagoda.bench.workloads import WORKLOADS
from pagoda.model.loader import resolve_model

pytest.importorskip("llama_cpp")


def test_llamacpp_peer_generates_every_requested_token() -> None:
    from pagoda.bench.llamacpp_peer import run_llamacpp

    prompts, out_lens = WORKLOADS["smoke"].build()
    # 3 slots for 8 requests: sequences finish, leave the cache, and waiting prompts take their place.
    result = run_llamacpp(str(resolve_model("smollm2-135m").path), prompts, out_lens, slots=3)
    assert result["output_tokens"] == sum(out_lens)
    assert result["output_tok_per_s"] > 0 and result["slots"] == 3
