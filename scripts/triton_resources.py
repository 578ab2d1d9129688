"""Compile Pagoda's Triton kernels for a CUDA GPU on a machine without one, and report what each launch
configuration costs the GPU: registers per thread, bytes spilled to local memory, and which tensor-core
instruction its products use. Triton ships the CUDA assembler (ptxas) and cuobjdump, so this needs no GPU.

    python scripts/triton_resources.py                  # Hopper (sm_90) and Ampere (sm_80)
    python scripts/triton_resources.py --arch 90 --json

Every launch the engine makes for the shipped model shapes (configs/*.json and the bundled SmolLM2) in
bf16, fp16 and fp32: KV write and paged attention (decode and prefill programs) for each KV cache format (the
model dtype, int8, fp8 e4m3), the norms, SiLU-and-mul, rotary, and the quantized projection (int4, int8, GGUF
Q4_0/Q4_1/Q8_0 rows; with and without bias; each tiling: decode and prompt programs).

A kernel that does not compile for the device fails here, not on the first GPU run; register growth and
spills (which cut how many programs an SM runs at once) show up before anyone times them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not for the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pagoda.config import CacheConfig  # noqa: E402
from pagoda.model.attention import triton_kernels  # noqa: E402
from pagoda.model.layers import triton_elementwise  # noqa: E402
from pagoda.model.layers.quantization import triton_linear  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Arguments in the model dtype; fp32 and int64 ones by name; every other pointer is int32, every scalar i32.
TENSOR_ARGS = {"q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr", "k_ptr", "v_ptr", "x_ptr", "residual_ptr", "w_ptr",
               "gate_up_ptr", "bias_ptr", "scale_ptr"}
FP32_ARGS = {"cos_ptr", "sin_ptr", "scale", "eps", "k_scale", "v_scale"}
CACHE_ARGS = {"k_cache_ptr", "v_cache_ptr"}
# A quantized KV cache's element type, by the kernels' KV_KIND (kv_format.py): int8 rows, float8 e4m3.
CACHE_TYPES = {1: "i8", 2: "fp8e4nv"}
INT64_ARGS = {"slot_ptr"}
UINT8_ARGS = {"qweight_ptr"}  # quantized weight rows


@dataclass
class ModelShape:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int


def model_shapes() -> list[ModelShape]:
    """The shipped benchmark shapes (configs/*.json) and the bundled SmolLM2-135M."""
    shapes = [ModelShape("smollm2-135m", 576, 9, 3, 64)]
    for path in sorted((ROOT / "configs").glob("*.json")):
        cfg = json.loads(path.read_text())
        shapes.append(ModelShape(path.stem, cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
                                 cfg["head_dim"]))
    return shapes


@dataclass
class KernelResources:
    kernel: str
    arch: int
    dtype: str
    config: dict[str, Any]
    registers: int
    spill_bytes: int  # per-thread stack (local memory) the compiler needed beyond the registers
    mma: str  # "wgmma" (Hopper warpgroup MMA), "mma" (warp MMA), or "none"
    async_copies: bool  # loads pipelined through cp.async / the bulk copy engine (Triton's software pipelining)
    model: str
    # fp32 -> bf16 conversions round to nearest (cvt.rn) rather than truncate; None without any
    bf16_rounds_to_nearest: bool | None


def _signature(fn: Any, dtype: str, constexprs: dict[str, Any]) -> dict[str, str]:
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in CACHE_ARGS and constexprs.get("KV_KIND", 0) in CACHE_TYPES:
            signature[name] = f"*{CACHE_TYPES[constexprs['KV_KIND']]}"
        elif name in TENSOR_ARGS:
            signature[name] = f"*{dtype}"
        elif name in FP32_ARGS:
            signature[name] = "*fp32" if name.endswith("_ptr") else "fp32"
        elif name in INT64_ARGS:
            signature[name] = "*i64"
        elif name in UINT8_ARGS:
            signature[name] = "*i8" if constexprs.get("KIND") == triton_linear.INT8 else "*u8"
        else:
            signature[name] = "*i32" if name.endswith("_ptr") else "i32"
    return signature


def _aligned(fn: Any, constexprs: dict[str, Any]) -> dict[tuple[int, ...], list[list[Any]]]:
    """What Triton's launcher tells the compiler at run time: tensors start 16-byte aligned (torch's
    allocations and the q/k/v views of the shipped shapes do) and strides are multiples of 16 elements (as
    every stride of the shipped shapes is), which lets it vectorize loads and stores. int8 cache rows are
    head_dim + 4 bytes: their token and head strides are not."""
    unaligned = {"stride_cs", "stride_ch"} if constexprs.get("KV_KIND") == 1 else set()
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if name not in constexprs and name not in unaligned and (name.endswith("_ptr") or name.startswith("stride"))}


def compile_kernel(fn: Any, dtype: str, constexprs: dict[str, Any], arch: int, model: str) -> KernelResources:
    names = fn.arg_names
    source = ASTSource(fn, _signature(fn, dtype, constexprs),
                       constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs=_aligned(fn, constexprs))
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
    ptx = compiled.asm["ptx"]
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "none"
    registers, spill = _resource_usage(compiled.asm["cubin"])
    conversions = re.findall(r"cvt\.(\w+)\.bf16(?:x2)?\.f32", ptx)
    rounding = all(c == "rn" for c in conversions) if conversions else None
    pipelined = "cp.async" in ptx
    return KernelResources(fn.__name__.strip("_"), arch, dtype, constexprs, registers, spill, mma, pipelined, model,
                           rounding)


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        listing = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                                 check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", listing)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's listing:\n{listing}")
    return int(found.group(1)), int(found.group(2))


def launches(shape: ModelShape, dtype: torch.dtype, arch: int) -> list[tuple[Any, dict[str, Any]]]:
    """(kernel, compile-time parameters) of every launch the engine makes for this model and dtype."""
    tk, te = triton_kernels, triton_elementwise
    group = shape.heads // shape.kv_heads
    pow2 = triton.next_power_of_2
    found = []
    for kind, kind_id in tk.KV_KINDS.items():  # each KV cache format (fp8 e4m3 from sm_89: Ada, Hopper)
        if (kind == "fp8_e4m3" and arch < tk.FP8_MIN_ARCH) or (kind != "auto" and dtype == torch.float32):
            continue  # refused by the backend (triton_backend.py)
        found.append((tk._write_kv_kernel, {"HEAD_DIM": shape.head_dim, "KV_KIND": kind_id}))
        for block_q in (1, tk.prefill_block_q(group, tk.prefill_rows(dtype))):  # the decode and prefill launches
            found.append((tk._paged_attention_kernel, tk.attention_constexprs(
                dtype, group, shape.head_dim, CacheConfig().block_size, block_q, kind)))
    for n in (shape.hidden, shape.head_dim):  # the layer norms; Qwen3's per-head q/k norms
        found += [(te._rms_norm_kernel, {"BLOCK": pow2(n), "ADD": add}) for add in (False, True)]
    found.append((te._silu_and_mul_kernel, {"BLOCK": te.SILU_BLOCK}))
    found.append((te._rotary_kernel, {"HEADS": te.ROTARY_HEADS, "HALF_PAD": pow2(shape.head_dim // 2)}))
    tl_ = triton_linear
    found += [(tl_._quantized_linear_kernel, tl_.quantized_linear_constexprs(kind, dtype, bias, tiles))
              for kind in (tl_.INT4, tl_.INT8, tl_.Q4_0, tl_.Q4_1, tl_.Q8_0) for bias in (False, True)
              for tiles in (*tl_.DECODE_TILES, tl_.prefill_tiles(dtype))]
    return found


def measure(archs: list[int]) -> list[KernelResources]:
    results = []
    seen = set()
    for arch in archs:
        for dtype_name, dtype in DTYPES.items():
            for shape in model_shapes():
                for fn, constexprs in launches(shape, dtype, arch):
                    key = (arch, dtype_name, fn.__name__, tuple(sorted(constexprs.items())))
                    if key not in seen:  # shapes share some launches (e.g. the head_dim-128 norms)
                        seen.add(key)
                        results.append(compile_kernel(fn, dtype_name, constexprs, arch, shape.name))
    return results


# The compile-time parameters worth a column in the table.
SHOWN = ("BLOCK_Q", "GROUP", "HEAD_DIM", "KV_KIND", "BLOCK", "ADD", "HALF_PAD")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="CUDA compute capability x10")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    args = parser.parse_args()
    results = measure(args.arch)
    if args.json:
        print(json.dumps([asdict(r) for r in results]))
        return
    print(f"triton {triton.__version__}")
    print(f"{'kernel':<22} {'model':<14} {'sm':>3} {'dtype':<5} {'shape':<32} {'regs':>5} {'spill B':>8}  mma    "
          "async")
    for r in results:
        shape = " ".join(f"{k}={v}" for k, v in r.config.items() if k in SHOWN)
        print(f"{r.kernel:<22} {r.model:<14} {r.arch:>3} {r.dtype:<5} {shape:<32} {r.registers:>5} "
              f"{r.spill_bytes:>8}  {r.mma:<6} {'yes' if r.async_copies else 'no'}")


if __name__ == "__main__":
    sys.exit(main())
