"""The GPU's SM clock and power draw through a timed run, sampled by `nvidia-smi` every 200 ms.

Under sustained load the H200 runs at its 700 W limit with the SM clock ~1,500 MHz of its
1,980 (session 9, RESULTS.md), so a compute-bound run cannot reach a floor counted at the
burst matmul rate, which the bench's 1.4 ms ceiling measures before the clock falls. Printing
the clock beside each workload's fraction of the floor says how much of the gap is power.
Without `nvidia-smi` (a CPU machine) the sampler records nothing."""
from __future__ import annotations

import shutil
import statistics
import subprocess

QUERY = "clocks.sm,power.draw,clocks_event_reasons.active"
SW_POWER_CAP = 0x4  # nvmlClocksEventReasonSwPowerCap: the clock lowered to stay under the limit
INTERVAL_MS = 200


def parse_samples(text: str) -> list[tuple[float, float, int]]:
    """`nvidia-smi --format=csv,noheader,nounits` lines -> (SM MHz, watts, reason bits); lines
    that do not parse (a driver's [N/A], a warning) are skipped."""
    samples = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3:
            continue
        try:
            samples.append((float(fields[0]), float(fields[1]), int(fields[2], 16)))
        except ValueError:
            continue
    return samples


def summarize(samples: list[tuple[float, float, int]]) -> dict | None:
    if not samples:
        return None
    clocks = [s[0] for s in samples]
    return {"num_samples": len(samples),
            "sm_clock_mhz_median": statistics.median(clocks), "sm_clock_mhz_max": max(clocks),
            "power_w_median": statistics.median(s[1] for s in samples),
            "power_capped_share": sum(bool(s[2] & SW_POWER_CAP) for s in samples) / len(samples)}


class ClockSampler:
    """with ClockSampler() as clocks: run(); then clocks.summary (None if nothing sampled)."""

    def __init__(self, gpu_index: int = 0) -> None:
        self.gpu_index = gpu_index
        self.summary: dict | None = None
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "ClockSampler":
        exe = shutil.which("nvidia-smi")
        if exe is not None:
            self._proc = subprocess.Popen(
                [exe, f"--id={self.gpu_index}", f"--query-gpu={QUERY}",
                 "--format=csv,noheader,nounits", f"--loop-ms={INTERVAL_MS}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            out, _ = self._proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            out, _ = self._proc.communicate()
        self.summary = summarize(parse_samples(out))


def describe(summary: dict | None) -> str:
    if summary is None:
        return "GPU clocks: not sampled (nvidia-smi missing, or it printed no samples)"
    return (f"GPU clocks: SM median {summary['sm_clock_mhz_median']:,.0f} MHz (max "
            f"{summary['sm_clock_mhz_max']:,.0f}), power median {summary['power_w_median']:.0f} W, "
            f"at the power cap in {summary['power_capped_share']:.0%} of "
            f"{summary['num_samples']} samples")
