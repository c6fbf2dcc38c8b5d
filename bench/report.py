"""What bench.py prints: one workload's figures as it finishes, and the table that comes last
(so the device tool's output tail shows it)."""
from __future__ import annotations

from power import describe


def print_workload(name: str, f: dict) -> None:
    print(f"  {name}: {f['num_requests']} requests, wall {f['wall_s']:.2f} s, "
          f"{f['output_tok_per_s']:,.0f} output tok/s, {f['total_tok_per_s']:,.0f} total tok/s, "
          f"{f['req_per_s']:.1f} req/s, wrong lengths {f['num_wrong_lengths']}")
    if "floor" in f:
        fl = f["floor"]
        print(f"  floor {fl['floor_s']:.2f} s ({fl['bound_by']}; compute {fl['compute_s']:.2f} s, "
              f"memory {fl['memory_s']:.2f} s), floor/measured {f['floor_fraction']:.1%} "
              f"({f['floor_fraction_at_page_ceilings']:.1%} at BENCHMARKS.md's H200 ceilings, "
              f"780 TFLOP/s and 4.26 TB/s)")
        if "floor_fraction_at_sustained_matmul" in f:
            print(f"  {f['floor_fraction_at_sustained_matmul']:.1%} of the floor at the matmul "
                  f"rate this device sustains under its power limit (a compute-bound run's most)")
    mem = f["peak_gpu_memory_gib"]
    print(f"  peak GPU memory {mem:.1f} GiB" if mem is not None else "  peak GPU memory n/a",
          f"| KV pool {f['kv_pool_tokens']:,} tokens | peak running {f['peak_num_running']} "
          f"| peak KV slots {f['peak_kv_slots_allocated']:,} held {f['peak_kv_tokens_held']:,} "
          f"(waste {f['peak_kv_waste']:.1%}) | prefix hits {f['prefix_cache_hit_rate']:.1%} "
          f"| preemptions {f['num_preemptions']} | steps {f['num_steps']}")
    print(f"  step profile (host s): {f['step_seconds']}")
    if "gpu_clocks" in f:
        print(f"  {describe(f['gpu_clocks'])}")
    if "vllm_s" in f:
        print(f"  vLLM {f['vllm_s']:.1f} s: vLLM/ours {f['vllm_over_ours']:.2f}x; floor fraction "
              f"ours {f.get('floor_fraction', float('nan')):.1%} vs vLLM "
              f"{f['vllm_floor_fraction']:.1%}, bar {f['bar_floor_fraction']:.0%}")


def print_table(results: dict) -> None:
    print("\n" + "=" * 121)
    env, ceil = results.get("environment", {}), results.get("ceilings", {})
    print(f"{env.get('gpu') or env.get('device')} | torch {env.get('torch')} | triton "
          f"{env.get('triton')} | transformers {env.get('transformers')} | git {env.get('git_sha')}")
    if ceil:
        held = ceil.get("sustained_matmul_tflops")
        print(f"ceilings: matmul {ceil['matmul_tflops']:.4g} TFLOP/s"
              + (f" ({held:.4g} sustained)" if held else "") + ", copy "
              f"{ceil['copy_tb_per_s']:.4g} TB/s | start-up {results.get('startup_s', float('nan')):.1f} s"
              f" | job {results.get('job_s', float('nan')):.1f} s")
    cols = [("workload", 10), ("wall s", 8), ("out tok/s", 11), ("tot tok/s", 11), ("req/s", 8),
            ("floor s", 9), ("C / M s", 15), ("floor/m", 9), ("@780", 7), ("bar", 6), ("vLLM s", 8),
            ("vLLM/us", 9), ("run", 6), ("waste", 7), ("hits", 7)]
    print(cols[0][0].ljust(cols[0][1]) + "".join(name.rjust(w) for name, w in cols[1:]))
    for name, f in results.get("workloads", {}).items():
        fl = f.get("floor")
        cells = [_fmt(f["wall_s"], ".2f"), _fmt(f["output_tok_per_s"], ",.0f"),
                 _fmt(f["total_tok_per_s"], ",.0f"), _fmt(f["req_per_s"], ".1f"),
                 _fmt(fl and fl["floor_s"], ".2f"),
                 f"{fl['compute_s']:.2f} / {fl['memory_s']:.2f}" if fl else "-",
                 _fmt(f.get("floor_fraction"), ".1%"),
                 _fmt(f.get("floor_fraction_at_page_ceilings"), ".1%"),
                 _fmt(f.get("bar_floor_fraction"), ".0%"),
                 _fmt(f.get("vllm_s"), ".1f"), _fmt(f.get("vllm_over_ours"), ".2f"),
                 str(f["peak_num_running"]), _fmt(f["peak_kv_waste"], ".1%"),
                 _fmt(f["prefix_cache_hit_rate"], ".1%")]
        print(name.ljust(cols[0][1]) + "".join(c.rjust(w) for c, (_, w) in zip(cells, cols[1:])))
        if len(f.get("runs_wall_s", ())) > 1:
            print(f"  (the fastest of {len(f['runs_wall_s'])} runs: "
                  + " / ".join(f"{w:.2f}" for w in f["runs_wall_s"]) + " s)")
    base = results.get("baseline", {})
    if "hf" in base and "batchgen" in base:
        hf, bg = base["hf"], base["batchgen"]
        print(f"baseline ({base['note']}): transformers {hf['total_tokens_per_s']:,.0f} tok/s "
              f"({hf['seconds']:.1f} s), batchgen {bg['total_tok_per_s']:,.0f} tok/s "
              f"({bg['wall_s']:.2f} s): baseline/batchgen time {base['baseline_over_batchgen']:.1f}x")
        if "baseline_over_floor" in base:
            fl = bg["floor"]
            print(f"  that set's floor {fl['floor_s']:.2f} s (compute {fl['compute_s']:.2f} / memory "
                  f"{fl['memory_s']:.2f}): baseline/floor {base['baseline_over_floor']:.1f}x at most")
    if "numerics" in results:
        n = results["numerics"]
        print(f"numerics ({n['shape']}): close={n['is_close']} prefill cos {n['prefill']['cosine']:.5f} "
              f"rel {n['prefill']['relative_error']:.2e}, decode cos {n['decode']['cosine']:.5f} "
              f"rel {n['decode']['relative_error']:.2e}")
    for name, err in results["errors"].items():
        print(f"FAILED {name}: {err}")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)
