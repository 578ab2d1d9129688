"""`pagoda bench soak`: many short requests against one `pagoda serve`, its memory sampled throughout.

    pagoda bench soak --requests 20000 --concurrency 16 --out results/soak.json -- --max-model-len 512

The mix is what leaks would hide in: streamed and not, n of 1 to 3, and a share cut by the client at a random
point (some before their first token). RSS of the server and its engine core is read from /proc after a
warm-up and then every ``--sample-every`` requests. The KV pool is allocated untouched and its pages are
committed as blocks are first used, so the warm-up must cycle through the pool (a small ``--kv-cache-gib``
keeps that short) before growth means a leak;
the run fails when the growth from the warm-up mark to the end passes ``--max-growth-mb``, when any answer
is a 5xx or when a KV block is still in use once the load is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from pagoda.bench import write_json
from pagoda.bench.startup import launched

PROMPTS = ("Hello", "Name a colour.", "Count: 1 2 3", "Write one word about the sea.", "Why is the sky blue?")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def server_and_engine_rss(pid: int) -> tuple[float, float]:
    """Resident MiB of the HTTP process and of its engine core child."""
    children = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return rss_mib(pid), sum(rss_mib(c) for c in children)


async def one(http: httpx.AsyncClient, rng: random.Random, cut_share: float, statuses: dict[int, int]) -> None:
    body = {"prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(1, 6), "n": rng.randint(1, 3),
            "temperature": 1.0, "stream": rng.random() < 0.5}
    cut = rng.random() < cut_share
    try:
        if not body["stream"]:
            task = asyncio.ensure_future(http.post("/v1/completions", json=body))
            if cut:
                await asyncio.sleep(rng.random() * 0.05)
                task.cancel()
                return
            status = (await task).status_code
        else:
            async with http.stream("POST", "/v1/completions", json=body) as r:
                status = r.status_code
                lines_left = rng.randint(0, 4) if cut else -1
                async for _ in r.aiter_lines():
                    if lines_left == 0:
                        break  # leaving the block closes the connection mid-stream
                    lines_left -= 1
    except asyncio.CancelledError:
        return
    statuses[status] = statuses.get(status, 0) + 1


async def soak(url: str, pid: int, args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(args.seed)
    statuses: dict[int, int] = {}
    samples: list[tuple[int, float, float]] = []  # (requests done, server MiB, engine MiB)
    gate = asyncio.Semaphore(args.concurrency)
    baseline: float | None = None

    async def bounded() -> None:
        async with gate:
            await one(http, rng, args.cut_share, statuses)

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=args.concurrency * 2)) as http:
        with tqdm(total=args.requests, desc="soak", unit="req") as bar:
            done = 0
            while done < args.requests:
                batch = min(args.sample_every, args.requests - done)
                await asyncio.gather(*(bounded() for _ in range(batch)))
                done += batch
                bar.update(batch)
                server, engine = server_and_engine_rss(pid)
                samples.append((done, round(server, 1), round(engine, 1)))
                if baseline is None and done >= args.warmup:
                    baseline = server + engine
                bar.set_postfix(server_mib=f"{server:.0f}", engine_mib=f"{engine:.0f}")
    elapsed = time.perf_counter() - started
    await asyncio.sleep(0.5)
    metrics = httpx.get(f"{url}/metrics").text
    kv_usage = next(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("pagoda:kv_cache_usage_perc "))
    end = round(samples[-1][1] + samples[-1][2], 1)
    start = baseline if baseline is not None else samples[0][1] + samples[0][2]
    return {"requests": args.requests, "concurrency": args.concurrency, "cut_share": args.cut_share,
            "seconds": round(elapsed, 1), "requests_per_s": round(args.requests / elapsed, 1),
            "statuses": {str(k): v for k, v in sorted(statuses.items())}, "rss_warm_mib": round(start, 1),
            "rss_end_mib": end, "rss_growth_mib": round(end - start, 1),
            "rss_max_mib": round(max(a + b for _, a, b in samples), 1), "server_rss_growth_mib": round(
                samples[-1][1] - samples[min(len(samples) - 1, args.warmup // args.sample_every)][1], 1),
            "kv_cache_usage_after": kv_usage, "samples": samples}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--cut-share", type=float, default=0.2, help="share of requests the client cuts")
    parser.add_argument("--warmup", type=int, default=1000, help="requests before the RSS baseline is taken")
    parser.add_argument("--sample-every", type=int, default=250, help="requests between RSS samples")
    parser.add_argument("--max-growth-mb", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server to start")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    parser.add_argument("serve_args", nargs=argparse.REMAINDER, help="arguments for pagoda serve, after --")


def run(args: argparse.Namespace) -> int:
    for name in ("requests", "concurrency", "sample_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.cut_share <= 1.0:
        raise ValueError(f"--cut-share must be in [0, 1], got {args.cut_share}")
    serve_args = [a for a in args.serve_args if a != "--"]
    with launched(serve_args, args.timeout) as server:
        result = asyncio.run(soak(server.url, server.process.pid, args))
    result["serve_args"] = serve_args
    errors = sum(v for k, v in result["statuses"].items() if int(k) >= 500)  # type: ignore[union-attr]
    print(f"{args.requests} requests in {result['seconds']} s ({result['requests_per_s']} req/s), "
          f"statuses {result['statuses']}; RSS {result['rss_warm_mib']} -> {result['rss_end_mib']} MiB "
          f"(growth {result['rss_growth_mib']} MiB, max {result['rss_max_mib']}); "
          f"KV in use after: {result['kv_cache_usage_after']}")
    if args.out:
        write_json(args.out, result)
    failed = (errors > 0 or float(result["rss_growth_mib"]) > args.max_growth_mb  # type: ignore[arg-type]
              or float(result["kv_cache_usage_after"]) != 0.0)  # type: ignore[arg-type]
    if failed:
        print(f"FAILED: 5xx answers {errors}, growth limit {args.max_growth_mb} MiB, KV must be 0 after")
    return 1 if failed else 0
