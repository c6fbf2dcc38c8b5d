"""Where an engine step's host time goes on the GPU: each step's wall time by kind (mixed:
any prompt token, eager; decode: replayed from a CUDA graph), then a cProfile of one run.
With overlapped steps, a step's wall time is its host work or, when longer, the wait for the
step launched before it.

    python bench/host_probe.py --shape llama3-8b --workload reviews --limit 64 \
        --max-output-tokens 128 --out $OUT/host.json
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_probe import build_probe  # noqa: E402
from bench import generate  # noqa: E402
from workloads import cap_outputs  # noqa: E402


def timed_steps(llm) -> tuple[list[bool], list[float]]:
    """Wrap the engine's step and scheduler -> (per step: it scheduled prompt tokens; per
    step: its wall seconds), filled as the engine runs."""
    engine, scheduler = llm.engine, llm.engine.scheduler
    schedule, step, kinds, times = scheduler.schedule, engine.step, [], []

    def recording_schedule():
        out = schedule()
        kinds.append(any(n > 1 for n in out.num_scheduled_tokens))
        return out

    def timed_step():
        t0 = time.perf_counter()
        result = step()
        times.append(time.perf_counter() - t0)
        return result
    scheduler.schedule, engine.step = recording_schedule, timed_step
    return kinds, times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--workload", default="reviews")
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--max-output-tokens", type=int, default=128)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    llm, requests = build_probe(args)
    generate(llm, cap_outputs(requests[:16], 4))
    result = {"startup_s": llm.engine.startup_seconds, "graph_s": llm.engine.graph_seconds}
    print(f"start-up {result['startup_s']:.1f} s, of which graphs {result['graph_s']:.1f} s")
    for label in ("first", "second"):
        llm.reset_prefix_cache()
        kinds, times = timed_steps(llm)
        wall, _ = generate(llm, requests)
        by_kind = {k: [t for kind, t in zip(kinds, times) if kind == (k == "mixed")]
                   for k in ("mixed", "decode")}
        result[label] = {"wall_s": wall, **{
            k: {"steps": len(v), "median_ms": 1e3 * statistics.median(v) if v else None,
                "total_s": sum(v)} for k, v in by_kind.items()}}
        print(label, json.dumps(result[label]), flush=True)
        del llm.engine.step, llm.engine.scheduler.schedule  # back to the class's methods
    llm.reset_prefix_cache()
    prof = cProfile.Profile()
    prof.enable()
    generate(llm, requests)
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumulative").print_stats(45)
    result["profile"] = text.getvalue()
    print(text.getvalue()[-16000:])
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
