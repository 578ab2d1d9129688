"""`pagoda generate` end to end in a subprocess."""

from __future__ import annotations

import subprocess
import sys


def _pagoda(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagoda.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_prints_a_completion() -> None:
    result = _pagoda("generate", "The capital of France is", "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_bad_flag_value_is_a_clear_error() -> None:
    result = _pagoda("generate", "hi", "--max-num-seqs", "0")
    assert result.returncode == 2
    assert "max_num_seqs" in result.stderr
