"""`pagoda bench gateway`: the latency a gateway adds, measured against an upstream that answers at once
(and, with ``--mode routing``, what prefix-aware routing gains over round robin: pagoda.bench.gateway_routing;
with ``--mode policy``, what keys, limits and accounting add: pagoda.bench.gateway_policy).

    pagoda bench gateway --rates 100 500 --duration-s 10 --out results/gateway.json
    pagoda bench gateway --mode routing --out results/routing.json

The bench starts the minimal responder (pagoda.bench.responder), `pagoda gateway` in front of it and, unless
``--no-litellm``, LiteLLM's proxy (litellm[proxy]==1.108.0 in its own venv, made on first use, offline mode)
on the same responder. Each rate sends non-streamed chat completions open-loop (at fixed times, whatever the
answers do) to the responder directly, through Pagoda and through LiteLLM, one after the other in a rotating
order; what a proxy adds is its latency percentile minus the direct one at the same rate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from pagoda.bench import write_json
from pagoda.bench.startup import _free_port

LITELLM_SPEC = "litellm[proxy]==1.108.0"
DEFAULT_LITELLM_VENV = Path.home() / ".cache" / "pagoda" / "litellm-1.108.0"
LITELLM_MASTER_KEY = "sk-pagoda-bench"
BODY = {"model": "bench", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    headers: dict[str, str]


@dataclass
class RateResult:
    target: str
    rate: float  # asked for
    sent_per_s: float  # achieved
    requests: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    # The load generator's lateness against its schedule at p99: large means the numbers are the client's.
    send_lag_p99_ms: float
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None


@contextmanager
def _service(name: str, cmd: list[str], health_url: str, env: dict[str, str] | None = None,
             log_dir: Path | None = None) -> Iterator[None]:
    """A process started with ``cmd``, ready once ``health_url`` answers 200; terminated on leaving."""
    log = (log_dir or Path(tempfile.gettempdir())) / f"bench-gateway-{name}.log"
    process = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                               env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} was not ready within {START_TIMEOUT_S:.0f} s (log: {log})")
            try:
                if httpx.get(health_url, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def ensure_litellm(venv: Path) -> Path:
    """LiteLLM's proxy executable in its own venv (made here on first use: its requirements must not touch
    this environment's torch or aiohttp)."""
    executable = venv / "bin" / "litellm"
    if executable.exists():
        return executable
    print(f"installing {LITELLM_SPEC} into {venv} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--progress-bar", "on", LITELLM_SPEC], check=True)
    return executable


async def _open_loop(target: Target, rate: float, duration_s: float) -> tuple[list[float], list[float], int]:
    """Requests at fixed intervals for ``duration_s``: (latencies s, send lags s, errors)."""
    import aiohttp
    import orjson

    body = orjson.dumps(BODY)
    headers = {"Content-Type": "application/json", **target.headers}
    latencies: list[float] = []
    lags: list[float] = []
    errors = 0

    async def one(session: aiohttp.ClientSession, due: float) -> None:
        nonlocal errors
        started = time.perf_counter()
        lags.append(started - due)
        try:
            async with session.post(f"{target.url}/v1/chat/completions", data=body, headers=headers) as answer:
                await answer.read()
                ok = answer.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            ok = False
        if ok:
            latencies.append(time.perf_counter() - started)
        else:
            errors += 1

    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        tasks = []
        begin = time.perf_counter()
        for i in range(int(rate * duration_s)):
            due = begin + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(session, due)))
        await asyncio.gather(*tasks)
    return latencies, lags, errors


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(target: Target, rate: float, duration_s: float, warmup_s: float) -> RateResult:
    asyncio.run(_open_loop(target, rate, warmup_s))  # connections opened, caches warm
    started = time.perf_counter()
    latencies, lags, errors = asyncio.run(_open_loop(target, rate, duration_s))
    elapsed = time.perf_counter() - started
    ms = [x * 1e3 for x in latencies]
    return RateResult(target.name, rate, round((len(latencies) + errors) / elapsed, 1), len(latencies) + errors, errors,
                      round(_percentile(ms, 0.5), 3), round(_percentile(ms, 0.9), 3), round(_percentile(ms, 0.99), 3),
                      round(_percentile(lags, 0.99) * 1e3, 3))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=["overhead", "routing", "policy"], default="overhead",
                        help="overhead: added latency over an instant upstream; routing: prefix-aware against "
                             "round robin over two pagoda serve replicas; policy: keys, limits and accounting on "
                             "against off, and a limit's exactness across 4 gateways sharing a redis-server")
    parser.add_argument("--rates", type=float, nargs="+", default=[100.0, 500.0], help="requests per second")
    parser.add_argument("--duration-s", type=float, default=10.0, help="measured seconds per target and rate")
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the targets, order rotated each round")
    parser.add_argument("--no-litellm", action="store_true", help="leave LiteLLM's proxy out")
    parser.add_argument("--litellm-venv", type=Path, default=DEFAULT_LITELLM_VENV)
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    parser.add_argument("--exact-limit", type=int, default=50,
                        help="policy mode: the requests-per-minute limit the 4-gateway burst is checked against")
    routing = parser.add_argument_group("routing mode")
    routing.add_argument("--requests", type=int, default=96, help="per run")
    routing.add_argument("--prefixes", type=int, default=12, help="system prompts of the shared-prefix workload")
    routing.add_argument("--prefix-words", type=int, default=300, help="words per system prompt (~1.3 tokens each)")
    routing.add_argument("--max-tokens", type=int, default=8)
    routing.add_argument("--concurrency", type=int, default=4)
    routing.add_argument("--num-kv-blocks", type=int, default=200, help="each replica's KV cache, 16-token blocks")


