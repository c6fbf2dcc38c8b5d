#!/usr/bin/env bash
# One device call: install, then the named step. Usage: bash bench/gpu_session.sh 8b|1b|tests
set -uo pipefail
export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "install failed"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
case "${1:-8b}" in
  8b) python bench/bench.py --shape llama3-8b --workloads reviews,decode,prefill --baseline \
        --out "$OUT/llama3-8b.json" 2>&1 | tee "$OUT/llama3-8b.log" ;;
  1b) python bench/bench.py --shape llama-1b --workloads small --skip-numerics \
        --out "$OUT/llama-1b.json" 2>&1 | tee "$OUT/llama-1b.log" ;;
  tests) python -m pytest -q -m gpu tests/ 2>&1 | tee "$OUT/gpu-tests.log" | tail -15 ;;
esac
