"""`pagoda bench gateway --mode routing`: prefix-aware routing against round robin over two `pagoda serve`
replicas, in the same run.

The shared-prefix workload is a few long system prompts, each request one of them plus a short question of
its own (many users of a few applications); the no-reuse workload gives every request a long prompt of its
own. Each replica's KV cache (``--num-kv-blocks``) holds about half of the system prompts, so a policy that
sends a prompt where it was seen before keeps every replica's cache hot, where round robin makes both
replicas cycle through all of them. Every run draws fresh prompts, so no run inherits another's cache.
Requests stream so that time to first token is measured at the client, a few at a time (closed loop).
Each replica runs on half of this machine's cores (OMP_NUM_THREADS).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

from pagoda.bench import write_json
from pagoda.bench.gateway import _percentile, _service
from pagoda.bench.startup import _free_port
from pagoda.gateway.cli import replica_env

WORDS = ("river", "stone", "garden", "market", "engine", "window", "paper", "silver", "forest", "harbor", "signal",
         "winter", "letter", "bridge", "orange", "planet", "circle", "doctor", "island", "mirror", "number", "pocket",
         "rocket", "saddle", "ticket", "valley", "wander", "yellow", "anchor", "button", "candle", "desert")
POLICIES = ("round_robin", "prefix")


@dataclass
class RoutingResult:
    workload: str
    policy: str
    requests: int
    errors: int
    seconds: float
    output_tok_per_s: float
    ttft_p50_ms: float
    ttft_p90_ms: float


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def workload(name: str, seed: int, requests: int, prefixes: int, prefix_words: int) -> list[list[dict[str, str]]]:
    """Chat messages per request: one of ``prefixes`` system prompts plus a question (shared), or a long prompt
    of its own per request (none)."""
    rng = random.Random(seed)
    systems = [f"You are assistant {i}. Context: {_text(rng, prefix_words)}" for i in range(prefixes)]
    out = []
    for i in range(requests):
        system = rng.choice(systems) if name == "shared" else f"Context {i}: {_text(rng, prefix_words)}"
        out.append([{"role": "system", "content": system},
                    {"role": "user", "content": f"Question {i}: what is {_text(rng, 4)}?"}])
    return out


async def _drive(url: str, conversations: list[list[dict[str, str]]], max_tokens: int, concurrency: int,
                 progress: tqdm) -> tuple[list[float], int, int, float]:
    """(TTFT seconds per request, output tokens, errors, wall seconds)."""
    queue: asyncio.Queue[list[dict[str, str]]] = asyncio.Queue()
    for messages in conversations:
        queue.put_nowait(messages)
    ttfts: list[float] = []
    tokens = errors = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        while not queue.empty():
            messages = queue.get_nowait()
            body = {"model": "smol", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            started = time.perf_counter()
            first = None
            try:
                async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as answer:
                    if answer.status_code != 200:
                        errors += 1
                        continue
                    async for line in answer.aiter_lines():
                        if first is None and line.startswith("data: {") and '"content"' in line:
                            first = time.perf_counter() - started
                        if '"usage"' in line and '"completion_tokens"' in line:
                            tokens += int(line.split('"completion_tokens":')[1].split(",")[0].strip(" }"))
            except httpx.HTTPError:
                errors += 1
                continue
            finally:
                progress.update()
            if first is not None:
                ttfts.append(first)

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=300) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return ttfts, tokens, errors, time.perf_counter() - started


def run_routing(args: argparse.Namespace) -> int:
    replica_args = ["--max-model-len", "2048", "--num-kv-blocks", str(args.num_kv_blocks), "--log-level", "warning"]
    results: list[RoutingResult] = []
    # Both replicas share this machine: half its cores each, not both contending for all of them.
    threads = {"OMP_NUM_THREADS": replica_env(2)["OMP_NUM_THREADS"]}
    with ExitStack() as stack:
        replicas = []
        for _ in range(2):
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            stack.enter_context(_service(f"replica-{port}", [sys.executable, "-m", "pagoda.cli", "serve", "--port",
                                                             str(port), *replica_args], f"{url}/health", env=threads))
            replicas.append(url)
        work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        gateways = {}
        for policy in POLICIES:
            port = _free_port()
            config = work / f"{policy}.yaml"
            config.write_text(json.dumps({"port": port, "models": [{"name": "smol", "policy": policy, "upstreams": [
                {"url": u, "model": "smollm2-135m"} for u in replicas]}]}))
            gateways[policy] = f"http://127.0.0.1:{port}"
            stack.enter_context(_service(f"gateway-{policy}", [sys.executable, "-m", "pagoda.cli", "gateway",
                                                               "--config", str(config), "--log-level", "warning"],
                                         f"{gateways[policy]}/health"))
        runs = [(w, p, r) for r in range(args.repeats) for w in ("shared", "none")
                for p in (POLICIES if r % 2 == 0 else POLICIES[::-1])]
        with tqdm(total=len(runs) * args.requests, desc="routing", unit="req") as progress:
            for seed, (name, policy, _) in enumerate(runs):
                conversations = workload(name, seed, args.requests, args.prefixes, args.prefix_words)
                ttfts, tokens, errors, seconds = asyncio.run(
                    _drive(gateways[policy], conversations, args.max_tokens, args.concurrency, progress))
                results.append(RoutingResult(name, policy, args.requests, errors, round(seconds, 2),
                                             round(tokens / seconds, 1), round(_percentile(ttfts, 0.5) * 1e3, 1),
                                             round(_percentile(ttfts, 0.9) * 1e3, 1)))
    merged = _median_by_run(results)
    print(format_routing(merged))
    if args.out:
        write_json(args.out, {"results": [asdict(r) for r in merged], "rounds": [asdict(r) for r in results],
                              "settings": {k: getattr(args, k) for k in ("requests", "prefixes", "prefix_words",
                                                                          "max_tokens", "concurrency", "num_kv_blocks")}})
    return 0


def _median_by_run(results: list[RoutingResult]) -> list[RoutingResult]:
    merged = []
    for key in dict.fromkeys((r.workload, r.policy) for r in results):
        rounds = [r for r in results if (r.workload, r.policy) == key]
        merged.append(RoutingResult(key[0], key[1], sum(r.requests for r in rounds), sum(r.errors for r in rounds),
                                    round(statistics.median(r.seconds for r in rounds), 2),
                                    round(statistics.median(r.output_tok_per_s for r in rounds), 1),
                                    round(statistics.median(r.ttft_p50_ms for r in rounds), 1),
                                    round(statistics.median(r.ttft_p90_ms for r in rounds), 1)))
    return merged


def format_routing(results: list[RoutingResult]) -> str:
    lines = [f"{'workload':<9}{'policy':<13}{'requests':>9}{'errors':>7}{'tok/s':>9}{'TTFT p50 ms':>13}{'p90 ms':>9}"]
    lines += [f"{r.workload:<9}{r.policy:<13}{r.requests:>9}{r.errors:>7}{r.output_tok_per_s:>9.1f}"
              f"{r.ttft_p50_ms:>13.1f}{r.ttft_p90_ms:>9.1f}" for r in results]
    return "\n".join(lines)
