"""Active health checks: every interval each upstream's ``/health`` is probed and its ``/metrics`` scraped
for the load the policies weigh (the replica's requests and KV usage; pagoda's and vLLM's metric names)."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from pagoda.gateway.config import HealthConfig
from pagoda.gateway.upstream import Upstream

logger = logging.getLogger(__name__)

# A replica's requests (running and waiting) and its KV usage: pagoda's and vLLM's metric names.
REQUEST_METRICS = ("pagoda:num_requests_running", "pagoda:num_requests_waiting",
                   "vllm:num_requests_running", "vllm:num_requests_waiting")
KV_METRICS = ("pagoda:kv_cache_usage_perc", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


def scrape_load(text: str) -> tuple[float | None, float | None]:
    """(requests running + waiting, KV usage 0-1) from a Prometheus text page; None where it has neither."""
    requests = kv = None
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name, _, rest = line.partition(" ")
        name = name.split("{", 1)[0]
        if name in REQUEST_METRICS or name in KV_METRICS:
            try:
                value = float(rest.split()[0])
            except (ValueError, IndexError):
                continue
            if name in REQUEST_METRICS:
                requests = (requests or 0.0) + value
            else:
                kv = max(kv or 0.0, value)
    return requests, kv


async def probe(session: aiohttp.ClientSession, upstream: Upstream, config: HealthConfig) -> None:
    """One probe; moves ``healthy`` after the configured number of consecutive results."""
    if not upstream.config.health_check:
        return
    headers = {}
    key = upstream.config.api_key()
    if key:
        headers["Authorization"] = f"Bearer {key}"
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    try:
        async with session.get(f"{upstream.url}/health", headers=headers, timeout=timeout) as answer:
            ok = answer.status == 200
        if ok:
            async with session.get(f"{upstream.url}/metrics", headers=headers, timeout=timeout) as page:
                if page.status == 200:
                    requests, kv = scrape_load(await page.text())
                    upstream.observe_replica(requests or 0.0, kv or 0.0)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        ok = False
    if ok:
        upstream.probe_failures = 0
        upstream.probe_successes += 1
        if not upstream.healthy and upstream.probe_successes >= config.healthy_threshold:
            logger.info("upstream %s is healthy again", upstream.url)
            upstream.healthy = True
    else:
        upstream.probe_successes = 0
        upstream.probe_failures += 1
        if upstream.healthy and upstream.probe_failures >= config.unhealthy_threshold:
            logger.warning("upstream %s failed %d probes: marked down", upstream.url, upstream.probe_failures)
            upstream.healthy = False