def run(args: argparse.Namespace) -> int:
    if args.mode == "routing":
        from pagoda.bench.gateway_routing import run_routing

        return run_routing(args)
    if args.mode == "policy":
        from pagoda.bench.gateway_policy import run_policy

        return run_policy(args)
    for rate in args.rates:
        if rate <= 0:
            raise ValueError(f"--rates must be > 0, got {rate}")
    if args.duration_s <= 0:
        raise ValueError(f"--duration-s must be > 0, got {args.duration_s}")
    litellm = None if args.no_litellm else ensure_litellm(args.litellm_venv)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        work = Path(tmp)
        responder_port, gateway_port, litellm_port = _free_port(), _free_port(), _free_port()
        responder = f"http://127.0.0.1:{responder_port}"
        stack.enter_context(_service("responder", [sys.executable, "-m", "pagoda.bench.responder", "--port",
                                                   str(responder_port), "--model", "bench"], f"{responder}/health"))
        targets = [Target("direct", responder, {})]
        gateway = f"http://127.0.0.1:{gateway_port}"
        stack.enter_context(_service("pagoda-gateway", [
            sys.executable, "-m", "pagoda.cli", "gateway", "--upstream", responder, "--port", str(gateway_port),
            "--log-level", "warning"], f"{gateway}/health"))
        targets.append(Target("pagoda", gateway, {}))
        if litellm is not None:
            config = work / "litellm.yaml"
            config.write_text(
                "model_list:\n  - model_name: bench\n    litellm_params:\n      model: openai/bench\n"
                f"      api_base: {responder}/v1\n      api_key: unused\n")
            url = f"http://127.0.0.1:{litellm_port}"
            stack.enter_context(_service("litellm", [str(litellm), "--config", str(config), "--host", "127.0.0.1",
                                                     "--port", str(litellm_port)], f"{url}/health/liveliness",
                                         env={"LITELLM_OFFLINE_MODE": "true", "LITELLM_LOG": "ERROR",
                                              "LITELLM_MASTER_KEY": LITELLM_MASTER_KEY}))
            targets.append(Target("litellm", url, {"Authorization": f"Bearer {LITELLM_MASTER_KEY}"}))
        results: list[RateResult] = []
        for rate in args.rates:
            for round_ in range(args.repeats):
                order = targets[round_ % len(targets):] + targets[: round_ % len(targets)]
                for target in order:
                    result = measure(target, rate, args.duration_s, args.warmup_s)
                    print(f"{rate:>6.0f} req/s  {target.name:<8} p50 {result.p50_ms:7.3f} ms  p99 {result.p99_ms:7.3f} ms"
                          f"  errors {result.errors}", flush=True)
                    results.append(result)
    report = _with_added(results)
    print(format_table(report))
    if args.out:
        write_json(args.out, {"results": [asdict(r) for r in report], "body": BODY})
    return 0


def _with_added(results: list[RateResult]) -> list[RateResult]:
    """Median over rounds per (target, rate), with the direct percentiles subtracted."""
    merged: list[RateResult] = []
    keys = dict.fromkeys((r.target, r.rate) for r in results)
    for target, rate in keys:
        rounds = [r for r in results if r.target == target and r.rate == rate]
        mid = sorted(rounds, key=lambda r: r.p50_ms)[len(rounds) // 2]
        merged.append(RateResult(**{**asdict(mid), "p50_ms": statistics.median(r.p50_ms for r in rounds),
                                    "p99_ms": statistics.median(r.p99_ms for r in rounds)}))
    direct = {r.rate: r for r in merged if r.target == "direct"}
    for r in merged:
        base = direct.get(r.rate)
        if base is not None and r.target != "direct":
            r.added_p50_ms = round(r.p50_ms - base.p50_ms, 3)
            r.added_p99_ms = round(r.p99_ms - base.p99_ms, 3)
    return merged


def format_table(results: list[RateResult]) -> str:
    lines = [f"{'rate':>6} {'target':<8} {'sent/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
             f"{'+p50 ms':>8} {'+p99 ms':>8} {'errors':>6}"]
    for r in results:
        added = (f"{r.added_p50_ms:>8.3f} {r.added_p99_ms:>8.3f}" if r.added_p50_ms is not None
                 else f"{'':>8} {'':>8}")
        lines.append(f"{r.rate:>6.0f} {r.target:<8} {r.sent_per_s:>8.1f} {r.p50_ms:>8.3f} {r.p90_ms:>8.3f} "
                     f"{r.p99_ms:>8.3f} {added} {r.errors:>6}")
    return "\n".join(lines)
