#!/usr/bin/env bash
# Issue 5's GPU measurements in one command, on a machine with one CUDA GPU, from the repository root.
#
#   bash scripts/bench_gpu.sh --prepare   # on a networked machine: the tokenizer and wheels into .gpu/
#   bash scripts/bench_gpu.sh             # on the GPU machine (with .gpu/ copied beside the code)
#   bash scripts/bench_gpu.sh latency quantized   # only these steps (names below); STEP_TIMEOUT=seconds caps each
#
# The GPU machine needs python3 with torch, triton, transformers, tokenizers, numpy, msgpack, jinja2 and
# tqdm; nothing is downloaded there. Models are the shipped shape configs with dummy weights, the bundled
# model's tokenizer standing in (token ids outside its vocabulary detokenize to nothing). Results: JSON
# files under $OUT (default bench_out/gpu) and a summary table at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p .gpu/tokenizer .gpu/whl
  python3 - <<'PY'
import json
from pagoda.model.gguf_file import GGUFFile
from pagoda.model.loader import resolve_model
from pagoda.model.tokenizer_source import tokenizer_from_gguf

source = tokenizer_from_gguf(GGUFFile(resolve_model("smollm2-135m").path).metadata)
source.tokenizer.save(".gpu/tokenizer/tokenizer.json")
config = {"chat_template": source.chat_template, "eos_token": source.eos_token, "bos_token": source.bos_token}
open(".gpu/tokenizer/tokenizer_config.json", "w").write(json.dumps(config))
PY
  # The GPU image lacks gguf and pydantic (the CLI's gateway options import it): carry them, at the
  # versions installed here.
  pins=$(python3 -c "import importlib.metadata as m; print(' '.join(f'{n}=={m.version(n)}' for n in ('gguf', 'pydantic', 'pydantic_core', 'annotated-types', 'typing-inspection')))")
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl $pins
  du -sh .gpu
  exit 0
fi

[ -d .gpu/tokenizer ] || { echo "run 'bash scripts/bench_gpu.sh --prepare' first (on a networked machine)" >&2; exit 2; }
out=${OUT:-bench_out/gpu}
mkdir -p "$out"
if ! python3 -c "import gguf, pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/pagoda-site .gpu/whl/*.whl
  export PYTHONPATH="/tmp/pagoda-site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The C++ kernels are for CPU runs; a GPU run never needs their (minute-long) build.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PAGODA_DISABLE_CPU_KERNELS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/device.txt"

