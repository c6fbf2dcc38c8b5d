"""The one benchmark command (BENCHMARKS.md): ceilings, numerics, the transformers baseline and
batchgen's workloads on one model shape, in one process; a table printed last, JSON to --out.

    python bench/bench.py --shape llama3-8b --workloads reviews,decode,prefill --baseline \
        --out $OUT/results.json
    python bench/bench.py --shape llama-1b --workloads small --out $OUT/small.json
    python bench/bench.py --shape tiny --workloads reviews --limit 4 --out /tmp/r.json  # CPU

Each section runs on its own: an exception is printed with its traceback, recorded under
"errors" in the JSON, and the next section goes on. Exit status 1 if any section failed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

# Run as a script from a checkout: fall back to the checkout's batchgen only when none is
# installed (an editable install maps batchgen.kernels to kernels/; a bare path cannot).
if importlib.util.find_spec("batchgen") is None:
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from floor import H200_CEILINGS, Ceilings, compute_floor, measure_ceilings
from power import ClockSampler
from report import print_table, print_workload
from run_info import Sections, describe_environment, synchronize
from shapes import SHAPES, Shape, get_shape
from workloads import ALL_WORKLOADS, REFERENCES, cap_outputs, draw_workload, fit_to_vocab

NUM_WARMUP_REQUESTS = 16
WARMUP_MAX_TOKENS = 32  # warm-up compiles and captures; it need not decode long
NUM_BASELINE_REQUESTS = 64
BASELINE_OUTPUT_TOKENS = 128
NUMERICS_SHAPE, NUMERICS_LAYERS = "llama-1b", 4


def build_llm(shape: Shape, folder: Path, args):
    from batchgen import LLM

    if args.blas is not None:  # before any GEMM, so the decode graphs capture it too
        torch.backends.cuda.preferred_blas_library(args.blas)
    return LLM(model=str(folder), load_format="dummy", skip_tokenizer_init=True, dtype=shape.dtype,
               enable_prefix_caching=True, gpu_memory_utilization=0.9, max_model_len=4096,
               seed=0, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
               disable_cascade_attn=args.disable_cascade_attn)


def generate(llm, requests) -> tuple[float, list]:
    """(wall seconds, outputs) of one `generate` over (prompt ids, output length) pairs."""
    from batchgen import SamplingParams

    prompts = [{"prompt_token_ids": p} for p, _ in requests]
    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=1.0, seed=None)
              for _, n in requests]
    synchronize()
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    synchronize()
    return time.perf_counter() - t0, outputs


def run_workload(llm, shape: Shape, name: str, requests, ceilings: Ceilings | None,
                 reference, sustained: Ceilings | None = None) -> dict:
    """sustained: the run's ceilings with the matmul rate the device holds under its power
    limit (the floor at them: the most a compute-bound run can reach here)."""
    warmup = cap_outputs(requests[:NUM_WARMUP_REQUESTS], WARMUP_MAX_TOKENS)
    generate(llm, warmup)
    llm.reset_prefix_cache()
    llm.engine.reset_peak_stats()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    before = llm.engine.stats()
    with ClockSampler() as clocks:
        wall, outputs = generate(llm, requests)
    stats = llm.engine.stats()
    num_prompt = sum(len(p) for p, _ in requests)
    num_output = sum(len(o.outputs[0].token_ids) for o in outputs)
    num_cached = sum(o.num_cached_tokens for o in outputs)
    fig = {
        "shape": shape.name, "num_requests": len(requests), "wall_s": wall,
        "num_prompt_tokens": num_prompt, "num_output_tokens": num_output,
        "num_wrong_lengths": sum(len(o.outputs[0].token_ids) != n
                                 for o, (_, n) in zip(outputs, requests)),
        "output_tok_per_s": num_output / wall, "total_tok_per_s": (num_prompt + num_output) / wall,
        "req_per_s": len(requests) / wall,
        "peak_gpu_memory_gib": (torch.cuda.max_memory_allocated() / 2**30
                                if torch.cuda.is_available() else None),
        "kv_pool_tokens": stats.kv_pool_tokens, "peak_num_running": stats.peak_num_running,
        "peak_kv_slots_allocated": stats.peak_kv_slots_allocated,
        "peak_kv_tokens_held": stats.peak_kv_tokens_held, "peak_kv_waste": stats.peak_kv_waste,
        "prefix_cache_hit_rate": num_cached / max(num_prompt, 1),
        "engine_prefix_cache_hit_rate": stats.prefix_cache_hit_rate,
        "num_preemptions": stats.num_preemptions - before.num_preemptions,
        "num_steps": stats.num_steps - before.num_steps,
        # host seconds per step phase (wait_gpu = blocked on the device): the step profile
        "step_seconds": {k: round(v, 3) for k, v in stats.step_seconds.items()},
        # SM clock and power through the run: how far below the burst rate the floor counts
        "gpu_clocks": clocks.summary,
    }
    if ceilings is not None:
        fl = compute_floor(shape, requests, ceilings, kv_pool_tokens=stats.kv_pool_tokens,
                           max_num_seqs=llm.config.max_num_seqs, block_size=stats.block_size)
        fig["floor"] = fl.as_dict()
        fig["floor_fraction"] = fl.seconds / wall
        # the same floor at BENCHMARKS.md's H200 ceilings: a run whose own ceiling reads low
        # (e.g. 759 against 780 TFLOP/s) flatters its own fraction
        fig["floor_fraction_at_page_ceilings"] = fl.seconds_at(H200_CEILINGS) / wall
        if sustained is not None:
            fig["floor_fraction_at_sustained_matmul"] = fl.seconds_at(sustained) / wall
    if reference is not None:
        fig["vllm_s"] = reference.vllm_s
        fig["vllm_over_ours"] = reference.vllm_s / wall
        fig["vllm_floor_fraction"] = reference.vllm_fraction_of_floor
        fig["bar_floor_fraction"] = reference.bar_fraction_of_floor
    return fig


def profile_workload(llm, requests) -> dict:
    """The workload once more (prefix cache emptied) under torch.profiler: device time by
    kernel category and the device's idle share of the wall."""
    from kernel_profile import profile_generate

    llm.reset_prefix_cache()
    prof = profile_generate(llm, lambda: generate(llm, requests), len(requests))
    print(prof.summary())
    return prof.as_dict()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--workloads", default="reviews,decode,prefill",
                   help=f"comma-separated, of {','.join(ALL_WORKLOADS)}")
    p.add_argument("--baseline", action="store_true", help="transformers generate_batch beside us")
    p.add_argument("--baseline-requests", type=int, default=NUM_BASELINE_REQUESTS,
                   help="the baseline set: the first N reviews requests (BENCHMARKS.md: 64)")
    p.add_argument("--baseline-output-tokens", type=int, default=BASELINE_OUTPUT_TOKENS,
                   help="every baseline request's output length (BENCHMARKS.md: 128)")
    p.add_argument("--skip-numerics", action="store_true")
    p.add_argument("--skip-ceilings", action="store_true", help="no floor either")
    p.add_argument("--limit", type=int, default=None, help="first N requests of each workload")
    p.add_argument("--max-output-tokens", type=int, default=None, help="cap outputs (smoke runs)")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--blas", choices=("cublas", "cublaslt"), default=None,
                   help="the BLAS library torch calls for the GEMMs (default: torch's choice)")
    p.add_argument("--disable-cascade-attn", action="store_true",
                   help="read shared prompt prefixes per request in decode steps")
    p.add_argument("--profile", default="",
                   help="comma list of workloads (or baseline) to run once more under "
                        "torch.profiler")
    p.add_argument("--profile-requests", type=int, default=None,
                   help="profile only the first N requests (a shorter trace)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run each workload N times and report the fastest (every wall kept)")
    p.add_argument("--out", type=Path, default=None, help="write all figures as JSON here")
    args = p.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    bad = [w for w in args.workloads if w not in ALL_WORKLOADS]
    if bad:
        p.error(f"unknown workload(s) {bad}; choose from {list(ALL_WORKLOADS)}")
    args.profile = [w for w in args.profile.split(",") if w]
    not_run = sorted(set(args.profile) - set(args.workloads) - ({"baseline"} if args.baseline
                                                                 else set()))
    if not_run:
        p.error(f"--profile names workloads that are not run: {not_run}")
    if args.repeat < 1:
        p.error(f"--repeat must be 1 or more, got {args.repeat}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = get_shape(args.shape)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, shape.dtype)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "errors": {},
                     "section_seconds": {}, "workloads": {}}
    run = Sections(results)
    ceilings = sustained = llm = None

    with run.section("environment"):
        results["environment"] = describe_environment(device)
        print(json.dumps(results["environment"], indent=1))

    if not args.skip_ceilings:
        with run.section("ceilings"):
            sizes = ({"sustained_s": 2.0} if device.type == "cuda" else
                     {"matmul_size": 256, "copy_bytes": 2**24, "sustained_s": 0.2})
            ceilings, results["ceilings"] = measure_ceilings(device, dtype, **sizes)
            sustained = Ceilings(results["ceilings"]["sustained_matmul_tflops"] * 1e12,
                                 ceilings.copy_bytes_per_s)
            print(f"  matmul {results['ceilings']['matmul_tflops']:.4g} TFLOP/s, "
                  f"copy {results['ceilings']['copy_tb_per_s']:.4g} TB/s")

    if not args.skip_numerics:
        with run.section("numerics"):
            from check_numerics import check_numerics

            if device.type == "cuda":
                n_shape, n_layers = get_shape(NUMERICS_SHAPE), NUMERICS_LAYERS
            else:
                n_shape, n_layers = SHAPES["tiny"], None
            numerics = check_numerics(n_shape, device, num_layers=n_layers)
            results["numerics"] = {"shape": n_shape.name, **numerics.as_dict()}
            print(f"  {results['numerics']}")
            if not numerics.is_close:
                raise AssertionError(f"batchgen's logits differ from transformers': {numerics}")

    base_requests = None
    if args.baseline:
        with run.section("baseline transformers"):
            from baseline_hf import run_baseline

            # generate_batch takes one max_new_tokens: every request gets the same 128.
            n = min(args.baseline_requests, args.limit or args.baseline_requests)
            cap = min(args.baseline_output_tokens,
                      args.max_output_tokens or args.baseline_output_tokens)
            base_requests = [(p, cap) for p, _ in
                             fit_to_vocab(draw_workload("reviews", limit=n).requests, shape.vocab_size)]
            hf = run_baseline(shape, base_requests, device, warmup=device.type == "cuda")
            results["baseline"] = {"note": f"first {n} reviews requests, {cap} output tokens each",
                                   "hf": hf.as_dict()}
            print(f"  transformers {hf.transformers_version}: {hf.seconds:.2f} s, "
                  f"{hf.total_tokens_per_s:,.0f} total tok/s, wrong lengths {hf.num_wrong_lengths}")

    with run.section("start-up"), tempfile.TemporaryDirectory() as folder:
        shape.write_config(folder)
        t0 = time.perf_counter()
        llm = build_llm(shape, Path(folder), args)
        results["startup_s"] = time.perf_counter() - t0
        stats = llm.engine.stats()
        results["engine"] = {"kv_pool_tokens": stats.kv_pool_tokens,
                             "max_num_seqs": llm.config.max_num_seqs,
                             "max_num_batched_tokens": llm.config.max_num_batched_tokens,
                             "enforce_eager": llm.config.enforce_eager,
                             "blas": str(torch.backends.cuda.preferred_blas_library()),
                             "engine_startup_s": stats.startup_seconds}
        print(f"  start-up s {results['startup_s']:.1f} | {results['engine']}")

    for name in args.workloads if llm is not None else []:
        with run.section(f"workload {name}"):
            w = draw_workload(name, limit=args.limit)
            requests = fit_to_vocab(cap_outputs(w.requests, args.max_output_tokens),
                                    shape.vocab_size)
            is_as_published = (shape.name == w.default_shape and args.limit is None
                               and args.max_output_tokens is None)
            runs = []
            for _ in range(args.repeat):
                runs.append(run_workload(llm, shape, name, requests, ceilings,
                                         REFERENCES.get(name) if is_as_published else None,
                                         sustained))
                print_workload(name, runs[-1])
            # the best of the runs, as BENCHMARKS.md gives vLLM's; every run's wall kept
            fig = min(runs, key=lambda f: f["wall_s"])
            fig["runs_wall_s"] = [f["wall_s"] for f in runs]
            results["workloads"][name] = fig
        if name in args.profile:
            with run.section(f"profile {name}"):
                fig["profile"] = profile_workload(llm, requests[:args.profile_requests])

    if base_requests is not None and llm is not None and "baseline" in results:
        with run.section("baseline batchgen"):
            fig = run_workload(llm, shape, "baseline", base_requests, ceilings, None, sustained)
            base = results["baseline"]
            base["batchgen"] = fig
            base["baseline_over_batchgen"] = base["hf"]["seconds"] / fig["wall_s"]
            if "floor" in fig:  # the ratio an engine at the counted floor would reach
                base["baseline_over_floor"] = base["hf"]["seconds"] / fig["floor"]["floor_s"]
            print_workload("baseline", fig)
        if "baseline" in args.profile:
            with run.section("profile baseline"):
                fig["profile"] = profile_workload(llm, base_requests)

    results["job_s"] = time.perf_counter() - run.t0
    print_table(results)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))
        print(f"wrote {args.out}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
