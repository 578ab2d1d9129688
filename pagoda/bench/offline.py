"""`pagoda bench offline`: throughput of the in-process engine on a named workload, with peers on the same
prompts and weights in the same run.

    pagoda bench offline --workload offline-256 --peer hf --peer llamacpp
    pagoda bench offline --workload gpu-1000 --model configs/llama-3.1-8b.json --load-format dummy --peer hf

Every engine flag of `pagoda serve` applies (--model, --device, --kv-cache-gib, --enforce-eager, ...).
Metric: generated tokens / wall seconds, with all requests submitted at once. The HF peer runs
`generate` in static batches of 64 sorted by prompt length (bf16, same weights, or for a bare config the
same shapes), each batch run to its longest requested output; only the requested tokens count as useful
output. The llama.cpp peer
(`pagoda-llm[peers]`) runs the same GGUF file with its own quantized kernels and continuous batching.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

from tqdm import tqdm

from pagoda.bench import free_device_memory, write_json
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
    preemptions, steps = llm.engine.scheduler.num_preemptions, llm.engine.stats.num_steps
    del llm, outputs
    free_device_memory()  # a GPU peer after this needs the memory
    return {
        "system": "pagoda",
        "engine_args": engine_args,
        "load_s": round(load_s, 2),
        "wall_s": round(wall, 2),
        "output_tokens": generated,
        "prompt_tokens": sum(len(p) for p in prompts),
        "output_tok_per_s": round(generated / wall, 1),
        "preemptions": preemptions,
        "steps": steps,
    }


def load_hf_peer(model_name: str, load_format: str, device: str) -> Any:
    """The same model in HF transformers (bf16): the GGUF or folder it loads, or for a bare config the same
    shapes with HF's own random weights (throughput does not depend on the values)."""
    import torch
    import transformers

    from pagoda.model.loader import resolve_model

    source = resolve_model(model_name)
    with torch.device(device):
        if source.kind == "gguf":
            return transformers.AutoModelForCausalLM.from_pretrained(
                str(source.path.parent), gguf_file=source.path.name, dtype=torch.bfloat16).eval().to(device)
        if source.kind == "folder" and load_format != "dummy":
            return transformers.AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.bfloat16).eval()
        config_path = source.path if source.kind == "config" else source.path / "config.json"
        data = json.loads(config_path.read_text())
        model_class = getattr(transformers, data["architectures"][0])
        config = model_class.config_class(**data)
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def run_hf(workload: OfflineWorkload, model_name: str, load_format: str, device: str, batch_size: int = 64,
           num_requests: int | None = None) -> dict[str, Any]:
    """``num_requests``: only the first N of the workload (HF is slow; its rate is what is compared)."""
    import torch

    t0 = time.perf_counter()
    model = load_hf_peer(model_name, load_format, device)
    load_s = time.perf_counter() - t0
    prompts, out_lens = workload.build()
    if num_requests is not None:
        prompts, out_lens = prompts[:num_requests], out_lens[:num_requests]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad = 2
    _sync(device)
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
            model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=pad)
    _sync(device)
    wall = time.perf_counter() - t0
    useful = sum(out_lens)
    return {
        "system": "hf-transformers",
        "dtype": "bfloat16",
        "device": device,
        "batch_size": batch_size,
        "requests": len(prompts),
        "load_s": round(load_s, 2),
        "wall_s": round(wall, 2),
        "output_tokens": useful,
        "output_tok_per_s": round(useful / wall, 1),
    }


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pagoda.cli import add_engine_args

    parser.add_argument("--workload", default="offline-256", choices=sorted(WORKLOADS))
    parser.add_argument("--peer", action="append", choices=["hf", "llamacpp"], default=[],
                        help="also run this peer on the same prompts (repeatable)")
    parser.add_argument("--hf-batch-size", type=int, default=64, help="static batch size of the HF peer")
    parser.add_argument("--hf-num-requests", type=int, default=None,
                        help="run the HF peer on the workload's first N requests only (it is slow)")
    parser.add_argument("--llamacpp-slots", type=int, default=64, help="parallel sequences for the llama.cpp peer")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    add_engine_args(parser, positional_model=False)


def run(args: argparse.Namespace) -> int:
    import torch

    from pagoda.cli import engine_kwargs
    from pagoda.engine.worker.worker import resolve_device

    workload = WORKLOADS[args.workload]
    engine_args = engine_kwargs(args)
    model_name = engine_args.get("model", ModelConfig().model)
    device = resolve_device(engine_args.get("device", ModelConfig().device))
    machine = f"{platform.machine()} {torch.get_num_threads()} threads"
    if device == "cuda":
        machine = f"{torch.cuda.get_device_name()} ({machine})"
    results: dict[str, Any] = {"workload": workload.name, "machine": machine,
                               "pagoda": run_pagoda(workload, engine_args)}
    print(json.dumps(results["pagoda"]))
    for peer in dict.fromkeys(args.peer):
        if peer == "hf":
            results["hf"] = run_hf(workload, model_name, engine_args.get("load_format", "auto"), device,
                                   args.hf_batch_size, args.hf_num_requests)
        else:
            from pagoda.bench.llamacpp_peer import run_llamacpp
            from pagoda.model.loader import resolve_model

            prompts, out_lens = workload.build()
            results["llamacpp"] = run_llamacpp(str(resolve_model(model_name).path), prompts, out_lens,
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
