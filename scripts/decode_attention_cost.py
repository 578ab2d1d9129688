"""Paged decode attention on the CPU kernels (`paged_decode_attention`, the one-call decode's attention): time per
token of context and the K/V bytes it reads per second, over 30 layers' caches laid out as the engine lays them
(bf16 queries, a bf16 / int8 / fp8 cache in blocks of 16, huge pages), cold (a 64 MB buffer is written between passes, as a step's weights stream
between two layers' attention) or hot (one layer's cache again and again).

    python scripts/decode_attention_cost.py                      # one row (batch-1 decode) at 500-2000 tokens
    python scripts/decode_attention_cost.py --rows 16 --distinct # 16 sequences, each its own blocks
    python scripts/decode_attention_cost.py --kv-cache-dtype int8
    python scripts/decode_attention_cost.py --against OLD/csrc   # and a second build from other kernel sources,
                                                                 # interleaved pass by pass, with the paired ratio

The bundled model's shape by default: 9 query heads over 3 KV heads of 64.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from types import ModuleType

import torch

from pagoda.model import cpu_kernels
from pagoda.model.attention.kv_format import KVCacheFormat
from pagoda.model.huge_pages import huge_page_empty

LAYERS, BLOCK_SIZE, FLUSH_BYTES = 30, 16, 64 << 20


def load_other_build(sources: Path) -> ModuleType:
    build = cpu_kernels.KernelBuild(name="pagoda_cpu_ops_against", include_dir=sources,
                                    sources=tuple(sources / name for name in cpu_kernels._SOURCES))
    return build.load(verbose=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--distinct", action="store_true", help="each row its own blocks (else one sequence's rows)")
    parser.add_argument("--contexts", default="500,1000,2000")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (bf16), int8 or fp8")
    parser.add_argument("--hot", action="store_true")
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--against", type=Path, help="a csrc folder to build and time beside this checkout's")
    args = parser.parse_args()
    builds = {"this": cpu_kernels.load_cpu_kernels()}
    if builds["this"] is None:
        raise SystemExit("the C++ CPU kernels did not build")
    if args.against is not None:
        builds["against"] = load_other_build(args.against)
    contexts = [int(c) for c in args.contexts.split(",")]
    per_row = -(-max(contexts) // BLOCK_SIZE)
    num_blocks = per_row * (args.rows if args.distinct else 1)
    gen = torch.Generator().manual_seed(0)
    kv_format = KVCacheFormat.of(args.kv_cache_dtype, torch.bfloat16)
    width = kv_format.row_width(args.head_dim)
    shape = (2, num_blocks, BLOCK_SIZE, args.kv_heads, args.head_dim)
    caches = [huge_page_empty((*shape[:-1], width), kv_format.storage_dtype)
              .copy_(kv_format.encode(torch.randn(shape, generator=gen).to(torch.bfloat16)))
              for _ in range(1 if args.hot else LAYERS)]
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8)
    tables = (torch.randperm(num_blocks, generator=gen).view(args.rows, per_row) if args.distinct
              else torch.randperm(num_blocks, generator=gen).repeat(args.rows, 1))
    q = torch.randn(args.rows, args.heads, args.head_dim, generator=gen).to(torch.bfloat16)
    kv_bytes_per_token = kv_format.bytes_per_token(args.kv_heads, args.head_dim)
    print(f"{args.rows} row(s), {'distinct sequences' if args.distinct else 'one sequence'}, {kv_format.kind} "
          f"cache, {'hot' if args.hot else 'cold'}; ns per token of context and layer (all rows' tokens counted)")
    for context in contexts:
        lens = (torch.full((args.rows,), context) if args.distinct
                else torch.arange(context - args.rows + 1, context + 1))
        tokens = int(lens.sum()) if args.distinct else context
        times: dict[str, list[float]] = {name: [] for name in builds}
        for step in range(args.passes + 1):
            order = list(builds.items()) if step % 2 else list(reversed(builds.items()))
            for name, ops in order:
                if not args.hot:
                    flush.add_(1)
                start = time.perf_counter()
                for cache in (caches[0],) * LAYERS if args.hot else caches:
                    ops.paged_decode_attention(q, cache[0], cache[1], tables, lens, args.head_dim**-0.5)
                if step:  # the first pass warms up
                    times[name].append((time.perf_counter() - start) / LAYERS)
        line = [f"context {context}:"]
        for name, seconds in times.items():
            ns = statistics.median(seconds) * 1e9 / tokens
            line.append(f"{name} {ns:.1f} ns ({kv_bytes_per_token / ns:.1f} GB/s of K/V)")
        if "against" in times:
            ratios = [a / b for a, b in zip(times["against"], times["this"], strict=True)]
            line.append(f"against/this paired median {statistics.median(ratios):.3f}")
        print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
