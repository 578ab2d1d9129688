"""`pagoda gateway` (one endpoint over many OpenAI-compatible upstreams) and `pagoda up` (N local replicas
plus a gateway in one command)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pagoda.gateway.config import GatewayConfig, load_config, parse_config

READY_TIMEOUT_S = 300.0


def add_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="gateway.yaml (schema: pagoda/gateway/config.py)")
    parser.add_argument("--upstream", action="append", default=[], metavar="URL",
                        help="an OpenAI-compatible server whose models are discovered (repeatable)")
    parser.add_argument("--policy", default=None, help="routing policy for discovered models")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default 4000)")
    parser.add_argument("--admin-key", default=None, help="key for the /admin/ routes (or env:NAME)")
    parser.add_argument("--require-keys", action="store_true", default=None,
                        help="every route but /health wants a key made through POST /admin/keys")
    parser.add_argument("--redis-url", default=None,
                        help="keep keys and rate limits in this Redis, shared by gateways (default: in process)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def gateway_config(args: argparse.Namespace) -> GatewayConfig:
    """The config file's tree with the command line's overrides, validated once as a whole."""
    base = load_config(args.config).model_dump(mode="json", exclude_unset=True) if args.config else {}
    if args.upstream:
        base["discover"] = [*base.get("discover", []), *({"url": u} for u in args.upstream)]
    for key, value in (("discover_policy", args.policy), ("host", args.host), ("port", args.port),
                       ("admin_key", args.admin_key)):
        if value is not None:
            base[key] = value
    for key, value in (("require_keys", args.require_keys), ("redis_url", args.redis_url)):
        if value is not None:
            base["policy"] = {**base.get("policy", {}), key: value}
    return parse_config(base, str(args.config or "command line"))


def run_gateway(args: argparse.Namespace) -> int:
    from pagoda.gateway.app import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = gateway_config(args)
    _use_uvloop()
    asyncio.run(serve(config, args.config))
    return 0


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def add_up_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, help="the model each replica serves (default: bundled)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--port", type=int, default=4000, help="the gateway's port")
    parser.add_argument("--policy", default="prefix", help="routing policy over the replicas")
    parser.add_argument("--kv-cache-gib", default="0.5", help="each replica's KV cache (CPU)")
    parser.add_argument("serve_args", nargs=argparse.REMAINDER, help="after --: more `pagoda serve` flags")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the replica for {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the replica {url} was not ready in {READY_TIMEOUT_S:.0f} s")


def replica_env(replicas: int) -> dict[str, str]:
    """Each local replica's environment: an equal share of this machine's cores for its engine's threads
    (unless OMP_NUM_THREADS is set already). Engines that each spread over every core spin at each other's
    barriers: with two replicas on two cores a busy one stalled the other's requests for seconds."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // replicas)))
    return env


def run_up(args: argparse.Namespace) -> int:
    """Start the replicas, wait until each answers /health, then run the gateway in this process; every
    child is stopped when the gateway exits (or this process is signalled)."""
    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # run the clean-up below
    extra = [a for a in args.serve_args if a != "--"]
    children: list[subprocess.Popen[bytes]] = []
    urls = []
    try:
        for _ in range(args.replicas):
            port = _free_port()
            cmd = [sys.executable, "-m", "pagoda.cli", "serve", "--port", str(port), "--kv-cache-gib",
                   args.kv_cache_gib, *([args.model] if args.model else []), *extra]
            children.append(subprocess.Popen(cmd, start_new_session=True, env=replica_env(args.replicas)))
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + READY_TIMEOUT_S
        for url, child in zip(urls, children):
            _wait_ready(url, child, deadline)
        print(f"pagoda up: {args.replicas} replicas ({', '.join(urls)}); gateway on http://127.0.0.1:{args.port}",
              flush=True)
        gateway = argparse.Namespace(config=None, upstream=urls, policy=args.policy, host=None, port=args.port,
                                     admin_key=None, require_keys=None, redis_url=None, log_level="info")
        return run_gateway(gateway)
    finally:
        for child in children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
        for child in children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
