"""`pagoda bench startup`: seconds from launching `pagoda serve` to the first 200 from /health, repeated.

    pagoda bench startup --repeats 5

Each run starts a fresh server on a free loopback port (the C++ kernels must be built already: the first
start after an install compiles them), then stops it with SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from pagoda.bench import write_json

POLL_S = 0.02


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Launched:
    process: subprocess.Popen[bytes]
    url: str
    ready_s: float


@contextmanager
def launched(serve_args: list[str], timeout_s: float) -> Iterator[Launched]:
    """A `pagoda serve` on a free loopback port, ready; stopped with SIGTERM on leaving."""
    port = _free_port()
    cmd = [sys.executable, "-m", "pagoda.cli", "serve", "--port", str(port), "--log-level", "warning", *serve_args]
    start = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        yield Launched(process, url, _wait_ready(process, url, start, timeout_s))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(process: subprocess.Popen[bytes], url: str, start: float, timeout_s: float) -> float:
    while time.perf_counter() - start < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"pagoda serve exited with {process.returncode}: "
                               f"{process.stderr.read().decode(errors='replace')[-2000:] if process.stderr else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(POLL_S)
    raise RuntimeError(f"pagoda serve was not ready within {timeout_s} s")


def time_to_ready(serve_args: list[str], timeout_s: float) -> float:
    with launched(serve_args, timeout_s) as server:
        return server.ready_s


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for one start")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    parser.add_argument("serve_args", nargs=argparse.REMAINDER, help="arguments for pagoda serve, after --")


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    serve_args = [a for a in args.serve_args if a != "--"]
    times = [time_to_ready(serve_args, args.timeout) for _ in range(args.repeats)]
    result = {"serve_args": serve_args, "ready_s": [round(t, 2) for t in times],
              "median_s": round(statistics.median(times), 2), "min_s": round(min(times), 2),
              "max_s": round(max(times), 2)}
    print(f"pagoda serve ready in {result['median_s']} s (median of {len(times)}; "
          f"{result['min_s']}-{result['max_s']} s)")
    if args.out:
        write_json(args.out, result)
    return 0
