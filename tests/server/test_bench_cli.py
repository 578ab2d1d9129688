"""`pagoda bench serve` (and startup, offline, latency) end to end against live servers."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pagoda.bench import workloads
from pagoda.model.cpu_kernels import load_cpu_kernels
from pagoda.model.loader import default_dtype
from tests.server.conftest import API_KEY, LiveServer


def _bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pagoda.cli", "bench", *args, "--no-progress"]
                          if args[0] == "serve" else [sys.executable, "-m", "pagoda.cli", "bench", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_bench_serve_random_concurrency(server: LiveServer, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    done = _bench("serve", "--url", server.url, "--api-key", API_KEY, "--concurrency", "3", "--num-prompts", "6",
                  "--warmup", "1", "--input-len", "16", "48", "--output-len", "4", "12", "--seed", "3",
                  "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "TTFT" in done.stdout and "output throughput" in done.stdout
    result = json.loads(out.read_text())
    assert result["model"] == "smollm2-135m" and result["dataset"] == "random"
    assert result["load"]["concurrency"] == 3 and result["load"]["num_prompts"] == 6
    summary = result["summary"]
    assert summary["completed"] == 6 and summary["failed"] == 0 and summary["status_counts"] == {"200": 6}
    # ignore_eos: every measured request produced exactly its max_tokens (the warm-up one is not counted).
    expected = workloads.random_requests(7, (16, 48), (4, 12), seed=3)[1:]
    assert summary["output_tokens"] == sum(r.max_tokens for r in expected)
    assert summary["prompt_tokens"] == sum(r.prompt_tokens for r in expected)
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        stats = summary[name]
        assert set(stats) == {"count", "mean", "std", "min", "max", "p50", "p90", "p99"}
        assert 0 < stats["min"] <= stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
    assert summary["ttft_ms"]["max"] <= summary["e2e_ms"]["max"]
    assert summary["request_throughput"] > 0 and summary["output_throughput"] > 0
    assert len(result["requests"]) == 6 and all(r["status"] == "200" for r in result["requests"])
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_bench_serve_rate_jsonl_chat_and_errors(server: LiveServer, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}) + "\n"
                       + json.dumps({"prompt": "Once upon a time", "max_tokens": 6}) + "\n")
    out = tmp_path / "rate.json"
    done = _bench("serve", "--url", server.url, "--api-key", API_KEY, "--request-rate", "20", "--dataset", "jsonl",
                  "--dataset-path", str(prompts), "--num-prompts", "4", "--warmup", "0", "--out", str(out))
    assert done.returncode == 0, done.stderr
    summary = json.loads(out.read_text())["summary"]
    assert summary["completed"] == 4 and summary["output_tokens"] == 4 + 6 + 4 + 6
    assert summary["prompt_tokens"] > 0  # counted by the server (usage), not known to the client

    wrong_key = _bench("serve", "--url", server.url, "--api-key", "nope", "--model", "smollm2-135m",
                       "--concurrency", "2", "--num-prompts", "2", "--warmup", "0", "--out", str(out))
    assert wrong_key.returncode == 1  # nothing completed
    assert json.loads(out.read_text())["summary"]["status_counts"] == {"401": 2}
    bad = _bench("serve", "--url", server.url, "--concurrency", "0")
    assert bad.returncode == 2 and "concurrency must be >= 1" in bad.stderr


def test_bench_offline_latency_and_startup(tmp_path: Path) -> None:
    done = _bench("offline", "--workload", "smoke", "--kv-cache-gib", "0.5", "--out", str(tmp_path / "o.json"))
    assert done.returncode == 0, done.stderr
    offline = json.loads((tmp_path / "o.json").read_text())["pagoda"]
    workload = workloads.WORKLOADS["smoke"]
    assert offline["output_tokens"] == sum(workload.build()[1]) and offline["output_tok_per_s"] > 0
    done = _bench("latency", "--input-len", "16", "--output-len", "8", "--repeats", "2", "--mbu", "--copy-mib", "64",
                  "--kv-cache-gib", "0.5", "--out", str(tmp_path / "l.json"))
    assert done.returncode == 0, done.stderr
    latency = json.loads((tmp_path / "l.json").read_text())
    assert latency["ttft_ms_median"] > 0 and latency["decode_tok_per_s_median"] > 0
    assert latency["engine_args"] == {"kv_cache_gib": 0.5}
    bandwidth = latency["bandwidth"]
    # The bundled model reads its file's ~97 MB of blocks per decode step where the CPU kernels run them as
    # stored; dequantized, ~0.27 GB in bf16 (weights incl. the tied output projection), twice that in float32.
    if load_cpu_kernels() is not None:
        assert latency["decode_weight_bytes"] == 96_506_496 and bandwidth["bytes_per_step"] < 0.11e9
    else:
        scale = 2 if default_dtype("cpu") == torch.float32 else 1
        assert 0.25e9 * scale < bandwidth["bytes_per_step"] < 0.3e9 * scale
    # On the CPU each repeat's rate is set against the bandwidths measured just before it.
    rates = latency["decode_tok_per_s_runs"]
    assert bandwidth["paired_with_repeats"] and len(rates) == 2 == len(bandwidth["read_gbs_runs"])
    for limit, runs, mbu in (("copy_gbs", "copy_gbs_runs", "mbu"), ("read_gbs", "read_gbs_runs", "mbu_read")):
        assert all(gbs > 0 for gbs in bandwidth[runs])
        assert bandwidth[limit] == pytest.approx(statistics.median(bandwidth[runs]), abs=0.01)
        ratios = [bandwidth["bytes_per_step"] * rate / 1e9 / gbs for rate, gbs in zip(rates, bandwidth[runs])]
        assert bandwidth[mbu] == pytest.approx(statistics.median(ratios), rel=2e-2)  # the report rounds each
    missing = subprocess.run([sys.executable, "-m", "pagoda.cli", "bench", "latency", "--peer", "llamacpp"],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PAGODA_LLAMA_BENCH": str(tmp_path / "no-llama-bench")})
    assert missing.returncode == 2 and "scripts/build_llamacpp.sh" in missing.stderr, missing.stderr
    not_gguf = _bench("latency", "--peer", "llamacpp", "--model", "configs/qwen3-0.6b.json", "--load-format", "dummy")
    assert not_gguf.returncode == 2 and "--peer llamacpp needs a GGUF model" in not_gguf.stderr, not_gguf.stderr
    done = _bench("startup", "--repeats", "1", "--out", str(tmp_path / "s.json"), "--", "--kv-cache-gib", "0.5")
    assert done.returncode == 0, done.stderr
    startup = json.loads((tmp_path / "s.json").read_text())
    assert startup["serve_args"] == ["--kv-cache-gib", "0.5"] and startup["median_s"] > 0
