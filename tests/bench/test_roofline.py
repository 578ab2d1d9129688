"""Roofline arithmetic: the model footprint against the real module, the bounds against hand-computed values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagoda.bench.roofline import MachineLimits, ModelFootprint, decode_bounds, measure_machine, roofline
from pagoda.model.loader import _build, load_arch

REPO = Path(__file__).resolve().parents[2]


def test_footprint_counts_the_models_parameters() -> None:
    arch = load_arch("smollm2-135m")
    model = _build(arch, torch.bfloat16)
    real = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    footprint = ModelFootprint.of(arch, dtype_bytes=2)
    assert footprint.params == real
    # Tied embeddings: decode reads the layers and the (shared) output projection.
    assert footprint.decode_params == footprint.params
    assert footprint.decode_weight_bytes == 2 * footprint.params
    assert footprint.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2


@pytest.mark.parametrize("config", ["configs/llama-3.1-8b.json", "configs/qwen3-0.6b.json"])
def test_footprint_of_the_benchmark_shapes(config: str) -> None:
    arch = load_arch(str(REPO / config))
    with torch.device("meta"):  # shapes only: no 16 GB of weights
        model = _build(arch, torch.bfloat16)
    assert ModelFootprint.of(arch, 2).params == sum(p.numel() for p in model.parameters())


def test_decode_bounds_switch_from_memory_to_compute() -> None:
    footprint = ModelFootprint(params=1_000, layer_params=800, decode_params=1_000, decode_weight_bytes=2_000,
                               kv_bytes_per_token=10)
    limits = MachineLimits("test", read_bandwidth_gbs=1e-6, copy_bandwidth_gbs=1e-6,
                           matmul_tflops={"bfloat16": 1e-9})  # 1 kB/s and 1 kFLOP/s
    rows = decode_bounds(footprint, limits, "bfloat16", context_len=10, batches=(1, 100))
    # batch 1: (2000 + 100) B / 1000 B/s = 2.1 s vs 2000 FLOP / 1000 = 2 s -> memory
    assert rows[0] == {"batch": 1, "step_ms": 2100.0, "tok_per_s": round(1 / 2.1, 1), "bound": "memory"}
    # batch 100: 12 s of bytes vs 200 s of FLOPs -> compute, 0.5 tok/s
    assert rows[1] == {"batch": 100, "step_ms": 200000.0, "tok_per_s": 0.5, "bound": "compute"}
    report = roofline(load_arch("smollm2-135m"), MachineLimits("t", 10.0, 10.0, {"bfloat16": 0.5}), "bfloat16", 64)
    assert report["prefill_tok_per_s_bound"] > 0 and len(report["decode"]) == 6


def test_measure_machine_returns_positive_rates() -> None:
    limits = measure_machine(torch.device("cpu"), buffer_mib=16, matmul_size=128, repeats=2, dtypes=("float32",))
    assert limits.read_bandwidth_gbs > 0 and limits.copy_bandwidth_gbs > 0
    assert limits.matmul_tflops["float32"] > 0
