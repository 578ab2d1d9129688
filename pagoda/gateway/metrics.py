"""The gateway's Prometheus metrics, per upstream (labels bounded by the configured upstreams) and per tenant
(bounded by MAX_TENANT_LABELS)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pagoda.gateway.upstream import Upstream

MAX_TENANT_LABELS = 100
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.responses = Counter("pagoda_gateway_upstream_responses", "Upstream answers by status class",
                                 ["upstream", "status"], registry=r)
        self.errors = Gauge("pagoda_gateway_upstream_errors", "Upstream errors by class since start",
                            ["upstream", "kind"], registry=r)
        self.retries = Counter("pagoda_gateway_retries", "Requests retried on this upstream", ["upstream"], registry=r)
        self.latency = Histogram("pagoda_gateway_upstream_latency_seconds", "Time from send to the end of the answer",
                                 ["upstream"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("pagoda_gateway_upstream_in_flight", "Requests in flight", ["upstream"], registry=r)
        self.breaker = Gauge("pagoda_gateway_upstream_breaker_state", "0 closed, 1 open, 2 half-open",
                             ["upstream"], registry=r)
        self.healthy = Gauge("pagoda_gateway_upstream_healthy", "1 when the last probes passed", ["upstream"],
                             registry=r)
        self.requests = Counter("pagoda_gateway_requests", "Requests by route and status", ["route", "status"],
                                registry=r)
        self.tenant_requests = Counter("pagoda_gateway_tenant_requests", "Requests by tenant and policy decision "
                                       "(allowed, limited, denied)", ["tenant", "decision"], registry=r)
        self.tenant_tokens = Counter("pagoda_gateway_tenant_tokens", "Tokens by tenant", ["tenant", "kind"], registry=r)
        self.tenant_cost = Counter("pagoda_gateway_tenant_cost_dollars", "Cost by tenant", ["tenant"], registry=r)
        self.overlaps = Counter("pagoda_gateway_admission_overlaps", "Requests forwarded while their admission was "
                                "decided, by its outcome (admitted; refused, or unavailable: the store was away in closed mode; "
                                "either was closed at the upstream)", ["outcome"],
                                registry=r)
        self.admissions = Counter("pagoda_gateway_admissions", "Rate-limit decisions by where they were made: here "
                                  "(the in-process store, or a window share of Redis's) or store (a Redis call)",
                                  ["where"], registry=r)
        self.shares = Counter("pagoda_gateway_window_shares", "Window shares asked of Redis, by outcome (granted, "
                              "declined: too little room or too large a share of a limit)", ["outcome"], registry=r)
        self.tenants: set[str] = set()
        self._decisions: dict[tuple[str, str], Any] = {}
        self._usage: dict[str, tuple[Any, Any, Any]] = {}

    def _tenant(self, tenant: str) -> str:
        """Tenants beyond MAX_TENANT_LABELS share one label: keys made through the API cannot grow the series."""
        if tenant in self.tenants or len(self.tenants) < MAX_TENANT_LABELS:
            self.tenants.add(tenant)
            return tenant
        return "other"

    def tenant_decision(self, tenant: str, decision: str) -> None:
        key = (self._tenant(tenant), decision)
        child = self._decisions.get(key)
        if child is None:
            child = self._decisions[key] = self.tenant_requests.labels(*key)
        child.inc()

    def tenant_usage(self, tenant: str, prompt_tokens: int, completion_tokens: int, cost: float) -> None:
        label = self._tenant(tenant)
        children = self._usage.get(label)
        if children is None:  # the labelled series, looked up once per tenant (the hot path's share)
            children = self._usage[label] = (self.tenant_tokens.labels(label, "prompt"),
                                              self.tenant_tokens.labels(label, "completion"),
                                              self.tenant_cost.labels(label))
        children[0].inc(prompt_tokens)
        children[1].inc(completion_tokens)
        children[2].inc(cost)

    def render(self, upstreams: list[Upstream]) -> bytes:
        for u in upstreams:
            self.in_flight.labels(u.url).set(u.in_flight)
            self.breaker.labels(u.url).set(u.breaker.state.value)
            self.healthy.labels(u.url).set(1 if u.healthy else 0)
            for kind, count in u.errors.items():
                self.errors.labels(u.url, kind).set(count)
        return generate_latest(self.registry)
