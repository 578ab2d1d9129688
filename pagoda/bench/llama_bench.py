"""llama.cpp's own ``llama-bench`` as the batch-1 peer of `pagoda bench latency --peer llamacpp`: the same
GGUF file, the same threads, decode measured at the same depth (``-d``: the prompt already in the KV
cache, as Pagoda's decode has it) and prefill of the same prompt length, each in its own process so
that a crash of one test (llama-bench's prompt test has segfaulted in one build here) keeps the other.

The binary: ``$PAGODA_LLAMA_BENCH``, else what `bash scripts/build_llamacpp.sh` builds.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

DEFAULT_BINARY = Path.home() / ".cache" / "pagoda" / "llama.cpp" / "build" / "bin" / "llama-bench"


def find_llama_bench() -> Path:
    path = Path(os.environ.get("PAGODA_LLAMA_BENCH", DEFAULT_BINARY))
    if not path.is_file():
        raise FileNotFoundError(f"llama-bench not found at {path}: run `bash scripts/build_llamacpp.sh` "
                                "or point PAGODA_LLAMA_BENCH at one (docs/peers.md)")
    return path


def _run_test(binary: Path, gguf: str, threads: int, repeats: int, args: list[str]) -> dict[str, Any]:
    cmd = [str(binary), "-m", gguf, "-t", str(threads), "-r", str(repeats), "-o", "json", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        return {"error": f"exit status {done.returncode}", "command": " ".join(cmd), "stderr": done.stderr[-600:]}
    (entry,) = json.loads(done.stdout)
    return {"tok_per_s": round(entry["avg_ts"], 1), "tok_per_s_stddev": round(entry["stddev_ts"], 1),
            "command": " ".join(cmd), "build": entry.get("build_commit"), "cpu": entry.get("cpu_info")}


def measure_llama_bench(gguf: str, input_len: int, output_len: int, repeats: int, threads: int) -> dict[str, Any]:
    """Decode tok/s at depth ``input_len`` and prefill tok/s of ``input_len`` tokens (TTFT = its time)."""
    binary = find_llama_bench()
    decode = _run_test(binary, gguf, threads, repeats, ["-p", "0", "-n", str(output_len), "-d", str(input_len)])
    prefill = _run_test(binary, gguf, threads, repeats, ["-p", str(input_len), "-n", "0"])
    result: dict[str, Any] = {"decode": decode, "prefill": prefill, "threads": threads}
    if "tok_per_s" in decode:
        result["decode_tok_per_s"] = decode["tok_per_s"]
    if "tok_per_s" in prefill:
        result["ttft_ms"] = round(1e3 * input_len / prefill["tok_per_s"], 1)
    return result
