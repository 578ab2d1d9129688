"""Speculative decoding on against off, in the same run: decode tok/s, TPOT p50/p99 and acceptance.

    pagoda bench spec --speculative-config '{"method": "ngram", "num_speculative_tokens": 5}'
    pagoda bench spec --workloads grounded random --repeats 3 --out results/spec.json

Workloads: ``grounded``, batch 1: the prompts the project ships (pagoda/data/spec_prompts.json: edit, repeat,
extract and summarize a given text, rewrite given code), chat-templated, greedy, up to --output-len tokens;
``random``, batch 1: random token ids (numpy seed 0, --input-len of them), greedy, ignore_eos, exactly
--output-len tokens; ``mixed``: --batch requests at once, half the grounded prompts again and half random ones.
The two engines (same flags, speculation off and on) are loaded side by side and every request runs on both,
back to back and in alternating order, so that both see the same machine state. Decode tok/s is the tokens
after the first over the time from the first to the last token, summed over a workload's requests (the mixed
batch: output tokens over wall time), and ``speedup`` their ratio; ``speedup_paired_median`` (batch-1 workloads)
is the median over requests of the ratio of each request's two times per token. TPOT is per request. Batch-1
greedy outputs must be identical on and off (a difference fails the run); in a batch, bf16 kernels round
differently at other row counts, so a few outputs that part at a near-tie are counted, not failed
(batch_invariant=True makes them identical).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from pagoda.bench import write_json

PROMPTS = Path(__file__).parents[1] / "data" / "spec_prompts.json"
DEFAULT_SPEC = {"method": "ngram", "num_speculative_tokens": 5}
WORKLOADS = ("grounded", "random", "mixed")


def grounded_prompts(tokenizer: Any) -> list[dict[str, list[int]]]:
    tasks = json.loads(PROMPTS.read_text())["grounded"]
    return [{"prompt_token_ids": tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": t["prompt"]}]), add_special_tokens=False)} for t in tasks]


def random_prompts(count: int, input_len: int) -> list[dict[str, list[int]]]:
    rng = np.random.default_rng(0)
    return [{"prompt_token_ids": rng.integers(100, 49000, input_len).tolist()} for _ in range(count)]


def run_batch(llm: Any, prompts: list[dict[str, list[int]]], params: list[Any]) -> list[dict[str, Any]]:
    """Per request: its tokens and decode times (monotonic marks from the engine), and the batch's wall time."""
    results = []
    started = time.perf_counter()
    finished = llm.generate(prompts, params, use_tqdm=False)
    wall_s = time.perf_counter() - started
    for out in finished:
        m = out.metrics
        tokens = out.outputs[0].token_ids
        decode_s = (m.last_token - m.first_token) if m and m.first_token and m.last_token else 0.0
        results.append({"tokens": tokens, "decode_s": decode_s, "batch_wall_s": wall_s / len(finished)})
    return results


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch 1: decode tok/s over the requests' decode times; every workload: output tok/s over wall time."""
    decoded = [r for r in results if len(r["tokens"]) > 1 and r["decode_s"] > 0]
    tpots = sorted(r["decode_s"] / (len(r["tokens"]) - 1) * 1e3 for r in decoded)
    tokens = sum(len(r["tokens"]) - 1 for r in decoded)
    seconds = sum(r["decode_s"] for r in decoded)
    wall = sum(r["batch_wall_s"] for r in results)
    return {
        "requests": len(results),
        "output_tok_per_s": round(sum(len(r["tokens"]) for r in results) / wall, 1),
        "decode_tokens": tokens,
        "decode_tok_per_s": round(tokens / seconds, 1) if seconds else None,
        "tpot_ms_p50": round(float(np.percentile(tpots, 50)), 2) if tpots else None,
        "tpot_ms_p99": round(float(np.percentile(tpots, 99)), 2) if tpots else None,
    }


def paired_speedup(off: list[dict[str, Any]], on: list[dict[str, Any]]) -> float | None:
    """The median over requests of off's time per decoded token over on's, each request's two runs back to back
    (what the VM's drift moves least)."""
    ratios = [(a["decode_s"] / (len(a["tokens"]) - 1)) / (b["decode_s"] / (len(b["tokens"]) - 1))
              for a, b in zip(off, on) if len(a["tokens"]) > 1 and len(b["tokens"]) > 1 and a["decode_s"] > 0
              and b["decode_s"] > 0]
    return round(float(np.median(ratios)), 3) if ratios else None


def acceptance(llm: Any, before: tuple[int, int, int]) -> dict[str, Any]:
    spec = llm.engine.scheduler.spec
    drafts, proposed, accepted = (spec.num_drafts - before[0], spec.num_draft_tokens - before[1],
                                  spec.num_accepted_tokens - before[2])
    return {"draft_steps": drafts, "draft_tokens": proposed, "accepted_tokens": accepted,
            "acceptance_rate": round(accepted / proposed, 3) if proposed else None,
            "mean_acceptance_length": round(1 + accepted / drafts, 2) if drafts else None}


def counters(llm: Any) -> tuple[int, int, int]:
    spec = llm.engine.scheduler.spec
    return spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens


def measure(engine_args: dict[str, Any], spec_config: dict[str, Any], workloads: list[str], input_len: int,
            output_len: int, batch: int, repeats: int) -> dict[str, Any]:
    from tqdm import tqdm

    from pagoda import LLM, SamplingParams

    off = LLM(**engine_args)
    on = LLM(**engine_args, speculative_config=spec_config)
    tokenizer = off.get_tokenizer()
    grounded = grounded_prompts(tokenizer)
    random = random_prompts(max(batch, 8), input_len)
    greedy = SamplingParams(temperature=0.0, max_tokens=output_len)
    fixed = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    plans = {  # workload -> batches of (prompts, params)
        "grounded": [([p], [greedy]) for p in grounded],
        "random": [([p], [fixed]) for p in random[:8]],
        "mixed": [([grounded[i % len(grounded)] for i in range(batch // 2)] + random[: batch - batch // 2],
                   [greedy] * (batch // 2) + [fixed] * (batch - batch // 2))],
    }
    for llm in (off, on):  # warm-up: kernels, allocations, the step-cost fit
        run_batch(llm, *plans["grounded"][0])
    report: dict[str, Any] = {"engine_args": engine_args, "speculative_config": spec_config, "workloads": {}}
    for name in workloads:
        results: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        before = counters(on)
        mismatches = 0
        steps = [b for _ in range(repeats) for b in plans[name]]
        for index, (prompts, params) in enumerate(tqdm(steps, desc=f"spec bench {name}", unit="batch")):
            order = (("off", off), ("on", on)) if index % 2 == 0 else (("on", on), ("off", off))
            got = {mode: run_batch(llm, prompts, params) for mode, llm in order}
            mismatches += sum(a["tokens"] != b["tokens"] for a, b in zip(got["off"], got["on"]))
            for mode in got:
                results[mode] += got[mode]
        summary = {mode: summarize(rs) for mode, rs in results.items()}
        rate = "output_tok_per_s" if name == "mixed" else "decode_tok_per_s"  # a batch: its throughput
        rates = [summary[m][rate] for m in ("on", "off")]
        report["workloads"][name] = {
            **summary,
            "speedup": round(rates[0] / rates[1], 3) if all(rates) else None,
            "speedup_of": rate,
            "speedup_paired_median": paired_speedup(results["off"], results["on"]) if name != "mixed" else None,
            "acceptance": acceptance(on, before),
            "outputs_differing": mismatches,
        }
        print(json.dumps({name: report["workloads"][name]}), flush=True)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pagoda.cli import add_engine_args

    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--input-len", type=int, default=128, help="random prompts' length")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64, help="requests of the mixed workload")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    add_engine_args(parser, positional_model=False)


def run(args: argparse.Namespace) -> int:
    from pagoda.cli import engine_kwargs
    from pagoda.config import SpeculativeConfig

    for flag, value, least in (("--input-len", args.input_len, 1), ("--output-len", args.output_len, 2),
                               ("--batch", args.batch, 2), ("--repeats", args.repeats, 1)):
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    engine_args = engine_kwargs(args)
    spec = engine_args.pop("speculative_config", None) or DEFAULT_SPEC
    spec_config = {k: v for k, v in vars(SpeculativeConfig.parse(spec)).items() if v is not None}
    report = measure(engine_args, spec_config, args.workloads, args.input_len, args.output_len, args.batch,
                     args.repeats)
    if args.out:
        write_json(args.out, report)
    return 1 if any(w["outputs_differing"] for name, w in report["workloads"].items() if name != "mixed") else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
