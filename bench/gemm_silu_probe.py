"""The MLP's gate/up projection with SwiGLU fused (batchgen.kernels.gate_up_silu) against
cuBLAS's matmul then silu_and_mul, timed under the H200's power cap.

Session 6 found a pointer-based Triton GEMM 10-20% slower than cuBLAS at burst clocks
(`bench/results/2026-11-25-s6-gemm-silu-sweep.json`). Here each variant runs back to back for
`--warm` seconds before `--time` timed seconds, round after round (A B C A B C), so each is
timed at the clocks the 700 W cap gives it, as the engine's steps are. A stall that leaves the
tensor cores idle costs time at burst clocks but little energy, so under the cap the gap to
cuBLAS can shrink.

    python bench/gemm_silu_probe.py --tokens 16384,4096,1024,512 --out $OUT/gemm_silu.json
    python bench/gemm_silu_probe.py --graph 16 --tokens 512,1024 --out $OUT/gemm_silu.json

`--graph N` times N calls replayed from one CUDA graph, as the decode graphs run them: no host
launch cost, which for the fused kernel (four tensor descriptors built a call) is tens of
microseconds, more than a small matmul's device time.

Variants: `cublas` (torch.mm into [T, 2I], then silu_and_mul: the unfused path), `cublas-mm`
(the matmul alone, for scale) and `fused` or `fused:BM/BN/BK/GROUP_M/STAGES/WARPS` (the
kernel with its default or the given tiles).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from floor import _sustained_seconds_per_call  # noqa: E402
from gpu_timing import in_graph  # noqa: E402
from run_info import describe_environment  # noqa: E402

from batchgen.kernels.gate_up_silu import gate_up_silu  # noqa: E402
from batchgen.kernels.silu_and_mul import silu_and_mul  # noqa: E402

DEFAULT_VARIANTS = ",".join([
    "cublas", "cublas-mm", "fused", "fused:128/128/64/8/3/8", "fused:128/128/64/32/3/8",
    "fused:128/128/64/16/4/8",
])


def make_fn(name: str, x: torch.Tensor, weight: torch.Tensor):
    if name == "cublas":
        return lambda: silu_and_mul(torch.mm(x, weight.T))
    if name == "cublas-mm":
        return lambda: torch.mm(x, weight.T)
    if name == "fused":
        return lambda: gate_up_silu(x, weight)
    if name.startswith("fused:"):
        config = tuple(int(v) for v in name[6:].split("/"))
        return lambda: gate_up_silu(x, weight, config)
    raise ValueError(f"unknown variant {name!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="16384,4096,1024,512")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warm", type=float, default=1.0)
    p.add_argument("--time", type=float, default=1.5)
    p.add_argument("--graph", type=int, default=0, metavar="N",
                   help="time N calls captured in a CUDA graph a replay; 0: launched one by one")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    torch.manual_seed(0)
    dev = torch.device("cuda")
    weight = torch.randn(2 * args.intermediate, args.hidden, device=dev,
                         dtype=torch.bfloat16) * args.hidden ** -0.5
    results = {"env": describe_environment(dev), "graph_calls": args.graph,
               "hidden": args.hidden, "intermediate": args.intermediate, "shapes": {}}
    for num_tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(num_tokens, args.hidden, device=dev, dtype=torch.bfloat16)
        ref = silu_and_mul(torch.mm(x, weight.T)).float()
        flops = 2 * num_tokens * 2 * args.intermediate * args.hidden
        fns, shape = {}, {}
        for name in args.variants.split(","):
            try:
                fn = make_fn(name, x, weight)
                out = fn().float()
                torch.cuda.synchronize()
            except Exception as exc:  # a config this Triton cannot compile
                shape[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                print(f"  {num_tokens} {name}: {shape[name]['error']}", flush=True)
                continue
            if name != "cublas-mm":
                err = ((out - ref).norm() / ref.norm()).item()
                shape[name] = {"rel_err": err}
                if err > 2e-2:
                    print(f"  {num_tokens} {name}: wrong, rel err {err:.3g}", flush=True)
                    continue
            else:
                shape[name] = {}
            fns[name] = in_graph(fn, args.graph) if args.graph else fn
            shape[name]["ms"] = []
        for _ in range(args.rounds):
            for name, fn in fns.items():
                shape[name]["ms"].append(1e3 / max(1, args.graph) * _sustained_seconds_per_call(
                    fn, args.time, is_cuda=True, warm_seconds=args.warm))
        base = min(shape["cublas"]["ms"]) if "cublas" in fns else None
        for name in fns:
            ms = min(shape[name]["ms"])
            shape[name]["tflops"] = flops / ms / 1e9
            shape[name]["vs_cublas"] = base / ms if base else None
            print(f"  T={num_tokens:>6} {name:<28} {ms:8.4f} ms  {flops / ms / 1e9:6.1f} TFLOP/s"
                  + (f"  {base / ms:5.3f}x" if base else ""), flush=True)
        results["shapes"][num_tokens] = shape
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
