"""The audit log: append-only JSON Lines of admin actions and request decisions, each entry carrying the
SHA-256 of the one before it (``prev``) and of itself (``hash``), so an edited, removed or reordered line
breaks the chain where it was touched (``pagoda audit verify PATH``). Rotated by size to PATH.1, PATH.2, ...
(the chain runs on across files); one file per gateway process.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import IO, Any

import orjson

from pagoda.gateway.config import AuditConfig

logger = logging.getLogger(__name__)
GENESIS = "0" * 64


def canonical(entry: dict[str, Any]) -> bytes:
    """An entry's fields but its own hash, as canonical JSON (sorted keys): what its hash is taken over."""
    return orjson.dumps({k: v for k, v in entry.items() if k != "hash"}, option=orjson.OPT_SORT_KEYS)


def entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(entry)).hexdigest()


def _last_entry(path: Path) -> dict[str, Any] | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 65536))
        lines = f.read().splitlines()
    return orjson.loads(lines[-1]) if lines else None


class AuditLog:
    def __init__(self, config: AuditConfig) -> None:
        self.config = config
        self.path = config.path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        last = _last_entry(self.path) or _last_entry(self._rotated(1))
        self.prev = last["hash"] if last else GENESIS
        self.seq = last["seq"] + 1 if last else 0
        self.file: IO[bytes] = self.path.open("ab")

    def _rotated(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def append(self, event: str, **fields: Any) -> None:
        body = canonical({"seq": self.seq, "ts": round(time.time(), 6), "event": event, **fields, "prev": self.prev})
        digest = hashlib.sha256(body).hexdigest()
        line = body[:-1] + b',"hash":"' + digest.encode() + b'"}\n'  # the same object with its hash last
        if self.file.tell() + len(line) > self.config.max_bytes and self.file.tell() > 0:
            self._rotate()
        self.file.write(line)
        self.prev, self.seq = digest, self.seq + 1

    def flush(self) -> None:
        self.file.flush()

    def _rotate(self) -> None:
        self.file.close()
        oldest = self._rotated(self.config.keep)
        if oldest.exists():
            oldest.unlink()
        for n in range(self.config.keep - 1, 0, -1):
            if self._rotated(n).exists():
                self._rotated(n).rename(self._rotated(n + 1))
        self.path.rename(self._rotated(1))
        self.file = self.path.open("ab")

    def close(self) -> None:
        self.file.close()


def verify(path: Path) -> tuple[bool, str]:
    """Check the chain over PATH's rotated files (oldest first) and PATH. The first kept entry may follow
    entries rotated away; after it every entry must hash to its ``hash`` and name the one before as ``prev``."""
    files = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    files = [f for f in files if f.suffix[1:].isdigit()] + ([path] if path.exists() else [])
    if not files:
        return False, f"{path}: no audit log"
    prev: str | None = None
    count = 0
    for file in files:
        for number, raw in enumerate(file.read_bytes().splitlines(), 1):
            where = f"{file}:{number}"
            try:
                entry = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return False, f"{where}: not a JSON entry"
            if entry.get("hash") != entry_hash(entry):
                return False, f"{where}: the entry was changed (its hash does not match)"
            if prev is not None and entry.get("prev") != prev:
                return False, f"{where}: the chain is broken (an entry before it was removed, added or reordered)"
            prev = entry["hash"]
            count += 1
    return True, f"{count} entries in {len(files)} file(s): the chain is intact"
