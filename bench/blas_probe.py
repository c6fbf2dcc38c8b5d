"""The decode graphs' projections as the engine calls them, kernel by kernel: which cuBLAS
kernels (and memsets) each call launches, and its graph-timed cost by how it is called.

Session 17's decode profile showed a memset before 33 GEMMs a step (llama3-8b's qkv
projection at the 512-row bucket and the LM head ran cuBLAS's cooperative kernels, which
zero a workspace first), with ~5 us of idle around each. This probe times each projection
called as `F.linear` under cuBLAS and cuBLASLt, and as `addmm_` into a buffer (beta 0 or 1),
each N calls captured in one CUDA graph, so the memsets and the gaps they cause count.

    python bench/blas_probe.py --tokens 512,1024 --out $OUT/blas_probe.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import time_graph_ms  # noqa: E402
from op_sweeps import GEMM_SHAPES  # noqa: E402
from run_info import describe_environment  # noqa: E402


def kernels_of(fn) -> list[str]:
    """The device kernels (and memsets / copies) one eager call launches, in order."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [e.name[:90] for e in sorted(events, key=lambda e: e.time_range.start)]


def variants(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> dict:
    def with_lib(lib, fn):
        def call():
            before = torch.backends.cuda.preferred_blas_library()
            torch.backends.cuda.preferred_blas_library(lib)
            try:
                return fn()
            finally:
                torch.backends.cuda.preferred_blas_library(before)
        return call

    return {
        "linear/cublas": with_lib("cublas", lambda: F.linear(x, w)),
        "linear/cublaslt": with_lib("cublaslt", lambda: F.linear(x, w)),
        "addmm beta0/cublas": with_lib("cublas", lambda: out.addmm_(x, w.t(), beta=0)),
        "addmm beta1/cublas": with_lib("cublas", lambda: out.addmm_(x, w.t())),
        "mm out/cublas": with_lib("cublas", lambda: torch.mm(x, w.t(), out=out)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="256,448,512,768,1024")
    p.add_argument("--shapes", default=",".join(GEMM_SHAPES))
    p.add_argument("--calls", type=int, default=16)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.manual_seed(0)
    results = {"env": describe_environment(torch.device("cuda")), "calls": args.calls,
               "shapes": {}}
    for name in args.shapes.split(","):
        n, k = GEMM_SHAPES[name]
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
        for m in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.zeros(m, n, device="cuda", dtype=torch.bfloat16)
            row = {}
            for label, fn in variants(x, w, out).items():
                us = time_graph_ms(fn, reps=10, calls=args.calls) * 1e3
                row[label] = {"us": us, "tflops": 2 * m * n * k / us / 1e6,
                              "kernels": kernels_of(fn)}
            results["shapes"][f"{name} M={m}"] = row
            print(f"{name} M={m}: " + ", ".join(
                f"{label} {r['us']:.1f} us ({len(r['kernels'])} k)" for label, r in row.items()),
                flush=True)
            print("    " + " | ".join(sorted({kn for r in row.values() for kn in r["kernels"]})),
                  flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
