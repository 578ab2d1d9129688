"""Batch-1 latency: time to first token and decode tokens/s for one request, repeated.

    pagoda bench latency --input-len 128 --output-len 128 --repeats 5

Prompts are random token ids (numpy seed 0); ignore_eos and greedy, so every run decodes exactly
--output-len tokens. Reports the median and the min-max spread over the repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np

from pagoda.bench import write_json


def measure(engine_args: dict[str, Any], input_len: int, output_len: int, repeats: int) -> dict[str, Any]:
    from pagoda import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(**engine_args)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    ttfts, decode_rates = [], []
    for i in range(repeats + 1):  # the first run warms up and is not counted
        prompt = {"prompt_token_ids": rng.integers(100, 49000, input_len).tolist()}
        start = time.perf_counter()
        stamps = [time.perf_counter() for _ in llm.generate_stream(prompt, params)]
        if i == 0:
            continue
        ttfts.append(stamps[0] - start)
        decode_rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {
        "engine_args": engine_args,
        "load_s": round(load_s, 2),
        "ttft_ms_median": round(statistics.median(ttfts) * 1e3, 1),
        "ttft_ms_range": [round(min(ttfts) * 1e3, 1), round(max(ttfts) * 1e3, 1)],
        "decode_tok_per_s_median": round(statistics.median(decode_rates), 1),
        "decode_tok_per_s_range": [round(min(decode_rates), 1), round(max(decode_rates), 1)],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-invariant", action="store_true", help="run the engine with batch_invariant=True")
    parser.add_argument("--out", default=None, help="write the results here as JSON")


def run(args: argparse.Namespace) -> int:
    for flag, value, least in (("--input-len", args.input_len, 1), ("--repeats", args.repeats, 1),
                               ("--output-len", args.output_len, 2)):  # 2: one token after the first
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    engine_args = {"batch_invariant": True} if args.batch_invariant else {}
    result = measure(engine_args, args.input_len, args.output_len, args.repeats)
    print(json.dumps(result))
    if args.out:
        write_json(args.out, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
