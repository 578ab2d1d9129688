"""The gateway's configuration: one pydantic schema, validated at start (and at every reload) with errors
that name the field. Every default lives here once; ``pagoda gateway --upstream URL`` builds the same tree.

    host: 127.0.0.1
    port: 4000
    models:
      - name: smollm2              # what clients put in "model"
        version: v2                # optional; "smollm2@v2" asks for it explicitly
        current: true              # "smollm2" routes to the current version (default: the last listed)
        aliases: [gpt-4o-mini]
        policy: prefix             # round_robin | weighted | least_outstanding | power_of_two | session | prefix
        fallbacks: [other-model]   # tried in order once every upstream of this group failed
        upstreams:
          - url: http://127.0.0.1:8001
            model: smollm2-135m    # the upstream's own name for it (default: the group's name)
            weight: 2
            api_key_env: OPENAI_API_KEY   # a cloud upstream's key, read from the environment
            max_concurrency: 64
    policy:                        # keys, roles and rate limits (pagoda/gateway/policy/)
      require_keys: true
      redis_url: redis://127.0.0.1:6379/0
      tenants: {acme: {rpm: 600, tpm: 200000, max_concurrency: 32}}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError, field_validator, model_validator

Policy = Literal["round_robin", "weighted", "least_outstanding", "power_of_two", "session", "prefix"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamConfig(_Strict):
    url: HttpUrl
    model: str | None = None
    weight: float = Field(1.0, gt=0)
    api_key_env: str | None = None
    max_concurrency: int = Field(256, ge=1)
    # Probe /health and scrape /metrics (off for servers without them, such as a cloud API).
    health_check: bool = True

    @field_validator("api_key_env")
    @classmethod
    def _key_is_set(cls, name: str | None) -> str | None:
        if name is not None and not os.environ.get(name):
            raise ValueError(f"environment variable {name} (the upstream's API key) is not set")
        return name

    @property
    def base_url(self) -> str:
        return str(self.url).rstrip("/")

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class ModelGroupConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[^@\s]+$")
    version: str | None = Field(None, min_length=1, pattern=r"^[^@\s]+$")
    current: bool | None = None
    aliases: list[str] = Field(default_factory=list)
    policy: Policy = "least_outstanding"
    fallbacks: list[str] = Field(default_factory=list)
    upstreams: list[UpstreamConfig] = Field(min_length=1)

    @property
    def key(self) -> str:
        """The name that routes to this group and no other: ``name@version`` when versioned."""
        return self.name if self.version is None else f"{self.name}@{self.version}"


class HealthConfig(_Strict):
    interval_s: float = Field(5.0, gt=0)
    timeout_s: float = Field(2.0, gt=0)
    # Consecutive failed probes that mark an upstream down, and passed ones that bring it back.
    unhealthy_threshold: int = Field(2, ge=1)
    healthy_threshold: int = Field(1, ge=1)


class BreakerConfig(_Strict):
    # Consecutive 5xx answers or connect errors that open an upstream's breaker (passive outlier detection).
    consecutive_failures: int = Field(5, ge=1)
    # Seconds it stays open before letting trial requests through (half-open).
    open_s: float = Field(10.0, gt=0)
    # Trial requests a half-open breaker lets through at once; one success closes it, one failure reopens it.
    half_open_requests: int = Field(1, ge=1)


class TimeoutConfig(_Strict):
    connect_s: float = Field(2.0, gt=0)
    # Until the upstream's response headers (for a stream: its first event): a frozen replica is given up.
    first_byte_s: float = Field(60.0, gt=0)
    total_s: float = Field(600.0, gt=0)


class RetryConfig(_Strict):
    # Attempts per request over all upstreams and fallbacks (1: never retry).
    max_attempts: int = Field(3, ge=1)
    # Retries allowed as a fraction of recent requests, plus a floor per second (Envoy's retry budget):
    # when every upstream fails, retries cannot multiply the load.
    budget_ratio: float = Field(0.2, ge=0, le=1)
    min_retries_per_s: float = Field(5.0, ge=0)


class PrefixConfig(_Strict):
    # The prompt's leading characters are hashed in blocks; the longest known run of blocks picks the upstream.
    block_chars: int = Field(256, ge=16)
    max_blocks: int = Field(16, ge=1)
    # An upstream whose load (in-flight at the gateway + other clients' requests, per unit of weight) is this many times
    # the least loaded one's plus slack is skipped for the prefix match.
    load_factor: float = Field(2.0, ge=1)
    load_slack: int = Field(4, ge=0)
    # An upstream whose scraped KV usage is over this is skipped too: a full cache queues or preempts.
    max_kv_usage: float = Field(0.9, gt=0, le=1)
    # Remembered prefix blocks (least recently used ones are forgotten).
    table_size: int = Field(65536, ge=16)


class SessionConfig(_Strict):
    header: str = "x-session-id"  # else the body's "user" field
    # Bounded-load consistent hashing: no upstream takes more than this times the mean load.
    load_bound: float = Field(1.25, gt=1)


class BudgetConfig(_Strict):
    """Tokens and dollars per UTC day and month (None: no budget); past one, requests get 429 insufficient_quota."""

    daily_tokens: int | None = Field(None, ge=1)
    monthly_tokens: int | None = Field(None, ge=1)
    daily_cost: float | None = Field(None, gt=0)
    monthly_cost: float | None = Field(None, gt=0)


class TenantConfig(_Strict):
    """A tenant's limits and budget, shared by all its keys (None: unlimited)."""

    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_concurrency: int | None = Field(None, ge=1)
    budget: BudgetConfig | None = None
    weight: float = Field(1.0, gt=0)  # its share of saturated upstreams against other tenants'


