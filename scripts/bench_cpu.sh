#!/usr/bin/env bash
# The standard CPU benchmark suite of BENCHMARKS.md, results in bench_out/.
# Optional peers: llama-cpp-python installed (pip install 'pagoda-llm[peers]') adds llama.cpp to the offline
# run; LLAMA_SERVER=/path/to/llama-server adds llama.cpp's server to the serving run (docs/peers.md).
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench_out
mkdir -p "$out"
# The serving workload: 32 requests, 16 in flight, prompts 128-512 tokens, outputs 64-256 tokens.
serve_load=(--concurrency 16 --num-prompts 32 --warmup 2 --input-len 128 512 --output-len 64 256 --seed 0)

pagoda bench roofline --out "$out/roofline.json"
pagoda bench startup --repeats 5 --out "$out/startup.json"
pagoda bench latency --input-len 128 --output-len 128 --repeats 5 --out "$out/latency.json"
pagoda bench offline --workload offline-256 --kv-cache-gib 4 --peer hf --out "$out/offline-256.json"
# llama.cpp prefills at ~120 tok/s here, so its three-way run uses the 32-request workload.
if python3 -c "import llama_cpp" 2>/dev/null; then
  pagoda bench offline --workload offline-32 --kv-cache-gib 4 --peer hf --peer llamacpp --out "$out/offline-32.json"
fi

wait_ready() {  # url
  for _ in $(seq 600); do curl -sf "$1/health" >/dev/null && return 0; sleep 0.5; done
  echo "server at $1 not ready" >&2; return 1
}

pagoda serve --port 8300 --kv-cache-gib 4 --log-level warning &
server=$!
wait_ready http://127.0.0.1:8300
pagoda bench serve --url http://127.0.0.1:8300 "${serve_load[@]}" --label pagoda --out "$out/serve-pagoda.json"
kill -TERM "$server"; wait "$server" || true

if [ -n "${LLAMA_SERVER:-}" ]; then
  gguf=$(python3 -c "from pagoda.model.loader import resolve_model; print(resolve_model('smollm2-135m').path)")
  # 16 slots x 1024 tokens of context each; 2 threads like the Pagoda run.
  "$LLAMA_SERVER" -m "$gguf" --host 127.0.0.1 --port 8301 -np 16 -c 16384 -t 2 --cont-batching \
    --log-disable >/dev/null 2>&1 &
  server=$!
  wait_ready http://127.0.0.1:8301
  pagoda bench serve --url http://127.0.0.1:8301 "${serve_load[@]}" --label llama-server \
    --out "$out/serve-llama-server.json"
  kill -TERM "$server"; wait "$server" || true
fi
