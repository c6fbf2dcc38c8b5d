"""The scheduler alone over a BENCHMARKS.md workload (no model: every sampled token is a
placeholder, outputs run to their exact lengths): how many steps, how many of them mixed
(eager on the GPU) or decode-only (replayed from CUDA graphs), and how full they are, with the
requests admitted first-in-first-out or in batchgen's admission order. Runs on the CPU in
seconds; the step count is what a host-bound workload (`small`) pays per step.

    python bench/schedule_sim.py [--workloads reviews,decode,prefill] [--max-num-seqs 1024]
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import WORKLOAD_NAMES, draw_workload  # noqa: E402

from batchgen.engine.admission import admission_order  # noqa: E402
from batchgen.engine.request import Request  # noqa: E402
from batchgen.engine.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from batchgen.sampling_params import SamplingParams  # noqa: E402

# llama-1b's KV pool on the H200 at 0.9 memory use (bench/results/2026-11-25-llama-1b.json).
KV_POOL_TOKENS = 3_836_784
BLOCK_SIZE = 16


@dataclass
class Schedule:
    num_steps: int
    num_mixed_steps: int  # steps with any prefill token
    num_decode_steps: int
    mean_decode_batch: float
    mean_mixed_tokens: float
    num_preemptions: int
    peak_kv_tokens: int  # blocks in use at the peak x block size


def simulate(requests: list[tuple[list[int], int]], order: list[int], *, max_num_seqs: int,
             max_num_batched_tokens: int, kv_pool_tokens: int = KV_POOL_TOKENS) -> Schedule:
    sched = Scheduler(SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=4096, block_size=BLOCK_SIZE, num_blocks=kv_pool_tokens // BLOCK_SIZE + 1))
    for i in order:
        prompt, cap = requests[i]
        sched.add_request(Request(str(i), prompt, SamplingParams(max_tokens=cap, ignore_eos=True),
                                  eos_token_ids=(), max_tokens=cap))
    decode_batches: list[int] = []
    mixed_tokens: list[int] = []
    num_preemptions = peak_blocks = 0
    while sched.has_unfinished_requests():
        out = sched.schedule()
        num_preemptions += len(out.preempted)
        peak_blocks = max(peak_blocks, sched.kv_cache_manager.num_used_blocks)
        if not out.is_empty:
            is_decode = all(n == 1 and before >= r.num_prompt_tokens for r, n, before in
                            zip(out.requests, out.num_scheduled_tokens, out.num_computed_before))
            if is_decode:
                decode_batches.append(out.num_reqs)
            else:
                mixed_tokens.append(out.total_num_scheduled_tokens)
        sched.update_from_output(out, [7 if need else None for need in out.needs_sample])
    return Schedule(len(decode_batches) + len(mixed_tokens), len(mixed_tokens),
                    len(decode_batches), sum(decode_batches) / max(len(decode_batches), 1),
                    sum(mixed_tokens) / max(len(mixed_tokens), 1), num_preemptions,
                    peak_blocks * BLOCK_SIZE)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="reviews,decode,prefill")
    ap.add_argument("--max-num-seqs", type=int, default=1024)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--kv-pool-tokens", type=int, default=KV_POOL_TOKENS,
                    help="llama3-8b's pool on the H200 was 840,048")
    args = ap.parse_args()
    results = {}
    for name in args.workloads.split(","):
        if name not in WORKLOAD_NAMES:
            ap.error(f"unknown workload {name!r}; choose from {list(WORKLOAD_NAMES)}")
        requests = draw_workload(name).requests
        orders = {"fifo": list(range(len(requests))),
                  "admission_order": admission_order(*zip(*requests))}
        results[name] = {k: asdict(simulate(requests, order, max_num_seqs=args.max_num_seqs,
                                            max_num_batched_tokens=args.max_num_batched_tokens,
                                            kv_pool_tokens=args.kv_pool_tokens))
                         for k, order in orders.items()}
        for k, s in results[name].items():
            print(f"{name:<8} {k:<16} {s['num_steps']:5d} steps: {s['num_mixed_steps']:4d} mixed "
                  f"(mean {s['mean_mixed_tokens']:,.0f} tokens), {s['num_decode_steps']:4d} "
                  f"decode-only (mean batch {s['mean_decode_batch']:,.0f}), "
                  f"{s['num_preemptions']} preemptions, peak KV {s['peak_kv_tokens']:,} tokens")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
