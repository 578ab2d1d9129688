"""Time the Triton quantized-linear kernel (pagoda/model/layers/quantization/triton_linear.py) on a CUDA GPU:
each row layout at the Llama-3.1-8B projection shapes, decode-sized and prompt-sized inputs, several tilings
beside the one ``tiles_for`` picks, against bf16 cuBLAS on the dequantized weights and dequantize-then-cuBLAS.

    python scripts/bench_quantized_gpu.py --out bench_out/gpu/quantized_kernels.json

Every variant is first checked against the dequantized weights' product in fp32 (fresh random inputs). Each
timing replays a CUDA graph of consecutive calls over enough copies of the weights to overflow the L2 (a
decode step's launches run from a graph too), median of several replays. Bandwidth: the weight bytes read
once per call (plus input and output) over the time, against a device-to-device copy measured here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pagoda.model.layers.quantization import triton_linear as tl_
from pagoda.model.layers.quantization.gguf import dequantize_rows, regroup_rows
from pagoda.model.layers.quantization.grid import quantize_groups
from pagoda.model.layers.quantization.int4 import Int4LinearMethod, pack_rows
from pagoda.model.layers.quantization.int8 import q8_0_blocks, quantize_int8_rows

# (name, out features, in features) of Llama-3.1-8B's projections
SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
LM_HEAD = ("lm_head", 128256, 4096)
GROUP = 128  # --quantization int4's default
L2_OVERFLOW_BYTES = 256 << 20


def make_layer(kind: int, n: int, k: int, device: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(rows as the kernel reads them, int8's scales or None, the same weights dequantized to bf16)."""
    w = torch.randn(n, k, device=device) * 0.02
    if kind == tl_.INT4:
        rows = pack_rows(*quantize_groups(w, GROUP, bits=4, sym=False))
        return rows, None, Int4LinearMethod(None, GROUP).dequantize_weight(rows, k, torch.bfloat16)
    if kind == tl_.INT8:
        q, scale = quantize_int8_rows(w)
        scale = scale.to(torch.bfloat16)
        return q, scale, q.to(torch.bfloat16) * scale[:, None]
    from gguf import GGMLQuantizationType as T

    qtype = T(kind)
    if qtype == T.Q8_0:
        q, scale = quantize_int8_rows(w)
        rows = q8_0_blocks(q, scale[:, None].expand(-1, k // 32))
    else:  # Q4_0 as llama.cpp's reference quantizer writes it: d = (the largest-magnitude weight) / -8
        blocks = w.reshape(n, k // 32, 32)
        d = blocks.gather(2, blocks.abs().argmax(dim=2, keepdim=True)).squeeze(2) / -8
        inverse = torch.where(d == 0, 0.0, 1 / d)
        q = torch.clamp(torch.floor(blocks * inverse[..., None] + 8.5), 0, 15).to(torch.uint8)
        nibbles = q[..., :16] | (q[..., 16:] << 4)
        raw = torch.cat([d.to(torch.float16)[..., None].view(torch.uint8), nibbles], dim=2).reshape(n, -1)
        rows = regroup_rows(raw, qtype)
    return rows, None, dequantize_rows(None, rows, qtype, k, torch.bfloat16)


def graph_time_us(calls: list[Callable[[], object]], replays: int = 20) -> float:
    """Median time per call of ``calls`` captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls[:3]:
            call()  # compile / warm outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(calls))
    return statistics.median(times)


def copy_bandwidth_gbs(device: str) -> float:
    src = torch.randn(1 << 28, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    us = graph_time_us([lambda: dst.copy_(src)] * 5, replays=10)
    return 2 * src.numel() * src.element_size() / us / 1e3


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def variants(rows: int, n: int, device: torch.device) -> list[tl_.Tiles]:
    chosen = tl_.tiles_for(rows, n, device, torch.bfloat16)
    if rows <= 16:
        tried = [tl_.Tiles(16, bn) for bn in (16, 32, 64, 128)] + [tl_.Tiles(16, 64, 8), tl_.Tiles(16, 128, 8)]
    else:
        tried = [tl_.Tiles(16, 64), tl_.Tiles(64, 64), tl_.Tiles(64, 128, 8), tl_.Tiles(128, 64, 8)]
    return [chosen] + [t for t in tried if t != chosen]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out/gpu/quantized_kernels.json")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 1024])
    args = parser.parse_args()
    device = "cuda"
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"{torch.cuda.get_device_name()}: copy {copy_gbs:.0f} GB/s (read + write)", flush=True)
    results: list[dict[str, object]] = []
    plan = [(tl_.INT4, s) for s in SHAPES] + [(tl_.Q4_0, SHAPES[2]), (tl_.Q8_0, SHAPES[2]), (tl_.INT8, SHAPES[2]),
                                               (tl_.INT8, LM_HEAD)]
    failures = 0

    def record(case: dict[str, object], io_bytes: int, system: str, tiles: tl_.Tiles | None, us: float,
               weight_bytes: int, error: float | None) -> None:
        gbs = (weight_bytes + io_bytes) / us / 1e3
        tflops = 2 * case["rows"] * case["n"] * case["k"] / us / 1e6
        results.append({**case, "system": system, "tiles": None if tiles is None else asdict(tiles), "us": round(us, 2),
                        "gbs": round(gbs, 1), "bandwidth_fraction": round(gbs / copy_gbs, 3),
                        "tflops": round(tflops, 1), "rel_error": error})
        print(f"{case['kind']:>2} {case['layer']:>8} rows {case['rows']:>5} {system:<28} {us:9.2f} us {gbs:7.0f} GB/s "
              f"({gbs / copy_gbs:.2f}) {tflops:6.1f} TFLOP/s err {error}", flush=True)

    for kind, (name, n, k) in plan:
        qweight, scale, dense = make_layer(kind, n, k, device)
        qbytes = qweight.numel() * qweight.element_size() + (0 if scale is None else scale.numel() * 2)
        copies = max(1, -(-L2_OVERFLOW_BYTES // qbytes))
        qweights = [qweight] + [qweight.clone() for _ in range(copies - 1)]
        denses = [dense] + [dense.clone() for _ in range(max(1, -(-L2_OVERFLOW_BYTES // dense.nbytes)) - 1)]
        for rows in args.rows:
            x = torch.randn(rows, k, device=device).to(torch.bfloat16)
            ref = F.linear(x.float(), dense.float())
            io_bytes = x.nbytes + rows * n * 2
            case = {"kind": kind, "layer": name, "n": n, "k": k, "rows": rows}

            us = graph_time_us([lambda d=d: F.linear(x, d) for d in denses] * max(1, 8 // len(denses)))
            record(case, io_bytes, "bf16 cublas", None, us, dense.nbytes, None)
            if rows > 16 and kind == tl_.INT4:  # dequantize, then the dense product
                method = Int4LinearMethod(None, GROUP)
                us = graph_time_us([lambda q=q: F.linear(x, method.dequantize_weight(q, k, torch.bfloat16))
                                    for q in qweights[:4]])
                record(case, io_bytes, "dequantize + cublas (torch)", None, us, qbytes + 2 * dense.nbytes, None)
            if kind == tl_.INT8:
                try:
                    got = torch._weight_int8pack_mm(x, qweight, scale)
                    err = relative_error(got, ref)
                    us = graph_time_us([lambda q=q: torch._weight_int8pack_mm(x, q, scale) for q in qweights])
                    record(case, io_bytes, "torch _weight_int8pack_mm", None, us, qbytes, err)
                except RuntimeError as e:
                    print(f"   torch._weight_int8pack_mm: {str(e).splitlines()[0]}")
            for tiles in variants(rows, n, torch.device(device)):
                label = ("chosen " if tiles == tl_.tiles_for(rows, n, torch.device(device), torch.bfloat16) else "") + \
                    f"m{tiles.block_m} n{tiles.block_n} w{tiles.num_warps}"
                try:
                    def call(q: torch.Tensor = qweight, t: tl_.Tiles = tiles) -> torch.Tensor:
                        return tl_.quantized_linear(x, q, kind, k, None, GROUP, scale=scale, tiles=t)

                    # (every output checked: unwritten elements of the kernel's torch.empty output would be off)
                    err = relative_error(call(), ref)
                    if not err < 2e-2:
                        failures += 1
                        print(f"   WRONG: {label} relative error {err}")
                    us = graph_time_us([lambda q=q: call(q) for q in qweights] * max(1, 8 // len(qweights)))
                    record(case, io_bytes, label, tiles, us, qbytes, err)
                except Exception as e:  # noqa: BLE001 - a tiling that fails to compile is reported, the rest go on
                    failures += 1
                    print(f"   FAILED {label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        del qweights, denses
        torch.cuda.empty_cache()
        # after each layer: what a cut-short run measured is kept
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_gbs": copy_gbs,
                                              "results": results}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
