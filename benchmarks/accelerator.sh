#!/usr/bin/env bash
# The accelerator protocol of issue 12, on one GPU, in under 8 minutes; one JSON file.
#
#   bash benchmarks/accelerator.sh [OUT.json] [accelerator.py options]
#
# Needs a CUDA build of JAX matching the CPU one, e.g.
#   .venv/bin/pip install "jax[cuda12]==$(.venv/bin/python -c 'import jax; print(jax.__version__)')"
# What it runs and records: see benchmarks/accelerator.py. Off a GPU it records
# the error and exits non-zero; `python benchmarks/accelerator.py --cpu-smoke`
# runs the same parts at tiny sizes on the CPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
OUT="${1:-benchmarks/out/accelerator.json}"
shift || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# 480 s: the protocol's own budget is 450 s; the rest is interpreter start-up.
timeout 480 "$PY" benchmarks/accelerator.py --out "$OUT" "$@"
