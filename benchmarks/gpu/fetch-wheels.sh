#!/usr/bin/env bash
# Download the wheels of benchmarks/gpu/wheels.txt into .whl/ for the GPU machine (Python 3.12, x86-64
# manylinux), build a pure-Python wheel where PyPI has only a source archive, slim bitsandbytes, leave optional
# wheels behind when the repository plus wheels would pass 64 MiB, and print what will travel.
# Run it here, on the CPU machine (it needs the package index), before a GPU slot: bash benchmarks/gpu/fetch-wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python3 benchmarks/gpu/wheels.py fetch "$@"
