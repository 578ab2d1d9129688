"""The gateway's configuration over time: the live routing table, the config versions behind it (for
rollback), the upstreams whose models are still to be discovered, and the probe loop."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp

from pagoda.gateway.config import GatewayConfig, ModelGroupConfig, UpstreamConfig, load_config
from pagoda.gateway.health import probe
from pagoda.gateway.router import RoutingTable

logger = logging.getLogger(__name__)
MAX_VERSIONS = 16  # configs kept for rollback


async def discover_models(session: aiohttp.ClientSession, upstream: UpstreamConfig, timeout_s: float) -> list[str]:
    """The model ids an OpenAI-compatible server lists at /v1/models."""
    headers = {"Authorization": f"Bearer {upstream.api_key()}"} if upstream.api_key() else {}
    async with session.get(f"{upstream.base_url}/v1/models", headers=headers,
                           timeout=aiohttp.ClientTimeout(total=timeout_s)) as answer:
        answer.raise_for_status()
        data = (await answer.json()).get("data", [])
    return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


class GatewayState:
    def __init__(self, config: GatewayConfig, session: aiohttp.ClientSession, path: Path | None = None) -> None:
        self.session = session
        self.path = path
        self.versions: list[GatewayConfig] = []
        self.table = RoutingTable(config, [])
        self._prober: asyncio.Task[None] | None = None

    @property
    def config(self) -> GatewayConfig:
        return self.table.config

    async def apply(self, config: GatewayConfig) -> None:
        """Make ``config`` the live one: discover what it asks for, build its table from the live state of
        the upstreams it keeps, and swap. Requests in flight finish on the upstreams they hold."""
        config = await self._with_discovered(config)
        self.table = RoutingTable(config, config.models, self.table)
        self.versions = (self.versions + [config])[-MAX_VERSIONS:]
        logger.info("config version %d: %d models, %d upstreams", len(self.versions), len(config.models),
                    len(self.table.all_upstreams()))

    async def reload(self) -> None:
        if self.path is None:
            raise ValueError("the gateway was started without --config: nothing to reload from")
        await self.apply(load_config(self.path))

    async def rollback(self) -> None:
        if len(self.versions) < 2:
            raise ValueError("there is no previous config version to roll back to")
        previous = self.versions[-2]
        self.versions = self.versions[:-2]
        await self.apply(previous)

    async def _with_discovered(self, config: GatewayConfig) -> GatewayConfig:
        """``config`` with the models of its ``discover`` upstreams turned into model groups; the upstreams
        that did not answer stay in ``discover`` for the probe loop to retry."""
        if not config.discover:
            return config
        found = await asyncio.gather(*(discover_models(self.session, u, config.health.timeout_s)
                                       for u in config.discover), return_exceptions=True)
        groups = {g.key: g for g in config.models}
        pending = []
        for upstream, models in zip(config.discover, found):
            if isinstance(models, BaseException):
                logger.warning("upstream %s: its models are not known yet (%s); retrying", upstream.base_url, models)
                pending.append(upstream)
                continue
            for name in models:
                group = groups.get(name)
                if group is None:
                    groups[name] = ModelGroupConfig(name=name, policy=config.discover_policy, upstreams=[upstream])
                elif all(u.base_url != upstream.base_url for u in group.upstreams):
                    groups[name] = group.model_copy(update={"upstreams": [*group.upstreams, upstream]})
        return config.model_copy(update={"models": list(groups.values()), "discover": pending})

    # ---- the probe loop ----------------------------------------------------------------------
    def start_probing(self) -> None:
        self._prober = asyncio.create_task(self._probe_forever())

    async def stop_probing(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.health.interval_s)
            try:
                if self.config.discover:
                    self.versions.pop()  # the retry amends the live version instead of adding one
                    await self.apply(self.config)
                await asyncio.gather(*(probe(self.session, u, self.config.health) for u in self.table.all_upstreams()))
            except Exception:  # a probe round must never stop the loop
                logger.exception("health probe round failed")
