"""`pagoda bench soak`, short: the real command on a real server; its report and its pass/fail rule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_short_soak_passes_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, "-m", "pagoda.cli", "bench", "soak", "--requests", "300", "--warmup", "100",
                           "--sample-every", "100", "--max-growth-mb", "100000", "--out", str(out), "--",
                           "--max-model-len", "256", "--kv-cache-gib", "0.1"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["requests"] == 300 and len(report["samples"]) == 3
    assert set(report["statuses"]) == {"200"}  # cut requests are not counted; nothing else than 200
    assert report["kv_cache_usage_after"] == 0.0
    assert all(server > 0 and engine > 0 for _, server, engine in report["samples"])


def test_soak_fails_when_memory_grows_past_the_limit(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pagoda.cli", "bench", "soak", "--requests", "40", "--warmup", "0",
                           "--sample-every", "20", "--max-growth-mb", "-1000000", "--", "--max-model-len", "256",
                           "--kv-cache-gib", "0.1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and "FAILED" in done.stdout


def test_soak_refuses_bad_arguments() -> None:
    done = subprocess.run([sys.executable, "-m", "pagoda.cli", "bench", "soak", "--cut-share", "2"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--cut-share" in done.stderr
