"""Pagoda's CPU kernels for --quantization int4 / int8 against torch's own (`_weight_int4pack_mm_for_cpu`,
`_weight_int8pack_mm`) on the same codes, scales and zero points: the bundled model's projection shapes, bf16
activations, the weights cycled through ~100 MB of copies as a decode step streams them (best of 3-5).

    python scripts/quant_kernels_vs_torch.py --rows 1,4,16,64,256 --group 64

Also printed: each result's largest error against x @ W.T of the dequantized weights, over the largest |output|
(Pagoda quantizes x to int8 per block of 32; torch keeps bf16).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType

from pagoda.model.cpu_kernels import load_cpu_kernels
from pagoda.model.layers.quantization import int4, panels
from pagoda.model.layers.quantization.gguf import panel_format
from pagoda.model.layers.quantization.grid import dequantize_groups, quantize_groups
from pagoda.model.layers.quantization.int8 import q8_0_blocks, quantize_int8_rows

SHAPES = [(3072, 576), (576, 1536), (960, 576)]  # gate_up, down, qkv of SmolLM2-135M
COPIES_BYTES = 100e6
Q8_0 = GGMLQuantizationType.Q8_0


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).abs().max() / ref.abs().max()).item()


def compare(name: str, shape: tuple[int, int], rows: int, ours: tuple[Callable, torch.Tensor],
            theirs: tuple[Callable, torch.Tensor], dense: torch.Tensor) -> None:
    """ours / theirs: (f(x, weight), weight); dense: the dequantized weight."""
    k = shape[1]
    x = torch.randn(rows, k).to(torch.bfloat16)
    ref = x.float() @ dense.T
    times, errors = [], []
    for fn, weight in (ours, theirs):
        errors.append(relative_error(fn(x, weight), ref))
        copies = [weight.clone() for _ in range(max(2, int(COPIES_BYTES / weight.numel())))]
        seconds = best_seconds(lambda: [fn(x, w) for w in copies], 5 if rows <= 16 else 3)
        times.append(seconds / len(copies))
    print(f"{name} {shape[0]}x{k} rows {rows:4d}: pagoda {times[0] * 1e6:8.1f} us, torch {times[1] * 1e6:8.1f} us "
          f"({times[1] / times[0]:.2f}x); error: pagoda {errors[0]:.4f}, torch {errors[1]:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,4,16,64,256", help="comma-separated row counts of x")
    parser.add_argument("--group", type=int, default=64, help="int4 group size (torch needs it to divide 576)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    ops = load_cpu_kernels()
    if ops is None:
        raise SystemExit("needs Pagoda's C++ CPU kernels")
    torch.set_num_threads(args.threads)
    row_counts = [int(r) for r in args.rows.split(",")]
    group = args.group
    for shape in SHAPES:
        out, k = shape
        torch.manual_seed(out + k)
        q, scale, zero = quantize_groups(torch.randn(out, k), group, bits=4, sym=False)
        ours = panels.pack(int4.pack_rows(q, scale, zero), int4.panel_format(k, group))
        packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        # torch's convention: w = (q - 8) * scale + zero, as [groups, out, 2].
        s = scale.float()
        scales_zeros = torch.stack([s, (8 - zero.float()) * s], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        dense = dequantize_groups(q, scale, zero, group)
        for rows in row_counts:
            compare(f"int4 g{group}", shape, rows, (lambda x, w: ops.int4_linear(x, w, group, None), ours),
                    (lambda x, w: torch._weight_int4pack_mm_for_cpu(x, w, group, scales_zeros), packed), dense)
        q8, scale8 = quantize_int8_rows(torch.randn(out, k), torch.float16)
        ours8 = panels.pack(q8_0_blocks(q8, scale8[:, None].expand(-1, k // 32)), panel_format(Q8_0, k))
        scale_bf16 = scale8.to(torch.bfloat16)
        dense8 = q8.float() * scale8.float()[:, None]
        for rows in row_counts:
            compare("int8", shape, rows, (lambda x, w: ops.gguf_linear(x, w, int(Q8_0), None), ours8),
                    (lambda x, w: torch._weight_int8pack_mm(x, w, scale_bf16), q8), dense8)


if __name__ == "__main__":
    main()
