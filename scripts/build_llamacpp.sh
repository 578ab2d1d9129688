#!/usr/bin/env bash
# Builds llama.cpp's llama-bench and llama-server from the source that the llama-cpp-python sdist vendors
# (PyPI is all the network here reaches), for the peer benchmarks (docs/peers.md):
#   bash scripts/build_llamacpp.sh            # -> ~/.cache/pagoda/llama.cpp/build/bin/{llama-bench,llama-server}
# `pagoda bench latency --peer llamacpp` finds llama-bench there (or at $PAGODA_LLAMA_BENCH).
# AMX stays off: its matmul path crashed in this VM (docs/peers.md, AMX note); AVX-512 with VNNI/BF16 is on.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
ROOT="${PAGODA_LLAMACPP_DIR:-$HOME/.cache/pagoda/llama.cpp}"
mkdir -p "$ROOT"
if [ ! -d "$ROOT/src" ]; then
  tmp=$(mktemp -d)
  pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
  tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$ROOT/src"
  rm -rf "$tmp"
fi
cmake -S "$ROOT/src" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
  -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF > "$ROOT/cmake.log"
cmake --build "$ROOT/build" --target llama-bench llama-server -j"$(nproc)"
echo "built: $ROOT/build/bin/llama-bench $ROOT/build/bin/llama-server"
