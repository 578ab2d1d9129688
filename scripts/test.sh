#!/usr/bin/env bash
# The test command: set-up from nothing, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec "${PYTHON:-python3}" -m pytest -q "$@"
