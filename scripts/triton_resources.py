"""Compile Pagoda's Triton kernels for a CUDA GPU on a machine without one, and report what each launch
configuration costs the GPU: registers per thread, bytes spilled to local memory, and which tensor-core
instruction its products use. Triton ships the CUDA assembler (ptxas) and cuobjdump, so this needs no GPU.

    python scripts/triton_resources.py                  # Hopper (sm_90) and Ampere (sm_80)
    python scripts/triton_resources.py --arch 90 --json

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

# (query heads per KV head, head_dim) of the shipped shapes: Llama-3.1-8B, Qwen3-0.6B, the bundled SmolLM2.
MODEL_SHAPES = [(4, 128), (2, 128), (3, 64)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TENSOR_ARGS = {"q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr", "k_ptr", "v_ptr"}
INT64_ARGS = {"slot_ptr"}  # the slot mapping is int64; the other index tensors are int32


@dataclass
class KernelResources:
    kernel: str
    arch: int
    dtype: str
    config: dict[str, Any]
    registers: int
    spill_bytes: int  # per-thread stack (local memory) the compiler needed beyond the registers
    mma: str  # "wgmma" (Hopper warpgroup MMA), "mma" (warp MMA), or "none"


def _signature(fn: Any, dtype: str, constexprs: dict[str, Any]) -> dict[str, str]:
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in TENSOR_ARGS:
            signature[name] = f"*{dtype}"
        elif name in INT64_ARGS:
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*i32"
        elif name == "scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def compile_kernel(fn: Any, dtype: str, constexprs: dict[str, Any], arch: int) -> KernelResources:
    names = fn.arg_names
    source = ASTSource(fn, _signature(fn, dtype, constexprs),
                       constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
    ptx = compiled.asm["ptx"]
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "none"
    registers, spill = _resource_usage(compiled.asm["cubin"])
    return KernelResources(fn.__name__.strip("_"), arch, dtype, constexprs, registers, spill, mma)


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


def measure(archs: list[int]) -> list[KernelResources]:
    block_size = CacheConfig().block_size
    results = []
    for arch in archs:
        for dtype_name, dtype in DTYPES.items():
            for head_dim in sorted({d for _, d in MODEL_SHAPES}):
                results.append(compile_kernel(triton_kernels._write_kv_kernel, dtype_name,
                                              {"HEAD_DIM": head_dim}, arch))
            for group, head_dim in MODEL_SHAPES:
                prefill_block_q = triton_kernels.prefill_block_q(group, triton_kernels.prefill_rows(dtype))
                for block_q in (1, prefill_block_q):  # the decode and prefill launches
                    constexprs = triton_kernels.attention_constexprs(dtype, group, head_dim, block_size, block_q)
                    results.append(compile_kernel(triton_kernels._paged_attention_kernel, dtype_name, constexprs,
                                                  arch))
    return results


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
    print(f"{'kernel':<24} {'sm':>3} {'dtype':<5} {'group':>5} {'rows':>4} {'head_dim':>8} {'regs':>5} "
          f"{'spill B':>8}  mma")
    for r in results:
        group = r.config.get("GROUP", "-")
        rows = r.config.get("BLOCK_Q", 0) * r.config.get("GROUP_PAD", 0) or "-"
        print(f"{r.kernel:<24} {r.arch:>3} {r.dtype:<5} {group:>5} {rows:>4} {r.config['HEAD_DIM']:>8} "
              f"{r.registers:>5} {r.spill_bytes:>8}  {r.mma}")


if __name__ == "__main__":
    sys.exit(main())
