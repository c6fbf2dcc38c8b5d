"""Where a workload's device time goes: one `generate` under torch.profiler, kernels grouped by
what they do, and the device's busy time against the wall (the rest is the GPU waiting on the
host: launch gaps, scheduling, syncs).

On CUDA the kernels are the profiler's device events; on the CPU (smoke runs, tests) the aten
ops' self times stand in for them and "busy" is their sum.
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# First match wins, on the lower-cased kernel (or aten op) name.
CATEGORIES: tuple[tuple[str, re.Pattern], ...] = tuple((name, re.compile(p)) for name, p in (
    ("attention_dense", r"sdpa|flash_fprop|flash_fwd"),  # cuDNN's (a run of fresh prompts)
    ("attention_prefill", r"prefill_attention"),
    ("attention_decode", r"decode_attention|combine_splits"),
    ("rotary_kv_write", r"rotary_kv_write"),
    ("norm", r"rms_norm"),
    ("gemm_swiglu", r"gate_up_silu"),  # the fused MLP: gate/up GEMM with SwiGLU
    ("activation", r"silu"),
    ("sampling", r"split_mass|pick_token|argmax|softmax|topk|sort|multinomial"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|cublas|aten::(mm|addmm|bmm)$"),
    ("copy", r"memcpy|memset|copy|fill|cat|index"),
))
NUM_TOP_KERNELS = 15
NUM_TOP_GAPS = 8
# Idle stretches by length: launch latency between eager kernels is ~5-20 us; a step boundary
# the host did not hide shows up as the longer ones.
GAP_BUCKETS_US = (20.0, 200.0, 2000.0)


@dataclass
class Interval:
    start_us: float
    end_us: float


@dataclass
class KernelProfile:
    device: str
    num_requests: int
    num_steps: int
    wall_s: float
    device_busy_s: float  # union of kernel intervals (CUDA), or the sum of op self times (CPU)
    num_kernels: int
    by_category: dict[str, dict[str, float]] = field(default_factory=dict)  # seconds, count, share
    top_kernels: list[tuple[str, float, int]] = field(default_factory=list)  # name, s, count
    # Device idle between kernels: by length bucket ("<20us", ...) and by the kinds of the
    # kernels either side ("sampling>gemm"): [seconds, count]. Empty on the CPU.
    gaps_by_length: dict[str, list[float]] = field(default_factory=dict)
    gaps_by_transition: list[tuple[str, float, int]] = field(default_factory=list)

    @property
    def device_idle_fraction(self) -> float:
        return max(0.0, 1 - self.device_busy_s / self.wall_s) if self.wall_s else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "device_idle_fraction": self.device_idle_fraction,
                "kernels_per_step": self.num_kernels / max(self.num_steps, 1)}

    def summary(self) -> str:
        lines = [f"  profile ({self.device}, {self.num_requests} requests, {self.num_steps} "
                 f"steps): wall {self.wall_s:.2f} s, device busy {self.device_busy_s:.2f} s "
                 f"(idle {self.device_idle_fraction:.0%}), "
                 f"{self.num_kernels / max(self.num_steps, 1):.0f} kernels a step"]
        for name, c in sorted(self.by_category.items(), key=lambda kv: -kv[1]["seconds"]):
            lines.append(f"    {name:<18} {c['seconds']:8.3f} s {c['share']:6.1%} "
                         f"{int(c['count']):>9,} kernels")
        if self.gaps_by_length:
            lines.append("    idle by gap length: " + ", ".join(
                f"{k} {s:.3f} s ({int(n):,})" for k, (s, n) in self.gaps_by_length.items()))
            lines.append("    idle by kernels either side: " + ", ".join(
                f"{k} {s:.3f} s ({n:,})" for k, s, n in self.gaps_by_transition))
        return "\n".join(lines)


def categorize(name: str) -> str:
    lowered = name.lower()
    return next((cat for cat, pattern in CATEGORIES if pattern.search(lowered)), "other")


def busy_seconds(intervals: list[Interval]) -> float:
    """Length of the union of the intervals (overlapping kernels on streams count once)."""
    total, end = 0.0, float("-inf")
    for iv in sorted(intervals, key=lambda iv: iv.start_us):
        if iv.start_us > end:
            total += iv.end_us - iv.start_us
            end = iv.end_us
        elif iv.end_us > end:
            total += iv.end_us - end
            end = iv.end_us
    return total / 1e6


def idle_gaps(kernels: list[tuple[str, Interval]]
              ) -> tuple[dict[str, list[float]], list[tuple[str, float, int]]]:
    """The device's idle stretches between kernels (overlapping kernels merged), by length
    bucket and by the kinds of the kernels before and after: where the GPU waits on the host."""
    edges = (*GAP_BUCKETS_US, float("inf"))
    labels = [f"<{GAP_BUCKETS_US[0]:g}us"] + [f">={lo:g}us" for lo in GAP_BUCKETS_US]
    by_length = {label: [0.0, 0] for label in labels}
    by_transition: dict[str, list[float]] = {}
    end, last = float("inf"), ""
    for name, iv in sorted(kernels, key=lambda k: k[1].start_us):
        gap = iv.start_us - end
        if gap > 0:
            bucket = by_length[labels[next(i for i, e in enumerate(edges) if gap < e)]]
            bucket[0] += gap / 1e6
            bucket[1] += 1
            entry = by_transition.setdefault(f"{last}>{categorize(name)}", [0.0, 0])
            entry[0] += gap / 1e6
            entry[1] += 1
        if end == float("inf") or iv.end_us > end:
            end, last = iv.end_us, categorize(name)
    top = sorted(((k, s, int(n)) for k, (s, n) in by_transition.items()), key=lambda t: -t[1])
    return by_length, top[:NUM_TOP_GAPS]


def summarize(kernels: list[tuple[str, Interval]], *, device: str, num_requests: int,
              num_steps: int, wall_s: float, is_cuda: bool) -> KernelProfile:
    """kernels: (name, interval) per kernel run (CUDA) or per op's self time (CPU)."""
    per_name: dict[str, list[float]] = {}
    for name, iv in kernels:
        entry = per_name.setdefault(name, [0.0, 0])
        entry[0] += (iv.end_us - iv.start_us) / 1e6
        entry[1] += 1
    total = sum(s for s, _ in per_name.values())
    by_category: dict[str, dict[str, float]] = {}
    for name, (seconds, count) in per_name.items():
        c = by_category.setdefault(categorize(name), {"seconds": 0.0, "count": 0, "share": 0.0})
        c["seconds"] += seconds
        c["count"] += count
    for c in by_category.values():
        c["share"] = c["seconds"] / total if total else 0.0
    top = sorted(((n, s, c) for n, (s, c) in per_name.items()), key=lambda t: -t[1])
    busy = busy_seconds([iv for _, iv in kernels]) if is_cuda else total
    by_length, by_transition = idle_gaps(kernels) if is_cuda else ({}, [])
    return KernelProfile(device=device, num_requests=num_requests, num_steps=num_steps,
                         wall_s=wall_s, device_busy_s=busy, num_kernels=len(kernels),
                         by_category=by_category, top_kernels=top[:NUM_TOP_KERNELS],
                         gaps_by_length=by_length, gaps_by_transition=by_transition)


def _kernel_events(prof, is_cuda: bool) -> list[tuple[str, Interval]]:
    out = []
    for e in prof.events():
        if is_cuda:
            if e.device_type != DeviceType.CUDA:
                continue
            out.append((e.name, Interval(e.time_range.start, e.time_range.end)))
        elif e.device_type == DeviceType.CPU and e.name.startswith("aten::") \
                and e.self_cpu_time_total > 0:
            # self time as a zero-based interval: only its length is used on the CPU
            out.append((e.name, Interval(0.0, e.self_cpu_time_total)))
    return out


def profile_generate(llm, run, num_requests: int) -> KernelProfile:
    """Profile `run()` (one generate over num_requests requests on llm's engine)."""
    is_cuda = llm.engine.device.type == "cuda"
    activities = [ProfilerActivity.CUDA] if is_cuda else [ProfilerActivity.CPU]
    before = llm.engine.stats().num_steps
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        run()
        if is_cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    return summarize(_kernel_events(prof, is_cuda), device=str(llm.engine.device),
                     num_requests=num_requests, num_steps=llm.engine.stats().num_steps - before,
                     wall_s=wall, is_cuda=is_cuda)
