"""Batch-1 decode of this checkout against another commit's, as two engines in one process, request by request
alternating: on a VM whose speed drifts by 10-50% over minutes, separate processes cannot resolve a few percent.

    python scripts/ab_engine.py --against HEAD~1                    # 24 rounds, each engine made first once
    python scripts/ab_engine.py --against 9defabf --rounds 40 --input-len 1500 --kv-cache-dtype int8

The other commit's ``pagoda`` package is copied out under another name (its imports rewritten). When its C++
sources equal this checkout's both engines load the same build; otherwise its kernels build beside this one's
(``pagoda_cpu_ops_against``, a few minutes the first time). Each round runs one request (random token ids,
greedy, ``ignore_eos``) on each engine, in alternating order; the report is the paired median of the speed
ratios with quartiles, per creation order (the engine made first lands in other memory, which can differ by a
few percent) and for both orders together.
"""

from __future__ import annotations

import argparse
import filecmp
import gc
import importlib
import io
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
AGAINST = "pagoda_against"
IMPORTS = re.compile(r"\b(from|import) pagoda(?=[. \n])")


def export_package(rev: str, into: Path) -> Path:
    """``rev``'s pagoda package as ``into/pagoda_against``; its kernels named apart when its sources differ."""
    archive = subprocess.run(["git", "archive", rev, "pagoda"], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    package = into / AGAINST
    (into / "pagoda").rename(package)
    for path in package.rglob("*.py"):
        text = path.read_text()
        path.write_text(IMPORTS.sub(rf"\1 {AGAINST}", text).replace('"pagoda.', f'"{AGAINST}.'))
    ours, theirs = REPO / "pagoda" / "csrc", package / "csrc"
    same = filecmp.dircmp(ours, theirs)
    if not (same.left_only or same.right_only or same.diff_files or same.funny_files):
        kernels = package / "model" / "cpu_kernels.py"  # the same sources: the same build, from this checkout's path
        kernels.write_text(re.sub(r"^_CSRC = .*$", f"_CSRC = Path({str(ours)!r})", kernels.read_text(), flags=re.M))
    else:
        kernels = package / "model" / "cpu_kernels.py"
        kernels.write_text(kernels.read_text().replace('name="pagoda_cpu_ops"', 'name="pagoda_cpu_ops_against"'))
    return package


def decode_seconds_per_token(llm: Any, module: ModuleType, prompt: list[int], output_len: int) -> float:
    params = module.SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    stamps = [time.perf_counter() for _ in llm.generate_stream({"prompt_token_ids": prompt}, params)]
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def paired(this: list[float], against: list[float]) -> str:
    ratios = [a / t for t, a in zip(this, against)]  # seconds per token: > 1 when this checkout is faster
    q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return (f"TPOT this {1e3 * statistics.median(this):.3f} ms, against {1e3 * statistics.median(against):.3f} ms; "
            f"this / against speed {median:.3f} (quartiles {q1:.3f}-{q3:.3f}, {len(ratios)} rounds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="a commit (anything `git archive` takes)")
    parser.add_argument("--rounds", type=int, default=24, help="rounds per creation order")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--model", default=None, help="default: the bundled model")
    parser.add_argument("--kv-cache-dtype", default="auto")
    args = parser.parse_args()
    if args.rounds < 2 or args.input_len < 1 or args.output_len < 2:
        raise SystemExit("--rounds and --output-len must be >= 2, --input-len >= 1")
    sha = subprocess.run(["git", "rev-parse", args.against], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    # One folder per commit: a differing kernel build is then found again by the next run instead of rebuilt.
    folder = Path(tempfile.gettempdir()) / f"pagoda-ab-{sha[:12]}"
    shutil.rmtree(folder, ignore_errors=True)
    export_package(sha, folder)
    sys.path.insert(0, str(folder))
    modules = {"this": importlib.import_module("pagoda"), "against": importlib.import_module(AGAINST)}
    from pagoda.model.loader import resolve_model

    model = args.model or str(resolve_model("smollm2-135m").path)
    engine_args = {"kv_cache_dtype": args.kv_cache_dtype, "max_model_len": args.input_len + args.output_len + 16}
    rng = np.random.default_rng(0)
    both: dict[str, list[float]] = {"this": [], "against": []}
    for first in ("against", "this"):
        second = "this" if first == "against" else "against"
        engines = {first: modules[first].LLM(model, **engine_args)}
        engines[second] = modules[second].LLM(model, **engine_args)
        times: dict[str, list[float]] = {"this": [], "against": []}
        for rnd in range(args.rounds + 1):  # the first round warms both up
            prompt = rng.integers(100, 49000, args.input_len).tolist()
            for name in (("this", "against") if rnd % 2 else ("against", "this")):
                seconds = decode_seconds_per_token(engines[name], modules[name], prompt, args.output_len)
                if rnd:
                    times[name].append(seconds)
        print(f"{first} made first: {paired(times['this'], times['against'])}", flush=True)
        for name in both:
            both[name] += times[name]
        del engines
        gc.collect()
    print(f"both orders: {paired(both['this'], both['against'])}")


if __name__ == "__main__":
    main()
