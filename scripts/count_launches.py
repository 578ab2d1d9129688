"""Kernel launches of one decode step on the GPU path, counted on the CPU: the step a CUDA graph captures
(DecodeGraphs' forward at batch 1) runs with the C++ CPU kernels off, so every operation takes the branch a
CUDA tensor takes; torch operations that launch a kernel (views and allocations do not) and Triton launches
are counted. With ``--fused`` the fused elementwise operations go to the Triton kernels, as on a GPU.

    python scripts/count_launches.py --model configs/llama-3.1-8b.json            # torch elementwise paths
    python scripts/count_launches.py --model configs/llama-3.1-8b.json --fused    # Triton fused kernels

The model's weights are dummy and its layer count is cut to two (the count per layer is what matters).
A count, not a timing: what each launch costs is for the GPU to say (scripts/bench_gpu.sh).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ["TRITON_INTERPRET"] = "1"  # the Triton kernels run on the CPU (before anything imports triton)
os.environ["PAGODA_DISABLE_CPU_KERNELS"] = "1"  # the torch branches a CUDA tensor takes

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

# Operations that launch no kernel: views, metadata and allocation.
NO_KERNEL = {"view", "_unsafe_view", "reshape", "split", "split_with_sizes", "slice", "select", "chunk", "unsqueeze",
             "squeeze", "transpose", "t", "expand", "as_strided", "alias", "detach", "empty", "empty_like",
             "new_empty", "empty_strided", "unbind", "permute", "lift_fresh", "set_"}
LAYERS = 2


class LaunchCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.torch_ops: collections.Counter[str] = collections.Counter()
        self.triton: collections.Counter[str] = collections.Counter()
        self.paused = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.__name__.split(".")[0]
        if not self.paused and name not in NO_KERNEL:
            self.torch_ops[name] += 1
        return func(*args, **(kwargs or {}))


def count(model: str, fused: bool) -> dict[str, Any]:
    from pagoda import LLM
    from pagoda.engine.worker.cuda_graphs import DecodeGraphs
    from pagoda.model import fused_ops
    from pagoda.model.layers import triton_elementwise

    if fused:
        fused_ops.for_tensor = lambda x: triton_elementwise if x.dtype in fused_ops.FUSED_DTYPES else None
    config = json.loads(Path(model).read_text())
    config["num_hidden_layers"] = LAYERS
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(config))
        llm = LLM(str(path), load_format="dummy", dtype="bfloat16", attention_backend="triton", num_kv_blocks=8,
                  max_num_seqs=1, max_model_len=64, enforce_eager=True)
    runner = llm.engine.runner
    graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.attention, runner.block_size,
                          1, 64, use_cuda_graphs=False)
    counter = LaunchCounter()
    run = InterpretedFunction.run

    def counted_run(self: InterpretedFunction, *args: Any, **kwargs: Any) -> Any:
        counter.triton[self.fn.__name__] += 1
        counter.paused = True  # the interpreter's own tensor traffic is not the kernel's
        try:
            return run(self, *args, **kwargs)
        finally:
            counter.paused = False

    InterpretedFunction.run = counted_run
    try:
        with counter, torch.inference_mode():
            graphs._forward(1)
    finally:
        InterpretedFunction.run = run
    total = sum(counter.torch_ops.values()) + sum(counter.triton.values())
    return {"model": Path(model).stem, "fused": fused, "layers": LAYERS, "launches_per_step": total,
            "torch_ops": dict(counter.torch_ops.most_common()), "triton": dict(counter.triton.most_common())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="configs/llama-3.1-8b.json", help="a bare config.json")
    parser.add_argument("--fused", action="store_true", help="the fused operations through the Triton kernels")
    args = parser.parse_args()
    print(json.dumps(count(args.model, args.fused)))


if __name__ == "__main__":
    sys.exit(main())
