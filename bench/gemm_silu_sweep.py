"""Times the fused gate/up projection + SwiGLU kernel's tile configs against torch.mm followed
by silu_and_mul (GPU only).

    python bench/gemm_silu_sweep.py --out $OUT/gemm_silu.json [--tokens 64,4096]

For llama3-8b's and llama-1b's MLP in bf16 at the token counts a step runs, each candidate is
timed over several launches (CUDA events, median) and checked against the unfused output;
work is 2 * T * H * 2I flops. The fastest config per shape is what default_config in
kernels/gate_up_silu.py should pick.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

# name -> (hidden, intermediate)
MODELS = {"llama3-8b": (4096, 14336), "llama-1b": (2048, 8192)}
TOKENS = (64, 256, 512, 1024, 4096, 16384)
BLOCK_K, GROUP_M = 64, 8
SHARED_MEMORY_BYTES = 227 * 1024  # per block on an H100 / H200
MAX_ACC_REGISTERS = 128  # fp32 accumulator registers per thread; past this the tile spills
# The fused output skips the bf16 rounding of gate and up, so it differs from the baseline by
# a few bf16 ulps of the output; the bound is torch.testing's bf16 tolerance.
RTOL, ATOL = 2e-2, 2e-2
SLEEP_CYCLES = 2_000_000  # ~1 ms of GPU busy-wait before each timed launch


def candidate_configs() -> list[tuple[int, int, int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) whose pipeline buffers fit
    in shared memory and whose two accumulators fit in registers."""
    configs = []
    for block_m, block_n, num_warps, num_stages in itertools.product(
            (64, 128), (64, 128, 256), (4, 8), (3, 4, 5)):
        stage_bytes = (block_m + 2 * block_n) * BLOCK_K * 2  # x tile + gate and up tiles, bf16
        acc_registers = 2 * block_m * block_n // (32 * num_warps)
        if num_stages * stage_bytes <= SHARED_MEMORY_BYTES and acc_registers <= MAX_ACC_REGISTERS:
            configs.append((block_m, block_n, BLOCK_K, GROUP_M, num_warps, num_stages))
    return configs


def time_ms(fn, reps: int = 15) -> float:
    for _ in range(3):  # compile, and bring the clocks up
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # The GPU sleeps while the host enqueues start, fn and end: the wrappers' Python
        # overhead (which CUDA graphs hide in the engine) stays out of the timing.
        torch.cuda._sleep(SLEEP_CYCLES)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def sweep_shape(hidden: int, intermediate: int, num_tokens: int, configs: list) -> dict:
    from batchgen.kernels.gate_up_silu import default_config, gate_up_silu
    from batchgen.kernels.silu_and_mul import silu_and_mul

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(num_tokens, hidden, device="cuda", generator=gen, dtype=torch.bfloat16)
    # Scaled so gate and up are about unit size, as in a trained model's MLP.
    weight = (torch.randn(2 * intermediate, hidden, device="cuda", generator=gen)
              * hidden ** -0.5).to(torch.bfloat16)
    gflop = 2 * num_tokens * hidden * 2 * intermediate / 1e9

    def baseline():
        return silu_and_mul(torch.mm(x, weight.t()))

    expected = baseline().float()
    row = {"tokens": num_tokens, "hidden": hidden, "intermediate": intermediate,
           "baseline_ms": time_ms(baseline),
           "mm_ms": time_ms(lambda: torch.mm(x, weight.t())),
           "default_config": list(default_config(num_tokens)), "configs": []}
    for config in configs:
        try:
            out = gate_up_silu(x, weight, config=config).float()
            diff = (out - expected).abs()
            result = {"config": list(config), "max_abs_diff": diff.max().item(),
                      "ok": bool((diff <= ATOL + RTOL * expected.abs()).all())}
            del out, diff
            result["ms"] = time_ms(lambda: gate_up_silu(x, weight, config=config))
            result["tflops"] = gflop / result["ms"]
        except Exception as e:  # noqa: BLE001 - a config may not compile (out of resources)
            result = {"config": list(config), "error": f"{type(e).__name__}: {e}"[:300]}
        row["configs"].append(result)
    good = [r for r in row["configs"] if r.get("ok")]
    row["best"] = min(good, key=lambda r: r["ms"]) if good else None
    row["default"] = next((r for r in good if r["config"] == row["default_config"]), None)
    row["mm_tflops"] = gflop / row["mm_ms"]
    return row


def print_row(model: str, row: dict) -> None:
    best, default = row["best"], row["default"]
    cells = [f"{model:<10}", f"{row['tokens']:>6}", f"{row['baseline_ms']:>9.3f}",
             f"{row['mm_ms']:>8.3f}", f"{row['mm_tflops']:>7.0f}"]
    cells.append(f"{default['ms']:>10.3f}" if default else f"{'-':>10}")
    if best:
        cells += [f"{best['ms']:>8.3f}", f"{best['tflops']:>7.0f}",
                  f"x{row['baseline_ms'] / best['ms']:>5.2f}", str(tuple(best["config"]))]
    else:
        cells.append("  no config passed")
    failed = sum("error" in r or not r.get("ok") for r in row["configs"])
    if failed:
        cells.append(f"({failed} failed)")
    print(" ".join(cells), flush=True)


def summarize(results: list) -> list:
    """Configs ranked by how many shapes they are within 5% of the best on."""
    near_best: dict[tuple, int] = {}
    for row in results:
        if row["best"] is None:
            continue
        for r in row["configs"]:
            if r.get("ok") and r["ms"] <= 1.05 * row["best"]["ms"]:
                near_best[tuple(r["config"])] = near_best.get(tuple(r["config"]), 0) + 1
    return sorted(near_best.items(), key=lambda kv: -kv[1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)),
                   help="comma list of token counts")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gemm_silu_sweep needs a CUDA GPU", file=sys.stderr)
        return 1
    import triton

    tokens = [int(t) for t in args.tokens.split(",")]
    configs = candidate_configs()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}; {len(configs)} configs (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, "
          f"num_warps, num_stages)")
    print(f"{'model':<10} {'T':>6} {'base ms':>9} {'mm ms':>8} {'mm TF/s':>7} {'default ms':>10} "
          f"{'best ms':>8} {'TF/s':>7} {'speedup':>6} best config")
    results = []
    for model, (hidden, intermediate) in MODELS.items():
        for num_tokens in tokens:
            row = sweep_shape(hidden, intermediate, num_tokens, configs)
            row["model"] = model
            print_row(model, row)
            results.append(row)
            torch.cuda.empty_cache()
    ranking = summarize(results)
    print("configs within 5% of the best, by number of shapes:")
    for config, count in ranking[:8]:
        print(f"    {config}: {count} of {len(results)}")
    if args.out is not None:
        args.out.write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "shapes": results,
            "near_best": [{"config": list(c), "shapes": n} for c, n in ranking]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
