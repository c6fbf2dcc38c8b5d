"""Our persistent Triton GEMMs (batchgen.kernels.gate_up_silu, matmul_add) against cuBLAS,
timed under the H200's power cap.

Session 6 found a pointer-based Triton GEMM 10-20% slower than cuBLAS at burst clocks
(`bench/results/2026-11-25-s6-gemm-silu-sweep.json`). Here each variant runs back to back for
`--warm` seconds before `--time` timed seconds, round after round (A B C A B C), so each is
timed at the clocks the 700 W cap gives it, as the engine's steps are. A stall that leaves the
tensor cores idle costs time at burst clocks but little energy, so under the cap the gap to
cuBLAS can shrink. (Named gemm_silu_probe.py until session 14, when it only had gate_up.)

    python bench/gemm_probe.py --op gate_up --tokens 16384,4096,1024,512 --out $OUT/g.json
    python bench/gemm_probe.py --op o_proj --tokens 512 --out $OUT/o.json

Ops, at llama3-8b's sizes unless --in-features / --out-features say otherwise:
- `gate_up`: 4096 -> 2 x 14336 with SwiGLU. Variants `cublas` (torch.mm into [T, 2I], then
  silu_and_mul: the unfused path) and `cublas-mm` (the matmul alone, for scale).
- `o_proj`: 4096 -> 4096 added into a residual. Variant `cublas`: torch.addmm_ (beta = 1).
Both: `triton` or `triton:BM/BN/BK/GROUP_M/STAGES/WARPS` (our kernel with its default or the
given tiles), either with `@S` to cut the last wave into S pieces (1: never; default: the
kernel's choice).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from floor import _sustained_seconds_per_call  # noqa: E402
from run_info import describe_environment  # noqa: E402

from batchgen.kernels.gate_up_silu import gate_up_silu  # noqa: E402
from batchgen.kernels.matmul_add import matmul_add  # noqa: E402
from batchgen.kernels.silu_and_mul import silu_and_mul  # noqa: E402

# (in features, out features) at llama3-8b's sizes
SHAPES = {"gate_up": (4096, 2 * 14336), "o_proj": (4096, 4096)}
DEFAULT_VARIANTS = {
    "gate_up": "cublas,cublas-mm,triton,triton@1,triton:128/64/64/16/4/8",
    "o_proj": "cublas,triton,triton@1,triton:128/128/64/16/3/8",
}


def parse_triton(name: str) -> tuple[tuple[int, ...] | None, int | None]:
    """`triton[:BM/BN/BK/G/S/W][@SPLIT]` -> (config or None, tail split or None)."""
    name, _, split = name.partition("@")
    config = tuple(int(v) for v in name[7:].split("/")) if name.startswith("triton:") else None
    return config, int(split) if split else None


def make_fn(op: str, name: str, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor):
    """The variant's call; `out` is the residual that o_proj's variants add into."""
    if op == "gate_up" and name == "cublas":
        return lambda: silu_and_mul(torch.mm(x, weight.T))
    if op == "gate_up" and name == "cublas-mm":
        return lambda: torch.mm(x, weight.T)
    if op == "o_proj" and name == "cublas":
        return lambda: out.addmm_(x, weight.T)
    if name == "triton" or name.startswith(("triton:", "triton@")):
        config, split = parse_triton(name)
        if op == "gate_up":
            return lambda: gate_up_silu(x, weight, config, tail_split=split)
        return lambda: matmul_add(x, weight, out, config, tail_split=split)
    raise ValueError(f"unknown variant {name!r} for {op}")


def in_graph(fn, calls: int):
    """fn called `calls` times, captured once: the returned function replays them."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--op", choices=sorted(SHAPES), default="gate_up")
    p.add_argument("--tokens", default="16384,4096,1024,512")
    p.add_argument("--in-features", type=int, help="default: the op's llama3-8b size")
    p.add_argument("--out-features", type=int, help="gate_up: 2 x intermediate")
    p.add_argument("--variants", help="default: " + "; ".join(
        f"{op}: {v}" for op, v in DEFAULT_VARIANTS.items()))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warm", type=float, default=1.0)
    p.add_argument("--time", type=float, default=1.5)
    p.add_argument("--graph", type=int, default=0, metavar="N",
                   help="time N calls captured in a CUDA graph a replay, as the decode graphs "
                        "run them (no host launch cost); 0: launched one by one")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    torch.manual_seed(0)
    dev = torch.device("cuda")
    in_features = args.in_features or SHAPES[args.op][0]
    out_features = args.out_features or SHAPES[args.op][1]
    weight = torch.randn(out_features, in_features, device=dev,
                         dtype=torch.bfloat16) * in_features ** -0.5
    results = {"env": describe_environment(dev), "op": args.op, "graph_calls": args.graph, "in_features": in_features,
               "out_features": out_features, "shapes": {}}
    for num_tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(num_tokens, in_features, device=dev, dtype=torch.bfloat16)
        residual = torch.randn(num_tokens, out_features, device=dev, dtype=torch.bfloat16)
        if args.op == "gate_up":
            ref = silu_and_mul(torch.mm(x, weight.T)).float()
        else:
            ref = residual.float() + x.float() @ weight.float().T
        flops = 2 * num_tokens * out_features * in_features
        fns, shape = {}, {}
        for name in (args.variants or DEFAULT_VARIANTS[args.op]).split(","):
            try:  # checked on a fresh residual, timed adding into one that drifts
                out = make_fn(args.op, name, x, weight, residual.clone())().float()
                fn = make_fn(args.op, name, x, weight, residual.clone())
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
            print(f"  T={num_tokens:>6} {name:<32} {ms:8.4f} ms  {flops / ms / 1e9:6.1f} TFLOP/s"
                  + (f"  {base / ms:5.3f}x" if base else ""), flush=True)
        results["shapes"][num_tokens] = shape
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
