"""`pagoda bench roofline`: this machine's memory bandwidth and matmul FLOP/s, and the limits they put on
serving a model, so that every measured number can be read as a fraction of what is physically possible.

    pagoda bench roofline                      # the bundled model on the CPU
    pagoda bench roofline --model config.json --device cuda --context-len 1024

Decode reads every weight once per step (the embedding table only for the rows it looks up, unless tied
to the output projection) and each sequence's KV cache; its time is at least bytes / bandwidth and at
least FLOPs / FLOP/s. Prefill is bounded by FLOPs alone (2 per layer parameter per token, attention left out).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from pagoda.bench import write_json
from pagoda.config import ModelConfig
from pagoda.model.arch_config import ArchConfig

if TYPE_CHECKING:
    import torch

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
DEFAULT_BATCHES = (1, 8, 32, 64, 128, 256)
MATMUL_TRIAL_S = 0.5  # the longest one matmul of the FLOP/s test may take at the next size


@dataclass(frozen=True)
class MachineLimits:
    device: str
    read_bandwidth_gbs: float  # a large reduction: bytes read / s
    copy_bandwidth_gbs: float  # a large copy: (read + write) bytes / s
    matmul_tflops: dict[str, float]  # by dtype name


@dataclass(frozen=True)
class ModelFootprint:
    params: int
    layer_params: int  # the transformer layers: what every prompt token multiplies through
    decode_params: int  # layers + the output projection: what every decoded token multiplies through
    decode_weight_bytes: int  # read once per decode step
    kv_bytes_per_token: int

    @classmethod
    def of(cls, arch: ArchConfig, dtype_bytes: int) -> ModelFootprint:
        h, q_dim, kv_dim = arch.hidden_size, arch.num_attention_heads * arch.head_dim, \
            arch.num_key_value_heads * arch.head_dim
        qk_norms = 2 * arch.head_dim if arch.architecture == "Qwen3ForCausalLM" else 0
        per_layer = h * (q_dim + 2 * kv_dim) + q_dim * h + 3 * h * arch.intermediate_size + 2 * h + qk_norms
        embed = arch.vocab_size * h
        lm_head = 0 if arch.tie_word_embeddings else arch.vocab_size * h
        params = arch.num_hidden_layers * per_layer + embed + lm_head + h
        # Decode reads all layer weights and the output projection (the tied embedding when tied).
        decode_params = arch.num_hidden_layers * per_layer + arch.vocab_size * h + h
        kv = 2 * arch.num_hidden_layers * kv_dim * dtype_bytes
        return cls(params, arch.num_hidden_layers * per_layer, decode_params, decode_params * dtype_bytes, kv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn: Any, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_read_bandwidth(device: torch.device, buffer_mib: int, repeats: int = 10) -> float:
    """GB/s of reading a large buffer on ``device`` (a sum over it: a read-only stream, best of ``repeats``)."""
    import torch

    buffer = torch.ones(buffer_mib * 2**20 // 4, dtype=torch.float32, device=device)
    seconds = _best_time(lambda: buffer.sum(), device, repeats)
    return round(buffer.numel() * 4 / seconds / 1e9, 2)


def measure_copy_bandwidth(device: torch.device, buffer_mib: int, repeats: int = 10) -> float:
    """GB/s of a large copy on ``device``, counting bytes read plus bytes written (best of ``repeats``)."""
    import torch

    source = torch.ones(buffer_mib * 2**20 // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    seconds = _best_time(lambda: target.copy_(source), device, repeats)
    return round(2 * source.numel() * 4 / seconds / 1e9, 2)


def measure_machine(device: torch.device, buffer_mib: int = 512, matmul_size: int = 2048,
                    repeats: int = 5, dtypes: tuple[str, ...] = ("bfloat16", "float32")) -> MachineLimits:
    """Best of ``repeats``: bandwidth over a ``buffer_mib`` buffer, FLOP/s of square matmuls."""
    import torch

    read_gbs = measure_read_bandwidth(device, buffer_mib, repeats)
    copy_gbs = measure_copy_bandwidth(device, buffer_mib, repeats)
    tflops: dict[str, float] = {}
    for name in tqdm(dtypes, desc="matmul", leave=False):
        dtype = getattr(torch, name)
        size, seconds = _sized_matmul(dtype, device, matmul_size, repeats)
        # Significant digits, not decimals: a slow machine or a tiny test size must not round to 0.
        tflops[name] = float(f"{2 * size**3 / seconds / 1e12:.3g}")
    return MachineLimits(str(device), read_gbs, copy_gbs, tflops)


def _sized_matmul(dtype: torch.dtype, device: torch.device, max_size: int, repeats: int) -> tuple[int, float]:
    """(size, best seconds) of square matmuls, doubling from 256 up to ``max_size`` while one takes under
    MATMUL_TRIAL_S: a CPU without native bf16 (AVX2 only) runs it ~1000x slower and must not take minutes."""
    import torch

    size = min(256, max_size)
    while True:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        seconds = _best_time(lambda: torch.mm(a, b), device, repeats)
        if size * 2 > max_size or seconds * 8 > MATMUL_TRIAL_S:
            return size, seconds
        size *= 2


def decode_bounds(footprint: ModelFootprint, limits: MachineLimits, dtype: str, context_len: int,
                  batches: tuple[int, ...] = DEFAULT_BATCHES) -> list[dict[str, float]]:
    """Upper bounds on decode tokens/s at each batch size, every sequence holding ``context_len`` tokens."""
    bandwidth = limits.read_bandwidth_gbs * 1e9
    flops = limits.matmul_tflops[dtype] * 1e12
    rows = []
    for batch in batches:
        bytes_read = footprint.decode_weight_bytes + batch * context_len * footprint.kv_bytes_per_token
        memory_s = bytes_read / bandwidth
        compute_s = 2 * footprint.decode_params * batch / flops
        step_s = max(memory_s, compute_s)
        rows.append({"batch": batch, "step_ms": round(step_s * 1e3, 3), "tok_per_s": round(batch / step_s, 1),
                     "bound": "memory" if memory_s >= compute_s else "compute"})
    return rows


def roofline(arch: ArchConfig, limits: MachineLimits, dtype: str, context_len: int) -> dict[str, Any]:
    footprint = ModelFootprint.of(arch, DTYPE_BYTES[dtype])
    return {
        "machine": asdict(limits),
        "model": {**asdict(footprint), "dtype": dtype, "context_len": context_len},
        # Prefill computes logits for the last prompt token only: the layers bound it.
        "prefill_tok_per_s_bound": round(limits.matmul_tflops[dtype] * 1e12 / (2 * footprint.layer_params), 1),
        "decode": decode_bounds(footprint, limits, dtype, context_len),
    }


def format_report(report: dict[str, Any]) -> str:
    m, model = report["machine"], report["model"]
    lines = [
        f"device {m['device']}: read {m['read_bandwidth_gbs']} GB/s, copy {m['copy_bandwidth_gbs']} GB/s, "
        + ", ".join(f"{k} matmul {v} TFLOP/s" for k, v in m["matmul_tflops"].items()),
        f"model: {model['params'] / 1e6:.1f} M parameters, {model['decode_weight_bytes'] / 1e6:.1f} MB of "
        f"{model['dtype']} weights read per decode step, {model['kv_bytes_per_token'] / 1e3:.1f} kB of KV per token",
        f"prefill bound: {report['prefill_tok_per_s_bound']:.0f} tok/s",
        f"decode bounds at {model['context_len']} tokens of context per sequence:",
        f"{'batch':>7}{'step (ms)':>12}{'tok/s':>12}  bound",
    ]
    lines += [f"{r['batch']:>7}{r['step_ms']:>12.2f}{r['tok_per_s']:>12.1f}  {r['bound']}" for r in report["decode"]]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=ModelConfig().model, help="model name, path or config.json")
    parser.add_argument("--dtype", choices=["auto", *sorted(DTYPE_BYTES)], default="auto",
                        help="serving dtype (auto: the one `pagoda serve` picks on this device)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when present)")
    parser.add_argument("--context-len", type=int, default=512, help="tokens held per sequence while decoding")
    parser.add_argument("--buffer-mib", type=int, default=512, help="bandwidth test buffer")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--out", default=None, help="write the report here as JSON")


def run(args: argparse.Namespace) -> int:
    import torch

    from pagoda.model.loader import default_dtype, load_arch

    if args.context_len < 1:
        raise ValueError(f"--context-len must be >= 1, got {args.context_len}")
    arch = load_arch(args.model)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.dtype == "auto":
        args.dtype = str(default_dtype(device)).removeprefix("torch.")
    dtypes = tuple(dict.fromkeys([args.dtype, "bfloat16", "float32"]))
    limits = measure_machine(torch.device(device), args.buffer_mib, args.matmul_size, dtypes=dtypes)
    report = roofline(arch, limits, args.dtype, args.context_len)
    print(format_report(report))
    if args.out:
        write_json(args.out, report)
    return 0
