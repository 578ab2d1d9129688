"""Who may call the server: API keys, the public-bind rule and the per-tenant prefix-cache salt.

Free of the web stack so ``pagoda serve`` can run these checks before it starts the engine.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from pathlib import Path

from pagoda.config import ServerConfig


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_api_keys(sc: ServerConfig) -> list[bytes]:
    """Keys from --api-key, PAGODA_API_KEY and --api-key-file (one per line, '#' comments). A key file
    that yields no key is refused: it must never turn authentication off."""
    keys = [k for k in (sc.api_key, os.environ.get("PAGODA_API_KEY")) if k]
    if sc.api_key_file:
        lines = [line.strip() for line in Path(sc.api_key_file).read_text().splitlines()]
        from_file = [line for line in lines if line and not line.startswith("#")]
        if not from_file:
            raise ValueError(f"api_key_file {sc.api_key_file!r} holds no keys (only blank or comment lines); "
                             "refusing to start without authentication")
        keys += from_file
    return [k.encode() for k in keys]


def check_exposure(sc: ServerConfig, has_keys: bool) -> None:
    if not has_keys and not is_loopback(sc.host) and not sc.allow_unauthenticated:
        raise ValueError(f"refusing to serve on {sc.host} (reachable from other machines) without an API key: "
                         "pass --api-key / --api-key-file (or set PAGODA_API_KEY), or --allow-unauthenticated "
                         "to serve openly")


def tenant_salt(api_key: bytes | None, cache_salt: str | None) -> str | None:
    """The prefix-cache salt of one request: a digest of its API key (never the key itself, which would
    travel to the engine process) joined with the request's own ``cache_salt``."""
    parts = []
    if api_key:
        parts.append(hashlib.sha256(b"pagoda-tenant\0" + api_key).hexdigest()[:32])
    if cache_salt:
        parts.append(cache_salt)
    return "\0".join(parts) or None
