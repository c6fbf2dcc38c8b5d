#!/usr/bin/env bash
# One device call: install, then the named steps. Usage: bash bench/gpu_session.sh tests 8b 1b
# (BENCH_ARGS, e.g. "--repeat 2", go to the bench of 8b / 8bq / 1b)
# (8bq: 8b without the profile; sweep / sweep-gemm-prefill / sweep-prefill / sweep-cascade /
# sweep-decode / sweep-mixed / sweep-sample / sweep-rowwise: bench/kernel_sweep.py)
# (gemm-silu: bench/gemm_silu_probe.py, GEMM_ARGS for its flags; overlap: bench/overlap_probe.py; fewshot: that workload with and without cascade attention)
# (1b2k: small again with 2,048 sequences, which llama-1b's KV pool holds: fewer, fuller steps)
set -uo pipefail
export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "install failed"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for step in "${@:-8b}"; do
  case "$step" in
    8b) python bench/bench.py --shape llama3-8b --workloads reviews,decode,prefill --baseline \
          --profile reviews,decode --profile-requests 600 ${BENCH_ARGS:-} --out "$OUT/llama3-8b.json" 2>&1 | tee "$OUT/llama3-8b.log" ;;
    8bq) python bench/bench.py --shape llama3-8b --workloads reviews,decode,prefill --baseline ${BENCH_ARGS:-} \
          --out "$OUT/llama3-8b.json" 2>&1 | tee "$OUT/llama3-8b.log" ;;
    1b) python bench/bench.py --shape llama-1b --workloads small --skip-numerics --baseline \
          --profile small ${BENCH_ARGS:-} --out "$OUT/llama-1b.json" 2>&1 | tee "$OUT/llama-1b.log" ;;
    1b2k) python bench/bench.py --shape llama-1b --workloads small --skip-numerics \
          --max-num-seqs 2048 --out "$OUT/llama-1b-2048.json" 2>&1 | tee "$OUT/llama-1b-2048.log" ;;
    8bdecode) python bench/bench.py --shape llama3-8b --workloads decode --baseline --skip-numerics \
          --profile decode,baseline --out "$OUT/llama3-8b-decode.json" 2>&1 | tee "$OUT/llama3-8b-decode.log" ;;
    sweep-prefill) python bench/kernel_sweep.py --only prefill,bandwidth \
          --out "$OUT/kernel-sweep-prefill.json" 2>&1 | tee "$OUT/kernel-sweep-prefill.log" ;;
    sweep-cascade) python bench/kernel_sweep.py --only cascade \
          --out "$OUT/kernel-sweep-cascade.json" 2>&1 | tee "$OUT/kernel-sweep-cascade.log" ;;
    sweep-sample) python bench/kernel_sweep.py --only sample \
          --out "$OUT/kernel-sweep-sample.json" 2>&1 | tee "$OUT/kernel-sweep-sample.log" ;;
    sweep-rowwise) python bench/kernel_sweep.py --only rowwise \
          --out "$OUT/kernel-sweep-rowwise.json" 2>&1 | tee "$OUT/kernel-sweep-rowwise.log" ;;
    sweep-mixed) python bench/kernel_sweep.py --only mixed \
          --out "$OUT/kernel-sweep-mixed.json" 2>&1 | tee "$OUT/kernel-sweep-mixed.log" ;;
    sweep-decode) python bench/kernel_sweep.py --only decode \
          --out "$OUT/kernel-sweep-decode.json" 2>&1 | tee "$OUT/kernel-sweep-decode.log" ;;
    sweep) python bench/kernel_sweep.py --out "$OUT/kernel-sweep.json" 2>&1 | tee "$OUT/kernel-sweep.log" ;;
    sweep-gemm-prefill) python bench/kernel_sweep.py --only gemm,prefill --out "$OUT/kernel-sweep.json" \
          2>&1 | tee "$OUT/kernel-sweep.log" ;;
    overlap) python bench/overlap_probe.py --out "$OUT/overlap.json" 2>&1 | tee "$OUT/overlap.log" ;;
    fewshot) for flag in "" --disable-cascade-attn; do
          python bench/bench.py --shape llama3-8b --workloads fewshot --skip-numerics $flag \
            --out "$OUT/fewshot${flag:+-plain}.json" 2>&1 | tee "$OUT/fewshot${flag:+-plain}.log" | tail -4
        done ;;
    gemm-silu) python bench/gemm_silu_probe.py ${GEMM_ARGS:-} --out "$OUT/gemm-silu.json" 2>&1 | tee "$OUT/gemm-silu.log" \
          | grep -v Warning | tail -32 ;;
    tests) python -m pytest -q -m gpu tests/ 2>&1 | tee "$OUT/gpu-tests.log" | tail -8 ;;
  esac
done