steps=("$@")
want() {  # whether this run includes the step (all of them when none is named)
  [ ${#steps[@]} -eq 0 ] || [[ " ${steps[*]} " == *" $1 "* ]]
}
failed=()
measure() {  # one measurement; a failure or a timeout is reported at the end and does not stop the others
  timeout "${STEP_TIMEOUT:-900}" "$@" || { echo "FAILED ($?): $*" >&2; failed+=("$*"); }
}
pagoda() {
  measure python3 -m pagoda.cli "$@"
}
tok=(--tokenizer .gpu/tokenizer --load-format dummy)
llama8b=(--model configs/llama-3.1-8b.json "${tok[@]}")
qwen06b=(--model configs/qwen3-0.6b.json "${tok[@]}")

# Steps in the order of what is owed most (issue 5's ceilings and batch-1 numbers first).
# Ceilings of this device: large-copy bandwidth and bf16 matmul rate.
want roofline && pagoda bench roofline --model configs/llama-3.1-8b.json --buffer-mib 4096 --matmul-size 8192 --out "$out/roofline.json"
# (b) batch-1 decode of the 8B shape in bf16, with CUDA graphs (and without, below); MBU against the copy above.
want latency && pagoda bench latency "${llama8b[@]}" --max-model-len 4096 --input-len 128 --output-len 256 --repeats 5 --mbu \
  --out "$out/latency-8b.json"
# (b') the same with int4 weights (groups of 128) and with int8, on the Triton quantized kernel.
want int4 && pagoda bench latency "${llama8b[@]}" --quantization int4 --max-model-len 4096 --input-len 128 --output-len 256 \
  --repeats 3 --mbu --out "$out/latency-8b-int4.json"
# The quantized kernel alone: each layout and tiling at the 8B shapes against cuBLAS (checked, then timed).
want quantized && measure python3 scripts/bench_quantized_gpu.py --out "$out/quantized_kernels.json"
# (a) triton vs torch attention, greedy: exact in fp32; bf16 reported (exits 1 on any difference).
want backends && pagoda bench backends "${qwen06b[@]}" --dtype float32 --max-model-len 1024 --num-prompts 16 --output-len 32 \
  --out "$out/backends-fp32.json"
want backends && pagoda bench backends "${qwen06b[@]}" --dtype bfloat16 --max-model-len 1024 --num-prompts 16 --output-len 32 \
  --out "$out/backends-bf16.json"
want int8 && pagoda bench latency "${llama8b[@]}" --quantization int8 --max-model-len 4096 --input-len 128 --output-len 256 \
  --repeats 3 --mbu --out "$out/latency-8b-int8.json"
want eager && pagoda bench latency "${llama8b[@]}" --max-model-len 4096 --input-len 128 --output-len 256 --repeats 3 --mbu \
  --enforce-eager --out "$out/latency-8b-eager.json"
# (c) offline throughput: 1000 requests, input [128, 1024], output [128, 512], ignore_eos; HF on the first 200.
want offline-small && pagoda bench offline --workload gpu-1000 "${qwen06b[@]}" --max-model-len 2048 --max-num-seqs 256 \
  --max-num-batched-tokens 8192 --out "$out/offline-qwen3-0.6b.json"
want offline && pagoda bench offline --workload gpu-1000 "${llama8b[@]}" --max-model-len 2048 --max-num-seqs 256 \
  --max-num-batched-tokens 8192 --peer hf --hf-num-requests 200 --out "$out/offline-8b.json"

python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
load = lambda name: json.loads((out / name).read_text()) if (out / name).exists() else None
rows = []
roof = load("roofline.json")
if roof:
    rows.append(("copy bandwidth (read+write)", f"{roof['machine']['copy_bandwidth_gbs']:.0f} GB/s"))
    rows.append(("bf16 matmul", f"{roof['machine']['matmul_tflops']['bfloat16']:.0f} TFLOP/s"))
for name in ("backends-fp32.json", "backends-bf16.json"):
    b = load(name)
    if b:
        for backend, r in b["backends"].items():
            rows.append((f"{name[:-5]}: {backend} == {b['reference']}", f"{r['equal_requests']}/{b['num_prompts']} requests"))
        seconds = b.get("generate_seconds", {})
        rows.append((f"{name[:-5]}: generate seconds", ", ".join(f"{k} {v:.2f}" for k, v in seconds.items())))
for name in ("latency-8b.json", "latency-8b-eager.json", "latency-8b-int4.json", "latency-8b-int8.json"):
    lat = load(name)
    if lat:
        bw = lat["bandwidth"]
        rows.append((f"{name[:-5]}: TPOT / MBU (copy, read)",
                     f"{bw['tpot_ms_median']:.2f} ms / {bw['mbu']:.3f}, {bw['mbu_read']:.3f}"))
for name in ("offline-8b.json", "offline-qwen3-0.6b.json"):
    off = load(name)
    if off:
        line = f"{off['pagoda']['output_tok_per_s']:.0f} tok/s"
        if "hf" in off:
            line += f" (HF {off['hf']['output_tok_per_s']:.0f}, {off['ratio_vs_hf']}x)"
        rows.append((f"{name[:-5]}: offline gpu-1000", line))
kernels = load("quantized_kernels.json")
if kernels:  # the tiling each layer gets, against bf16 cuBLAS at the same input rows
    picked = {}
    for r in kernels["results"]:
        key = (r["kind"], r["layer"], r["rows"])
        if r["system"] == "bf16 cublas" or r["system"].startswith("chosen"):
            picked.setdefault(key, {})[r["system"].split()[0]] = r
    for (kind, layer, rows_in), both in picked.items():
        if "chosen" in both and "bf16" in both:
            c = both["chosen"]
            rows.append((f"kernel {kind} {layer} x{rows_in}", f"{c['us']:.1f} us ({c['bandwidth_fraction']:.2f} of copy), "
                         f"bf16 cuBLAS {both['bf16']['us']:.1f} us"))
width = max(len(k) for k, _ in rows) if rows else 0
print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
PY
if [ ${#failed[@]} -gt 0 ]; then
  printf 'failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
