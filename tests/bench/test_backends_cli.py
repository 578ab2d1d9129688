"""`pagoda bench backends`: the same greedy prompts through the torch and triton backends (triton under
TRITON_INTERPRET=1 on the CPU), compared token for token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pagoda.bench.backends import first_difference

pytest.importorskip("triton")


def test_first_difference() -> None:
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_backends_agree_on_a_tiny_model(make_tiny_model, tmp_path: Path) -> None:
    folder, _ = make_tiny_model("qwen3", seed=2)
    out = tmp_path / "backends.json"
    done = subprocess.run(
        [sys.executable, "-m", "pagoda.cli", "bench", "backends", "--model", str(folder), "--dtype", "float32",
         "--num-prompts", "3", "--input-len", "4", "40", "--output-len", "5", "--num-kv-blocks", "32",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["all_equal"] and report["backends"]["triton"]["equal_requests"] == 3
    assert set(report["generate_seconds"]) == {"torch", "triton"}
    assert report["engine_args"] == {"model": str(folder), "dtype": "float32", "num_kv_blocks": 32}
