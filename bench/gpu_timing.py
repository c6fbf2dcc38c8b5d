"""GPU timing for the sweeps and probes: single eager calls, or replays of one CUDA graph."""
from __future__ import annotations

import statistics

import torch


def time_ms(fn, reps: int = 15) -> float:
    """Median of single eager calls between two events: host launch time included (for the
    4 GiB bandwidth passes, whose launch is short next to the work)."""
    for _ in range(3):  # compile, and bring the clocks up (the first timing ran ~20% slow)
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_graph_ms(fn, reps: int = 20, calls: int = 1) -> float:
    """ms a call of fn: `calls` calls captured in a CUDA graph (as the engine replays decode
    steps), then `reps` replays back to back between two events: no host launch time in the
    figure, and with calls > 1 the gaps between consecutive calls are in it."""
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    replay = in_graph(fn, calls)
    for _ in range(3):
        replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (reps * calls)


def in_graph(fn, calls: int):
    """fn called `calls` times, captured once: the returned function replays them."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay
