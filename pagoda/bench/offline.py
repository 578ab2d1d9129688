"""`pagoda bench offline`: throughput of the in-process engine on a named workload, with peers on the same
prompts and weights in the same run.

    pagoda bench offline --workload offline-256 --peer hf --peer llamacpp

Metric: generated tokens / wall seconds, with all requests submitted at once. The HF peer runs
`generate` in static batches of 64 sorted by prompt length (bf16, same weights), each batch run to its
longest requested output; only the requested tokens count as useful output. The llama.cpp peer
(`pagoda-llm[peers]`) runs the same GGUF file with its own quantized kernels and continuous batching.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

from tqdm import tqdm

from pagoda.bench import write_json
from pagoda.bench.workloads import WORKLOADS, OfflineWorkload
from pagoda.config import ModelConfig


def run_pagoda(workload: OfflineWorkload, engine_args: dict[str, Any]) -> dict[str, Any]:
    from pagoda import LLM, SamplingParams

    prompts, out_lens = workload.build()
    t0 = time.perf_counter()
    llm = LLM(**engine_args)
    load_s = time.perf_counter() - t0
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=n) for n in out_lens]
    t0 = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    wall = time.perf_counter() - t0
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert generated == sum(out_lens), "every request must produce exactly its max_tokens"
    return {
        "system": "pagoda",
        "engine_args": engine_args,
        "load_s": round(load_s, 2),
        "wall_s": round(wall, 2),
        "output_tokens": generated,
        "prompt_tokens": sum(len(p) for p in prompts),
        "output_tok_per_s": round(generated / wall, 1),
        "preemptions": llm.engine.scheduler.num_preemptions,
        "steps": llm.engine.stats.num_steps,
    }


def run_hf(workload: OfflineWorkload, batch_size: int = 64) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from pagoda.model.loader import resolve_model

    path = resolve_model(ModelConfig().model).path
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - t0
    prompts, out_lens = workload.build()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad = 2
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(order), batch_size), desc="hf batches"):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        new = max(out_lens[i] for i in idx)
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=pad)
    wall = time.perf_counter() - t0
    useful = sum(out_lens)
    return {
        "system": "hf-transformers",
        "dtype": "bfloat16",
        "batch_size": batch_size,
        "load_s": round(load_s, 2),
        "wall_s": round(wall, 2),
        "output_tokens": useful,
        "output_tok_per_s": round(useful / wall, 1),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default="offline-256", choices=sorted(WORKLOADS))
    parser.add_argument("--peer", action="append", choices=["hf", "llamacpp"], default=[],
                        help="also run this peer on the same prompts (repeatable)")
    parser.add_argument("--kv-cache-gib", type=float, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--llamacpp-slots", type=int, default=64, help="parallel sequences for the llama.cpp peer")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def run(args: argparse.Namespace) -> int:
    import torch

    workload = WORKLOADS[args.workload]
    engine_args = {k: v for k, v in {
        "kv_cache_gib": args.kv_cache_gib,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
    }.items() if v is not None}
    results: dict[str, Any] = {"workload": workload.name,
                               "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
                               "pagoda": run_pagoda(workload, engine_args)}
    print(json.dumps(results["pagoda"]))
    for peer in dict.fromkeys(args.peer):
        if peer == "hf":
            results["hf"] = run_hf(workload)
        else:
            from pagoda.bench.llamacpp_peer import run_llamacpp
            from pagoda.model.loader import resolve_model

            prompts, out_lens = workload.build()
            results["llamacpp"] = run_llamacpp(str(resolve_model(ModelConfig().model).path), prompts, out_lens,
                                               slots=args.llamacpp_slots)
        print(json.dumps(results[peer]))
        ratio = round(results["pagoda"]["output_tok_per_s"] / results[peer]["output_tok_per_s"], 2)
        results[f"ratio_vs_{peer}"] = ratio
        print(f"pagoda / {results[peer]['system']} = {ratio}x")
    if args.out:
        write_json(args.out, results)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
