"""Batch-1 latency: time to first token and decode tokens/s for one request, repeated.

    pagoda bench latency --input-len 128 --output-len 128 --repeats 5
    pagoda bench latency --model configs/llama-3.1-8b.json --load-format dummy --mbu
    pagoda bench latency --peer llamacpp      # llama.cpp's llama-bench on the same GGUF, same run

Prompts are random token ids (numpy seed 0); ignore_eos and greedy, so every run decodes exactly
--output-len tokens. Reports the median and the min-max spread over the repeats. Every engine flag of
`pagoda serve` applies. --mbu adds the model bandwidth utilization: bytes read per decode step (weights
and the KV cache so far) times steps per second, over the bandwidth of a large device-to-device copy
(bytes read + written; `mbu`) and over that of reading a large buffer (`mbu_read`: a decode step only reads);
the weight bytes are those of the loaded model's parameters (a GGUF file's blocks where they run as stored).
On the CPU both bandwidths are measured just before each repeat and each repeat's rate is set against its own
(a VM's bandwidth drifts by up to 1.5x within minutes); the MBUs are the medians of those ratios. On a GPU,
whose memory the engine holds, they are measured once after the repeats. --peer llamacpp runs llama.cpp's
`llama-bench` (pagoda/bench/llama_bench.py) on the same file with as many threads as torch uses, and
reports the ratios; it implies --mbu.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pagoda.bench import write_json


@dataclass
class BandwidthProbe:
    """Copy and read bandwidth (GB/s) of a ``buffer_mib`` buffer, measured at each call."""

    device: str
    buffer_mib: int
    copy_gbs: list[float] = field(default_factory=list)
    read_gbs: list[float] = field(default_factory=list)

    def __call__(self) -> None:
        import torch

        from pagoda.bench.roofline import measure_copy_bandwidth, measure_read_bandwidth

        self.copy_gbs.append(measure_copy_bandwidth(torch.device(self.device), self.buffer_mib, PROBE_REPEATS))
        self.read_gbs.append(measure_read_bandwidth(torch.device(self.device), self.buffer_mib, PROBE_REPEATS))


# Best of this many passes per probe: three 512 MiB passes take ~0.1 s on the CPU, beside a repeat's ~0.5 s.
PROBE_REPEATS = 3


def measure(engine_args: dict[str, Any], input_len: int, output_len: int, repeats: int,
            probe: BandwidthProbe | None = None) -> dict[str, Any]:
    """TTFT and decode rate of ``repeats`` requests after a warm-up one; ``probe`` runs before each."""
    from pagoda import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(**engine_args)
    load_s = time.perf_counter() - t0
    weight_bytes = decode_weight_bytes(llm.engine.runner.model)
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    ttfts, decode_rates = [], []
    for i in range(repeats + 1):  # the first run warms up and is not counted
        prompt = {"prompt_token_ids": rng.integers(100, 49000, input_len).tolist()}
        if i and probe is not None:
            probe()
        start = time.perf_counter()
        stamps = [time.perf_counter() for _ in llm.generate_stream(prompt, params)]
        if i == 0:
            continue
        ttfts.append(stamps[0] - start)
        decode_rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {
        "engine_args": engine_args,
        "load_s": round(load_s, 2),
        "decode_weight_bytes": weight_bytes,
        "ttft_ms_median": round(statistics.median(ttfts) * 1e3, 1),
        "ttft_ms_range": [round(min(ttfts) * 1e3, 1), round(max(ttfts) * 1e3, 1)],
        "decode_tok_per_s_median": round(statistics.median(decode_rates), 1),
        "decode_tok_per_s_range": [round(min(decode_rates), 1), round(max(decode_rates), 1)],
        "decode_tok_per_s_runs": [round(rate, 2) for rate in decode_rates],
    }


def decode_weight_bytes(model: Any) -> int:
    """Weight bytes one decode step reads: every parameter, except an untied embedding table (one row)."""
    skip = model.embed_tokens.weight if model.lm_head is not None else None
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not skip)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pagoda.cli import add_engine_args

    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mbu", action="store_true", help="also measure copy and read bandwidth and report the MBU")
    parser.add_argument("--copy-mib", type=int, default=None,
                        help="copy- and read-bandwidth buffer (default: 4096 MiB on a GPU, 512 on the CPU)")
    parser.add_argument("--peer", choices=["llamacpp"], default=None,
                        help="also run llama.cpp's llama-bench on the same GGUF file (docs/peers.md)")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    add_engine_args(parser, positional_model=False)


def bandwidth_utilization(result: dict[str, Any], engine_args: dict[str, Any], input_len: int, output_len: int,
                          probe: BandwidthProbe) -> dict[str, Any]:
    """MBU of the measured decode rates against the probe's copy and read bandwidths: repeat by repeat where it
    ran before each (the median ratio), else against one measurement taken now."""
    import torch

    from pagoda.bench.roofline import DTYPE_BYTES, ModelFootprint
    from pagoda.config import ModelConfig
    from pagoda.model.loader import default_dtype, load_arch

    dtype = engine_args.get("dtype", "auto")
    if dtype == "auto":
        dtype = str(default_dtype(probe.device)).removeprefix("torch.")
    footprint = ModelFootprint.of(load_arch(engine_args.get("model", ModelConfig().model)), DTYPE_BYTES[dtype])
    rates = result["decode_tok_per_s_runs"]
    paired = len(probe.read_gbs) == len(rates)  # it ran before each repeat
    if not paired:
        probe()
    # The KV read grows by one token per step: on average the prompt plus half the output.
    kv_bytes = (input_len + output_len / 2) * footprint.kv_bytes_per_token
    step_bytes = result["decode_weight_bytes"] + kv_bytes

    def utilization(limits: list[float]) -> float:
        return statistics.median(step_bytes * rate / 1e9 / (limits[i] if paired else limits[0])
                                 for i, rate in enumerate(rates))

    return {
        "device": torch.cuda.get_device_name() if probe.device == "cuda" else "cpu",
        "dtype": dtype,
        "bytes_per_step": int(step_bytes),
        "tpot_ms_median": round(1e3 / result["decode_tok_per_s_median"], 3),
        "achieved_gbs": round(step_bytes * result["decode_tok_per_s_median"] / 1e9, 1),
        "paired_with_repeats": paired,
        "copy_gbs": round(statistics.median(probe.copy_gbs), 2),
        "copy_gbs_runs": probe.copy_gbs,
        "mbu": round(utilization(probe.copy_gbs), 3),
        "read_gbs": round(statistics.median(probe.read_gbs), 2),
        "read_gbs_runs": probe.read_gbs,
        "mbu_read": round(utilization(probe.read_gbs), 3),
    }


def run(args: argparse.Namespace) -> int:
    from pagoda.cli import engine_kwargs

    for flag, value, least in (("--input-len", args.input_len, 1), ("--repeats", args.repeats, 1),
                               ("--output-len", args.output_len, 2)):  # 2: one token after the first
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    engine_args = engine_kwargs(args)
    gguf = _peer_gguf(engine_args) if args.peer else None  # refused before the long part
    if gguf is not None:
        from pagoda.bench.llama_bench import find_llama_bench

        find_llama_bench()
    probe = None
    if args.mbu or args.peer:
        from pagoda.config import ModelConfig
        from pagoda.engine.worker.worker import resolve_device

        device = resolve_device(engine_args.get("device", ModelConfig().device))
        probe = BandwidthProbe(device, args.copy_mib or (4096 if device == "cuda" else 512))
    result = measure(engine_args, args.input_len, args.output_len, args.repeats,
                     probe if probe is not None and probe.device == "cpu" else None)
    if probe is not None:
        result["bandwidth"] = bandwidth_utilization(result, engine_args, args.input_len, args.output_len, probe)
    if gguf is not None:
        result["llamacpp"] = _compare_llama_bench(result, gguf, args)
    print(json.dumps(result))
    if args.out:
        write_json(args.out, result)
    return 0


def _peer_gguf(engine_args: dict[str, Any]) -> str:
    from pagoda.config import ModelConfig
    from pagoda.model.loader import resolve_model

    source = resolve_model(engine_args.get("model", ModelConfig().model))
    if source.kind != "gguf":
        raise ValueError(f"--peer llamacpp needs a GGUF model (llama-bench reads GGUF), got {source.path}")
    return str(source.path)


def _compare_llama_bench(result: dict[str, Any], gguf: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pagoda.bench.llama_bench import measure_llama_bench

    peer = measure_llama_bench(gguf, args.input_len, args.output_len, args.repeats, torch.get_num_threads())
    if "decode_tok_per_s" in peer:
        peer["pagoda_decode_ratio"] = round(result["decode_tok_per_s_median"] / peer["decode_tok_per_s"], 3)
        bandwidth = result["bandwidth"]
        # The same file's blocks: llama.cpp reads what Pagoda's native path reads, KV aside.
        achieved = bandwidth["bytes_per_step"] * peer["decode_tok_per_s"] / 1e9
        peer["mbu"] = round(achieved / bandwidth["copy_gbs"], 3)
        peer["mbu_read"] = round(achieved / bandwidth["read_gbs"], 3)
    if "ttft_ms" in peer:
        peer["pagoda_ttft_ratio"] = round(result["ttft_ms_median"] / peer["ttft_ms"], 3)
    return peer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
