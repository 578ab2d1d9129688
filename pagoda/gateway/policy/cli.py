"""`pagoda usage` (a gateway's usage table) and `pagoda audit verify` (an audit log's hash chain)."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import httpx

from pagoda.gateway.policy.audit import verify
from pagoda.gateway.policy.records import GROUP_BY


def add_usage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:4000", help="the gateway")
    parser.add_argument("--admin-key", default=None, help="an admin or read-only key (default: $PAGODA_ADMIN_KEY)")
    parser.add_argument("--group-by", choices=GROUP_BY, default="tenant")
    parser.add_argument("--start", default=None, help="ISO time or Unix seconds (default: 24 hours ago)")
    parser.add_argument("--end", default=None, help="ISO time or Unix seconds (default: now)")


def _when(text: str | None, name: str) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--{name} must be an ISO time (2026-12-06T10:00) or Unix seconds, got {text!r}") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()


def run_usage(args: argparse.Namespace) -> int:
    key = args.admin_key or os.environ.get("PAGODA_ADMIN_KEY")
    if not key:
        raise ValueError("pagoda usage needs --admin-key or PAGODA_ADMIN_KEY (an admin or read-only key)")
    params: dict[str, str | float] = {"group_by": args.group_by}
    for name in ("start", "end"):
        value = _when(getattr(args, name), name)
        if value is not None:
            params[name] = value
    answer = httpx.get(f"{args.url.rstrip('/')}/admin/usage", params=params,
                       headers={"Authorization": f"Bearer {key}"}, timeout=30)
    if answer.status_code != 200:
        message = answer.json().get("error", {}).get("message", answer.text) if answer.content else answer.reason_phrase
        print(f"error: {answer.status_code}: {message}", file=sys.stderr)
        return 1
    rows = answer.json()["data"]
    header = (args.group_by, "requests", "prompt tokens", "completion tokens", "cost ($)")
    table = [header] + [(str(r["group"]), str(r["requests"]), str(r["prompt_tokens"]), str(r["completion_tokens"]),
                         f"{r['cost']:.6f}") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for n, row in enumerate(table):
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    return 0


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    check = actions.add_parser("verify", help="check the hash chain of an audit log and its rotated files")
    check.add_argument("path", type=Path)


def run_audit(args: argparse.Namespace) -> int:
    ok, message = verify(args.path)
    print(message if ok else f"TAMPERED: {message}")
    return 0 if ok else 1
