"""The routing table built from one config: model groups with their upstreams and policy, name resolution
(versions, aliases), and the retry budget. A reload builds a new table that keeps the live state of the
upstreams it still lists (breakers, in-flight counts), so nothing in flight is lost."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from pagoda.gateway.config import GatewayConfig, ModelGroupConfig, RetryConfig
from pagoda.gateway.policies import RouteContext, RoutingPolicy, make_policy
from pagoda.gateway.upstream import CircuitBreaker, Upstream


@dataclass
class ModelGroup:
    config: ModelGroupConfig
    upstreams: list[Upstream]
    policy: RoutingPolicy

    @property
    def key(self) -> str:
        return self.config.key

    def candidates(self, ctx: RouteContext) -> list[Upstream]:
        """Available upstreams in the policy's order (empty: none can take a request now)."""
        available = [u for u in self.upstreams if u.available()]
        return self.policy.order(available, ctx) if available else []


class RetryBudget:
    """Retries allowed: ``budget_ratio`` of the requests of the last ``window_s`` seconds plus a floor."""

    def __init__(self, config: RetryConfig, window_s: float = 10.0) -> None:
        self.config = config
        self.window_s = window_s
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        for q in (self._requests, self._retries):
            while q and now - q[0] > self.window_s:
                q.popleft()

    def on_request(self) -> None:
        self._requests.append(time.monotonic())

    def try_spend(self) -> bool:
        now = time.monotonic()
        self._trim(now)
        allowed = self.config.budget_ratio * len(self._requests) + self.config.min_retries_per_s * self.window_s
        if len(self._retries) >= allowed:
            return False
        self._retries.append(now)
        return True


class RoutingTable:
    def __init__(self, config: GatewayConfig, groups: list[ModelGroupConfig],
                 previous: RoutingTable | None = None) -> None:
        self.config = config
        kept = {(u.group_key, u.url): u for g in (previous.groups.values() if previous else []) for u in g.upstreams}
        self.groups: dict[str, ModelGroup] = {}
        for gc in groups:
            upstreams = []
            for uc in gc.upstreams:
                old = kept.get((gc.key, uc.base_url))
                if old is not None and old.config == uc:
                    upstreams.append(old)
                else:
                    upstreams.append(Upstream(uc, CircuitBreaker(config.breaker), gc.key, uc.model or gc.name))
            old_group = previous.groups.get(gc.key) if previous else None
            policy = (old_group.policy if old_group is not None and old_group.config.policy == gc.policy
                      else make_policy(gc.policy, config.prefix, config.session))
            self.groups[gc.key] = ModelGroup(gc, upstreams, policy)
        self.names: dict[str, str] = {}  # what a client may send -> group key
        for gc in groups:
            self.names[gc.key] = gc.key
        for name in {gc.name for gc in groups}:
            versions = [gc for gc in groups if gc.name == name]
            current = next((gc for gc in versions if gc.current), versions[-1])
            self.names[name] = current.key
            for alias in current.aliases:
                self.names[alias] = current.key
        for gc in groups:
            for alias in gc.aliases:
                self.names.setdefault(alias, gc.key)
        self.retry_budget = previous.retry_budget if previous else RetryBudget(config.retries)

    def resolve(self, model: str) -> ModelGroup | None:
        key = self.names.get(model)
        return self.groups.get(key) if key is not None else None

    def route_chain(self, group: ModelGroup) -> list[ModelGroup]:
        """The group, then its fallbacks (each resolved by name; unknown or repeated ones skipped)."""
        chain = [group]
        for name in group.config.fallbacks:
            fallback = self.resolve(name)
            if fallback is not None and fallback not in chain:
                chain.append(fallback)
        return chain

    def public_names(self) -> list[str]:
        return sorted(self.names)

    def all_upstreams(self) -> list[Upstream]:
        return [u for g in self.groups.values() for u in g.upstreams]
