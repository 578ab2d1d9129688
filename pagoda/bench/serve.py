"""`pagoda bench serve`: load an OpenAI-compatible server (Pagoda, llama.cpp's llama-server, vLLM) and
measure on the client side while streaming.

    pagoda bench serve --url http://127.0.0.1:8000 --concurrency 8 --num-prompts 64
    pagoda bench serve --url http://127.0.0.1:8000 --request-rate 2 --dataset shared-prefix

Requests go to /v1/completions (token-id or text prompts) or /v1/chat/completions (JSONL "messages"),
streamed with usage. With --concurrency N, N requests are in flight at all times; with --request-rate R,
requests start as a Poisson process of R per second (seeded). The run sends --warmup requests first (not
counted), then at most --num-prompts requests, and starts none after --max-duration seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from pagoda.bench import workloads, write_json
from pagoda.bench.stats import RequestRecord, ServeSummary, summarize, throughput_timeline

DEFAULT_REQUEST_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class LoadShape:
    """How requests are issued: a fixed number in flight, or a Poisson arrival rate."""

    concurrency: int | None
    request_rate: float | None
    num_prompts: int
    max_duration_s: float | None
    warmup: int
    seed: int

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.request_rate is None):
            raise ValueError("give exactly one of concurrency and request_rate")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.request_rate is not None and not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0, got {self.request_rate}")
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if self.max_duration_s is not None and not self.max_duration_s > 0:
            raise ValueError(f"max_duration must be > 0, got {self.max_duration_s}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


@dataclass(frozen=True)
class Target:
    url: str
    model: str
    api_key: str | None
    ignore_eos: bool
    timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    temperature: float = 0.0
    sampling_seed: int | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def request_body(target: Target, req: workloads.BenchRequest) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"model": target.model, "max_tokens": req.max_tokens, "temperature": target.temperature,
                            "stream": True, "stream_options": {"include_usage": True}}
    if target.sampling_seed is not None:
        body["seed"] = target.sampling_seed
    if target.ignore_eos:
        body["ignore_eos"] = True  # vLLM, llama-server and Pagoda accept it; OpenAI itself does not
    if req.messages is not None:
        return "/v1/chat/completions", {**body, "messages": req.messages}
    return "/v1/completions", {**body, "prompt": req.prompt}


def _chunk_text(chunk: dict[str, Any]) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return text


async def send_one(http: httpx.AsyncClient, target: Target, req: workloads.BenchRequest) -> RequestRecord:
    """One streamed request; failures are recorded, never raised."""
    path, body = request_body(target, req)
    record = RequestRecord(prompt_tokens=req.prompt_tokens, start=time.perf_counter())
    chunks = 0
    usage_tokens: int | None = None
    try:
        async with http.stream("POST", target.url + path, json=body, headers=target.headers(),
                               timeout=target.timeout_s) as response:
            record.status = str(response.status_code)
            if response.status_code != 200:
                record.error = (await response.aread()).decode(errors="replace")[:500]
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        record.error = json.dumps(chunk["error"])[:500]
                        break
                    if _chunk_text(chunk):
                        record.chunk_times.append(time.perf_counter())
                        chunks += 1
                    usage = chunk.get("usage")
                    if usage:
                        usage_tokens = usage.get("completion_tokens", usage_tokens)
                        record.prompt_tokens = usage.get("prompt_tokens") or record.prompt_tokens
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        record.status = record.status or f"error:{type(exc).__name__}"
        record.error = f"{type(exc).__name__}: {exc}"[:500]
    record.end = time.perf_counter()
    # Without usage (a server that ignores stream_options) each output chunk counts as one token.
    record.output_tokens = usage_tokens if usage_tokens is not None else chunks
    return record


async def run_load(target: Target, requests: list[workloads.BenchRequest], shape: LoadShape,
                   progress: bool = True) -> tuple[list[RequestRecord], float, float]:
    """Issue ``requests`` in the given shape; returns the records, the measured phase's start and duration."""
    limits = httpx.Limits(max_connections=max(shape.concurrency or 0, 256), max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=target.timeout_s) as http:
        if shape.warmup:
            warm = requests[: shape.warmup]
            width = shape.concurrency or min(len(warm), 8)
            for i in range(0, len(warm), width):
                await asyncio.gather(*(send_one(http, target, r) for r in warm[i : i + width]))
        measured = requests[shape.warmup : shape.warmup + shape.num_prompts]
        bar = tqdm(total=len(measured), desc="requests", unit="req", disable=not progress)
        rng = np.random.default_rng(shape.seed)
        gate = asyncio.Semaphore(shape.concurrency) if shape.concurrency else None
        records: list[RequestRecord] = []
        origin = time.perf_counter()

        async def one(req: workloads.BenchRequest) -> None:
            if gate is None:
                record = await send_one(http, target, req)
            else:
                async with gate:
                    record = await send_one(http, target, req)
            records.append(record)
            bar.update(1)

        tasks = []
        for req in measured:
            if gate is not None:
                await gate.acquire()  # start the next one only when a slot is free, so the duration bound holds
                gate.release()
            else:
                assert shape.request_rate is not None
                await asyncio.sleep(float(rng.exponential(1.0 / shape.request_rate)))
            if shape.max_duration_s is not None and time.perf_counter() - origin >= shape.max_duration_s:
                break
            tasks.append(asyncio.create_task(one(req)))
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - origin
        bar.close()
    return records, origin, duration