class PriceConfig(_Strict):
    """Dollars for a model group: per million input / output tokens, and (local replicas) per replica-hour,
    spread over the tokens the group served in the last hour."""

    input_per_million: float = Field(0.0, ge=0)
    output_per_million: float = Field(0.0, ge=0)
    replica_hour: float = Field(0.0, ge=0)


class AuditConfig(_Strict):
    # Append-only JSON Lines, hash-chained (`pagoda audit verify PATH`); one file per gateway process.
    path: Path
    max_bytes: int = Field(64 * 2**20, ge=4096)  # rotated to PATH.1, PATH.2, ... past this size
    keep: int = Field(10, ge=1)
    include_prompts: bool = False  # the request's prompt text in its entry


class PolicyConfig(_Strict):
    # Every route but /health wants a key (its role decides which routes); off, only /admin/ routes do.
    require_keys: bool = False
    # Keys and rate-limit windows in this Redis, shared by every gateway that names it; unset, in this process.
    redis_url: str | None = Field(None, pattern=r"^(redis|rediss|unix)://")
    redis_prefix: str = Field("pagoda", min_length=1)
    redis_timeout_s: float = Field(1.0, gt=0)
    tenants: dict[str, TenantConfig] = Field(default_factory=dict)
    # Tokens a request is charged at admission: its prompt's characters over this, plus its max_tokens (this
    # when it sets none), corrected to its reported usage when it ends.
    chars_per_token: float = Field(4.0, gt=0)
    estimate_max_tokens: int = Field(512, ge=1)
    prices: dict[str, PriceConfig] = Field(default_factory=dict)  # by model group name
    # When the store (Redis) cannot be reached: "open" goes on with this gateway's own limits and the keys it
    # has seen; "closed" answers 503 until it is back.
    on_store_error: Literal["open", "closed"] = "closed"
    # Seconds a key's record is reused without asking the store (a revoked key stops within this).
    key_cache_s: float = Field(5.0, ge=0)
    # Requests that wait for a saturated model group (fair queue) at most, and for at most this long.
    max_queued: int = Field(1024, ge=0)
    queue_timeout_s: float = Field(30.0, gt=0)
    # Forward a request while the store decides its admission when its key's and tenant's windows had ample
    # room at their last admission here; its answer waits for the decision (a refusal still answers 429 and
    # closes the upstream request). Off, every request waits for its admission before it is forwarded.
    overlap_admission: bool = True
    audit: AuditConfig | None = None


class GatewayConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(4000, ge=0, le=65535)
    models: list[ModelGroupConfig] = Field(default_factory=list)
    # Upstreams whose models are discovered from their /v1/models at start (the --upstream quick form).
    discover: list[UpstreamConfig] = Field(default_factory=list)
    discover_policy: Policy = "least_outstanding"
    health: HealthConfig = HealthConfig()
    breaker: BreakerConfig = BreakerConfig()
    timeouts: TimeoutConfig = TimeoutConfig()
    retries: RetryConfig = RetryConfig()
    prefix: PrefixConfig = PrefixConfig()
    session: SessionConfig = SessionConfig()
    max_request_body_bytes: int = Field(8 * 2**20, ge=1024)
    # The admin routes (reload, drain, upstreams) want this key; unset, they are off. The value may name an
    # environment variable as "env:NAME".
    admin_key: str | None = None
    # Seconds a retired config's requests get to finish before its connections are closed.
    drain_timeout_s: float = Field(30.0, ge=0)
    policy: PolicyConfig = PolicyConfig()

    @model_validator(mode="after")
    def _names_are_unique(self) -> GatewayConfig:
        keys = [g.key for g in self.models]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"models: {', '.join(dupes)} listed twice")
        names = {g.name for g in self.models} | set(keys)
        for group in self.models:
            clash = [a for a in group.aliases if a in names]
            if clash:
                raise ValueError(f"models[{group.key}].aliases: {', '.join(clash)} is already a model name")
            unknown = [f for f in group.fallbacks if f not in names and not any(f in g.aliases for g in self.models)]
            if unknown:
                raise ValueError(f"models[{group.key}].fallbacks: unknown model {', '.join(unknown)}")
        for name in {g.name for g in self.models}:
            current = [g.key for g in self.models if g.name == name and g.current]
            if len(current) > 1:
                raise ValueError(f"models: {name} has several current versions ({', '.join(current)})")
        if not self.models and not self.discover:
            raise ValueError("no upstreams: list models (with upstreams) or give --upstream URL")
        return self

    def resolved_admin_key(self) -> str | None:
        if self.admin_key is not None and self.admin_key.startswith("env:"):
            return os.environ.get(self.admin_key[4:]) or None
        return self.admin_key


class GatewayConfigError(ValueError):
    """A config that does not validate; the message names each bad field."""


def parse_config(raw: object, source: str = "config") -> GatewayConfig:
    try:
        return GatewayConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors())
        raise GatewayConfigError(f"{source}: {problems}") from None


def load_config(path: Path) -> GatewayConfig:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise GatewayConfigError(f"{path}: {exc}") from None
    return parse_config(raw if raw is not None else {}, str(path))
