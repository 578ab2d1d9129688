"""`pagoda bench gateway --mode policy`: what keys, rate limits, usage records and the audit log add to a
request's latency (the same gateway with the policy on and off, in front of the minimal responder, one
after the other at each rate; "policy-held" is the policy with overlap_admission off: every request waits for
its admission before it is forwarded), and whether a limit holds exactly across gateways (four gateways sharing one
redis-server, a key limited to N requests a minute, a burst of 10 N requests spread over them).

    pagoda bench gateway --mode policy --rates 500 --duration-s 10 --repeats 3 --out results/policy.json

The Redis is a redis-server of the bench's own (pagoda.gateway.policy.local_redis, Debian's redis-server).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import httpx

from pagoda.bench import write_json
from pagoda.bench.gateway import BODY, RateResult, Target, _service, _with_added, format_table, measure
from pagoda.bench.startup import _free_port
from pagoda.gateway.policy.local_redis import LocalRedis

ADMIN_KEY = "bench-admin"
UNLIMITED = 10**9


def _gateway(stack: ExitStack, work: Path, name: str, config: dict) -> str:  # type: ignore[type-arg]
    port = _free_port()
    path = work / f"{name}.json"
    path.write_text(json.dumps({"port": port, "admin_key": ADMIN_KEY, **config}))
    url = f"http://127.0.0.1:{port}"
    stack.enter_context(_service(name, [sys.executable, "-m", "pagoda.cli", "gateway", "--config", str(path),
                                        "--log-level", "warning"], f"{url}/health", log_dir=work))
    return url


def _key(gateway: str, **spec: object) -> str:
    answer = httpx.post(f"{gateway}/admin/keys", json=spec, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    answer.raise_for_status()
    return answer.json()["key"]


def exact_limit(work: Path, stack: ExitStack, responder: str, redis: LocalRedis, limit: int) -> dict[str, int]:
    """Four gateways, one Redis, a key allowed ``limit`` requests a minute, 10 x limit requests at once."""
    config = {"discover": [{"url": responder}], "policy": {"require_keys": True, "redis_url": redis.url,
                                                           "redis_prefix": "exact"}}
    gateways = [_gateway(stack, work, f"exact-{i}", config) for i in range(4)]
    key = _key(gateways[0], tenant="burst", rpm=limit)

    def send(i: int) -> int:
        return httpx.post(f"{gateways[i % 4]}/v1/chat/completions", json=BODY,
                          headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        statuses = list(pool.map(send, range(10 * limit)))
    return {"limit": limit, "sent": len(statuses), "succeeded": statuses.count(200), "limited": statuses.count(429),
            "other": len(statuses) - statuses.count(200) - statuses.count(429)}


def run_policy(args: argparse.Namespace) -> int:
    for rate in args.rates:
        if rate <= 0:
            raise ValueError(f"--rates must be > 0, got {rate}")
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        work = Path(tmp)
        redis = stack.enter_context(LocalRedis(work / "redis"))
        responder_port = _free_port()
        responder = f"http://127.0.0.1:{responder_port}"
        stack.enter_context(_service("responder", [sys.executable, "-m", "pagoda.bench.responder", "--port",
                                                   str(responder_port), "--model", "bench"], f"{responder}/health"))
        off = _gateway(stack, work, "policy-off", {"discover": [{"url": responder}]})
        policy = {"require_keys": True, "redis_url": redis.url,
                  "tenants": {"bench": {"rpm": UNLIMITED, "tpm": UNLIMITED}},
                  "prices": {"bench": {"input_per_million": 0.15, "output_per_million": 0.6}}}
        on = _gateway(stack, work, "policy-on", {"discover": [{"url": responder}], "policy": {
            **policy, "audit": {"path": str(work / "audit.jsonl")}}})
        # The same policy, each request waiting for its admission before it is forwarded.
        held = _gateway(stack, work, "policy-held", {"discover": [{"url": responder}], "policy": {
            **policy, "overlap_admission": False, "audit": {"path": str(work / "audit-held.jsonl")}}})
        key = _key(on, tenant="bench", rpm=UNLIMITED, tpm=UNLIMITED, max_concurrency=100_000)
        targets = [Target("direct", responder, {}), Target("policy-off", off, {}),
                   Target("policy-on", on, {"Authorization": f"Bearer {key}"}),
                   Target("policy-held", held, {"Authorization": f"Bearer {key}"})]
        results: list[RateResult] = []
        rounds: dict[float, list[dict[str, RateResult]]] = {rate: [] for rate in args.rates}
        for rate in args.rates:
            for round_ in range(args.repeats):
                turn = round_ % len(targets)
                this_round: dict[str, RateResult] = {}
                for target in targets[turn:] + targets[:turn]:
                    result = measure(target, rate, args.duration_s, args.warmup_s)
                    print(f"{rate:>6.0f} req/s  {target.name:<10} p50 {result.p50_ms:7.3f} ms  p99 {result.p99_ms:7.3f} ms"
                          f"  errors {result.errors}", flush=True)
                    results.append(result)
                    this_round[target.name] = result
                rounds[rate].append(this_round)
        report = _with_added(results)
        exact = exact_limit(work, stack, responder, redis, args.exact_limit)
    print(format_table(report))
    by = {(r.target, r.rate): r for r in report}
    added: dict[str, float] = {}  # the policy's added p50, the median of the rounds' paired differences
    for rate in args.rates:
        off_r = by[("policy-off", rate)]
        for name in ("policy-on", "policy-held"):
            on_r = by[(name, rate)]
            paired = statistics.median(r[name].p50_ms - r["policy-off"].p50_ms for r in rounds[rate])
            added[f"{name}@{rate:g}"] = round(paired, 3)
            print(f"{rate:>6.0f} req/s: {name} adds {on_r.p50_ms - off_r.p50_ms:+.3f} ms at p50 (medians), "
                  f"{paired:+.3f} ms (median of each round's difference), {on_r.p99_ms - off_r.p99_ms:+.3f} ms at p99")
    print(f"exact limit: {exact['succeeded']} of {exact['sent']} succeeded with a limit of {exact['limit']} "
          f"across 4 gateways ({exact['limited']} limited, {exact['other']} other)")
    if args.out:
        write_json(args.out, {"results": [asdict(r) for r in report], "added_p50_paired_ms": added,
                              "exact_limit": exact, "body": BODY})
    return 0