def resolve_model(url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url + "/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise ValueError(f"cannot reach {url}: {exc}") from None
    if response.status_code != 200:
        raise ValueError(f"GET {url}/v1/models answered {response.status_code}: {response.text[:200]}")
    data = response.json().get("data") or []
    if not data:
        raise ValueError(f"{url}/v1/models lists no model; pass --model")
    return str(data[0]["id"])


def format_table(summary: ServeSummary) -> str:
    rows = [
        ("duration (s)", f"{summary.duration_s:.2f}"),
        ("completed / failed", f"{summary.completed} / {summary.failed}"),
        ("status counts", ", ".join(f"{k}: {v}" for k, v in summary.status_counts.items())),
        ("request throughput (req/s)", f"{summary.request_throughput:.3f}"),
        ("output throughput (tok/s)", f"{summary.output_throughput:.1f}"),
        ("total token throughput (tok/s)", f"{summary.total_token_throughput:.1f}"),
    ]
    lines = [f"{name:<32}{value}" for name, value in rows]
    lines.append(f"{'latency (ms)':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        dist = getattr(summary, name)
        label = name.removesuffix("_ms").upper()
        if dist is None:
            lines.append(f"{label:<14}{'-':>10}")
        else:
            lines.append(f"{label:<14}" + "".join(f"{dist[k]:>10.1f}" for k in ("mean", "p50", "p90", "p99")))
    return "\n".join(lines)


def plot(records: list[RequestRecord], origin: float, path: Path, title: str) -> None:
    """Latency CDFs (TTFT, TPOT, ITL, E2E) beside output throughput over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in records if r.ok]
    series = {
        "TTFT": [r.ttft for r in done if r.ttft is not None],
        "TPOT": [r.tpot for r in done if r.tpot is not None],
        "ITL": [gap for r in done for gap in r.itls],
        "E2E": [r.e2e for r in done],
    }
    fig, (cdf_ax, time_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, values in series.items():
        if values:
            xs = np.sort(np.asarray(values) * 1e3)
            cdf_ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=f"{name} (n={len(xs)})")
    cdf_ax.set_xscale("log")
    cdf_ax.set_xlabel("latency (ms, log scale)")
    cdf_ax.set_ylabel("fraction of samples")
    cdf_ax.set_title("latency CDFs")
    cdf_ax.grid(True, which="both", alpha=0.3)
    cdf_ax.legend()
    timeline = throughput_timeline(records, origin)
    if timeline:
        time_ax.step([t for t, _ in timeline], [v for _, v in timeline], where="post")
    time_ax.set_xlabel("time since start (s)")
    time_ax.set_ylabel("output tokens/s (1 s bins)")
    time_ax.set_title("output throughput over time")
    time_ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_requests(args: argparse.Namespace) -> list[workloads.BenchRequest]:
    total = args.num_prompts + args.warmup
    if args.dataset == "random":
        return workloads.random_requests(total, tuple(args.input_len), tuple(args.output_len), args.seed,
                                         tuple(args.token_range))
    if args.dataset == "shared-prefix":
        return workloads.shared_prefix_requests(total, args.num_prefixes, args.prefix_len, tuple(args.input_len),
                                                tuple(args.output_len), args.seed, tuple(args.token_range))
    if args.dataset_path is None:
        raise ValueError("--dataset jsonl needs --dataset-path FILE")
    requests = workloads.jsonl_requests(args.dataset_path, args.output_len[1])
    return [requests[i % len(requests)] for i in range(total)]  # cycle a short file up to the count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    parser.add_argument("--api-key", default=None, help="bearer key (default: none)")
    load = parser.add_mutually_exclusive_group(required=True)
    load.add_argument("--concurrency", type=int, help="requests kept in flight")
    load.add_argument("--request-rate", type=float, help="Poisson arrivals per second")
    parser.add_argument("--dataset", choices=["random", "shared-prefix", "jsonl"], default="random")
    parser.add_argument("--dataset-path", default=None, help="JSONL prompts for --dataset jsonl")
    parser.add_argument("--num-prompts", type=int, default=100, help="measured requests (at most)")
    parser.add_argument("--max-duration", type=float, default=None, help="start no request after this many s")
    parser.add_argument("--warmup", type=int, default=2, help="requests sent first and not measured")
    parser.add_argument("--input-len", type=int, nargs=2, default=[128, 512], metavar=("MIN", "MAX"),
                        help="prompt length range (random) or suffix length range (shared-prefix)")
    parser.add_argument("--output-len", type=int, nargs=2, default=[64, 256], metavar=("MIN", "MAX"),
                        help="max_tokens range (jsonl: MAX is the default max_tokens)")
    parser.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix: distinct system prompts")
    parser.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: tokens per system prompt")
    parser.add_argument("--token-range", type=int, nargs=2, default=list(workloads.DEFAULT_TOKEN_RANGE),
                        metavar=("LO", "HI"), help="token ids drawn for random prompts")
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                        help="let requests stop at EOS (default: ignore_eos so lengths are exact)")
    parser.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S)
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of every request")
    parser.add_argument("--sampling-seed", type=int, default=None,
                        help="send this seed with every request (Pagoda: seeded sampling reads no cached prefix)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    parser.add_argument("--plot", default=None, help="write a PNG plot here (default: beside --out)")
    parser.add_argument("--label", default=None, help="name of the system under test in the report")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/")
    shape = LoadShape(args.concurrency, args.request_rate, args.num_prompts, args.max_duration, args.warmup,
                      args.seed)
    requests = build_requests(args)
    model = args.model or resolve_model(url, args.api_key)
    target = Target(url, model, args.api_key, args.ignore_eos, args.request_timeout, args.temperature,
                    args.sampling_seed)
    records, origin, duration = asyncio.run(run_load(target, requests, shape, args.progress))
    summary = summarize(records, duration)
    label = args.label or model
    load = f"concurrency {shape.concurrency}" if shape.concurrency else f"{shape.request_rate} req/s"
    print(f"{label} at {url}: {args.dataset}, {load}")
    print(format_table(summary))
    result = {
        "label": label,
        "url": url,
        "model": model,
        "dataset": args.dataset,
        "load": asdict(shape),
        "input_len": args.input_len,
        "output_len": args.output_len,
        "client_machine": f"{platform.machine()} {platform.node()}",
        "summary": asdict(summary),
        "requests": [
            {"status": r.status, "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
             "ttft_s": r.ttft, "e2e_s": r.e2e, "error": r.error or None} for r in records
        ],
    }
    if args.out:
        write_json(args.out, result)
    plot_path = args.plot or (str(Path(args.out).with_suffix(".png")) if args.out else None)
    if plot_path:
        plot(records, origin, Path(plot_path), f"{label}: {args.dataset}, {load}")
        print(f"wrote {plot_path}")
    return 0 if summary.completed else 1
