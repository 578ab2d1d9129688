"""Greedy output of the attention backends side by side: the same prompts through each backend in turn.

    pagoda bench backends --model configs/qwen3-0.6b.json --load-format dummy --dtype float32

Every engine flag of `pagoda serve` applies (the backend flag is set per run). Each backend's engine is
built, run and dropped before the next, so a GPU holds one at a time. Exits 1 when any request's tokens
differ from the first backend's; the report gives, per request, the first position that differs. Exact
equality is expected in float32; in bf16 the backends round attention differently and near-ties may flip.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from pagoda.bench import free_device_memory, write_json
from pagoda.bench.workloads import DEFAULT_TOKEN_RANGE


def greedy_tokens(engine_args: dict[str, Any], prompts: list[list[int]],
                  output_len: int) -> tuple[list[list[int]], float]:
    """Each prompt's greedy tokens, and the seconds the generation took (the engine's start-up excluded)."""
    from pagoda import LLM, SamplingParams

    llm = LLM(**engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in prompts]
    # One short request first, so that kernel compilation (Triton's JIT) is not in the timing.
    llm.generate(requests[:1], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    started = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    del llm
    free_device_memory()
    return [list(o.outputs[0].token_ids) for o in outputs], seconds


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pagoda.cli import add_engine_args

    parser.add_argument("--backends", nargs="+", default=["torch", "triton"], choices=["torch", "triton"])
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, nargs=2, default=[16, 512], metavar=("LOW", "HIGH"))
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--prompt-seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--out", default=None, help="write the report here as JSON")
    add_engine_args(parser, positional_model=False)


def run(args: argparse.Namespace) -> int:
    from pagoda.cli import engine_kwargs

    if args.num_prompts < 1 or args.output_len < 1 or not 1 <= args.input_len[0] <= args.input_len[1]:
        raise ValueError("--num-prompts and --output-len must be >= 1 and --input-len LOW HIGH with 1 <= LOW <= HIGH")
    if len(set(args.backends)) < 2:
        raise ValueError("--backends needs two different backends to compare")
    rng = np.random.default_rng(args.prompt_seed)
    lo, hi = DEFAULT_TOKEN_RANGE
    prompts = [rng.integers(lo, hi + 1, int(rng.integers(args.input_len[0], args.input_len[1] + 1))).tolist()
               for _ in range(args.num_prompts)]
    engine_args = engine_kwargs(args)
    runs = {b: greedy_tokens({**engine_args, "attention_backend": b}, prompts, args.output_len)
            for b in args.backends}
    tokens = {b: run[0] for b, run in runs.items()}
    reference = args.backends[0]
    report: dict[str, Any] = {"engine_args": engine_args, "reference": reference, "num_prompts": len(prompts),
                              "output_len": args.output_len, "backends": {},
                              # one timed run each: a rough comparison, not a benchmark
                              "generate_seconds": {b: round(run[1], 3) for b, run in runs.items()}}
    all_equal = True
    for backend in args.backends[1:]:
        diffs = [first_difference(a, b) for a, b in zip(tokens[reference], tokens[backend])]
        equal = sum(d is None for d in diffs)
        all_equal &= equal == len(prompts)
        report["backends"][backend] = {"equal_requests": equal, "first_difference": diffs}
        print(f"{backend} vs {reference}: {equal}/{len(prompts)} requests token-for-token equal")
    report["all_equal"] = all_equal
    print(json.dumps(report))
    if args.out:
        write_json(args.out, report)
    return 0 if all_equal else 1

