#!/usr/bin/env bash
# The one command a GPU slot runs: setup, tests and bench, each within its own time budget, each writing its
# results into OUT as it ends. `bash benchmarks/gpu/run.sh --help` for the parts and options; the logic is in
# benchmarks/gpu/run.py.
#   bash benchmarks/gpu/run.sh --dry-run          # here, on the CPU: what can be checked without a GPU
#   bash benchmarks/gpu/run.sh --out "$OUT"       # there, on the GPU machine
set -uo pipefail
cd "$(dirname "$0")/../.."
exec python3 benchmarks/gpu/run.py "$@"
