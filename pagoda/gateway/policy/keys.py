"""Virtual keys: what a key may do (its tenant, role, models and limits), stored under the SHA-256 of the key.

A key is ``pk-`` and 43 characters of a 32-byte random secret, shown once when it is made; the store keeps
only its digest, so a leaked store gives no usable key. A lookup hashes whatever the client sent and reads
one entry by that digest whatever its shape, so a malformed key costs the same as a wrong one.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pagoda.gateway.config import BudgetConfig

Role = Literal["admin", "user", "read-only"]
KEY_PREFIX = "pk-"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$"


class Limits(BaseModel):
    """Requests and tokens per minute and requests in flight (None: unlimited)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_concurrency: int | None = Field(None, ge=1)


class KeySpec(Limits):
    """``POST /admin/keys``: all but the tenant optional."""

    tenant: str = Field(pattern=NAME_PATTERN)
    role: Role = "user"
    models: list[str] | None = Field(None, min_length=1)  # None: every model
    budget: BudgetConfig | None = None
    priority: int = Field(0, ge=-100, le=100)  # higher goes first when its model's upstreams are saturated


@dataclass
class KeyRecord:
    key_id: str
    digest: str
    tenant: str
    role: Role
    models: list[str] | None
    rpm: int | None
    tpm: int | None
    max_concurrency: int | None
    created: float
    revoked: float | None = None  # when
    budget: dict[str, Any] | None = None  # a BudgetConfig's fields
    priority: int = 0

    @classmethod
    def issue(cls, spec: KeySpec) -> tuple[str, KeyRecord]:
        """A new key (the only time its text exists) and its record."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        record = cls(secrets.token_hex(8), digest(key), spec.tenant, spec.role, spec.models, spec.rpm, spec.tpm,
                     spec.max_concurrency, time.time(),
                     budget=None if spec.budget is None else spec.budget.model_dump(exclude_none=True),
                     priority=spec.priority)
        return key, record

    def spec(self) -> KeySpec:
        return KeySpec(tenant=self.tenant, role=self.role, models=self.models, rpm=self.rpm, tpm=self.tpm,
                       max_concurrency=self.max_concurrency,
                       budget=None if self.budget is None else BudgetConfig(**self.budget), priority=self.priority)

    def limits(self) -> Limits:
        return Limits(rpm=self.rpm, tpm=self.tpm, max_concurrency=self.max_concurrency)

    def public(self) -> dict[str, Any]:
        """What the admin API shows: everything but the digest."""
        return {k: v for k, v in asdict(self).items() if k != "digest"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> KeyRecord:
        return cls(**raw)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a key's record, or the gateway's own admin key (tenant ``admin``)."""

    key_id: str
    tenant: str
    role: Role
    models: list[str] | None = None
    limits: Limits = field(default_factory=Limits)
    budget: BudgetConfig | None = None
    priority: int = 0

    @classmethod
    def of(cls, record: KeyRecord) -> Principal:
        return cls(record.key_id, record.tenant, record.role, record.models, record.limits(),
                   None if record.budget is None else BudgetConfig(**record.budget), record.priority)
