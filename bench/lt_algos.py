"""Does cuBLASLt hold a faster kernel than the one torch gets for our projections?

torch asks cuBLAS (or cuBLASLt) for its first heuristic choice and runs it; TunableOp on CUDA
only picks between those two libraries. This probe asks cuBLASLt's heuristic for its top
candidates for each of llama3-8b's projections at the engine's step sizes, runs each one (a
ctypes binding of cublasLtMatmul), checks its output against `F.linear`, and graph-times it
beside `F.linear`, so a better algorithm shows as a ratio measured in one process.

    python bench/lt_algos.py --tokens 64,512,1024 --out $OUT/lt_algos.json
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import time_graph_ms  # noqa: E402
from op_sweeps import GEMM_SHAPES  # noqa: E402
from run_info import describe_environment  # noqa: E402

# cublasLt.h / library_types.h values
CUDA_R_32F, CUDA_R_16BF = 0, 14
CUBLAS_COMPUTE_32F = 68
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
DESC_TRANSA, DESC_TRANSB = 3, 4
PREF_MAX_WORKSPACE_BYTES = 1
ALGO_CONFIG = {"id": 0, "tile": 1, "splitk": 2, "reduction": 3, "swizzle": 4, "stages": 6}
WORKSPACE_BYTES = 32 << 20


class Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", Algo), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def load_cublaslt() -> ctypes.CDLL:
    """The libcublasLt torch itself loaded (found in this process's maps after one cuBLASLt
    call), so the probe runs the very library torch does."""
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    a = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    F.linear(a, a)
    torch.cuda.synchronize()
    torch.backends.cuda.preferred_blas_library(before)
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if "libcublasLt.so" in path:
            return ctypes.CDLL(path)
    raise RuntimeError("libcublasLt is not loaded in this process")


class LtMatmul:
    """y[m, n] = x[m, k] @ w[n, k]^T in bf16 with fp32 accumulation, as torch's F.linear."""

    def __init__(self, lib: ctypes.CDLL, m: int, n: int, k: int):
        self.lib = lib
        self.handle = ctypes.c_void_p()
        self._check(lib.cublasLtCreate(ctypes.byref(self.handle)), "create")
        self.desc = ctypes.c_void_p()
        self._check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), CUBLAS_COMPUTE_32F,
                                                 CUDA_R_32F), "desc")
        for attr, op in ((DESC_TRANSA, CUBLAS_OP_T), (DESC_TRANSB, CUBLAS_OP_N)):
            value = ctypes.c_int32(op)
            self._check(lib.cublasLtMatmulDescSetAttribute(
                self.desc, attr, ctypes.byref(value), ctypes.sizeof(value)), "trans")
        # column-major view: D[n, m] = W^T-as-stored[k, n]^T @ X-as-stored[k, m]
        self.a = self._layout(k, n, k)
        self.b = self._layout(k, m, k)
        self.d = self._layout(n, m, n)
        self.pref = ctypes.c_void_p()
        self._check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(self.pref)), "pref")
        ws = ctypes.c_uint64(WORKSPACE_BYTES)
        self._check(lib.cublasLtMatmulPreferenceSetAttribute(
            self.pref, PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws), ctypes.sizeof(ws)), "pref ws")
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"cublasLt {what}: status {status}")

    def _layout(self, rows: int, cols: int, ld: int) -> ctypes.c_void_p:
        layout = ctypes.c_void_p()
        self._check(self.lib.cublasLtMatrixLayoutCreate(
            ctypes.byref(layout), CUDA_R_16BF, ctypes.c_uint64(rows), ctypes.c_uint64(cols),
            ctypes.c_int64(ld)), "layout")
        return layout

    def candidates(self, count: int) -> list[HeuristicResult]:
        results = (HeuristicResult * count)()
        returned = ctypes.c_int(0)
        self._check(self.lib.cublasLtMatmulAlgoGetHeuristic(
            self.handle, self.desc, self.a, self.b, self.d, self.d, self.pref, count, results,
            ctypes.byref(returned)), "heuristic")
        return [results[i] for i in range(returned.value) if results[i].state == 0]

    def config(self, algo: Algo) -> dict:
        out = {}
        for name, attr in ALGO_CONFIG.items():
            value, written = ctypes.c_uint32(0), ctypes.c_size_t(0)
            status = self.lib.cublasLtMatmulAlgoConfigGetAttribute(
                ctypes.byref(algo), attr, ctypes.byref(value), ctypes.sizeof(value),
                ctypes.byref(written))
            out[name] = value.value if status == 0 else None
        return out

    def run(self, algo: Algo, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> None:
        self._check(self.lib.cublasLtMatmul(
            self.handle, self.desc, ctypes.byref(self.alpha),
            ctypes.c_void_p(w.data_ptr()), self.a, ctypes.c_void_p(x.data_ptr()), self.b,
            ctypes.byref(self.beta), ctypes.c_void_p(y.data_ptr()), self.d,
            ctypes.c_void_p(y.data_ptr()), self.d, ctypes.byref(algo),
            ctypes.c_void_p(self.workspace.data_ptr()), ctypes.c_size_t(WORKSPACE_BYTES),
            ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)), "matmul")


def candidate_pool(lib, n: int, k: int, m: int, count: int) -> list[HeuristicResult]:
    """The heuristic's picks for this product and for the same weights at other row counts:
    the heuristic returns at most ~8 a problem, and a kernel it ranks for 4x the rows may
    still suit these. Duplicates dropped, this problem's own picks first."""
    pool, seen = [], set()
    for rows in dict.fromkeys([m, m // 2, 2 * m, 4 * m, 64, 512, 4096, 16384]):
        if rows < 1:
            continue
        for cand in LtMatmul(lib, rows, n, k).candidates(count):
            key = bytes(cand.algo.data)
            if key not in seen and cand.workspace_size <= WORKSPACE_BYTES:
                seen.add(key)
                pool.append(cand)
    return pool


def probe_shape(lib, name: str, n: int, k: int, m: int, count: int, calls: int) -> dict:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    want = F.linear(x, w).float()
    flop = 2 * m * n * k
    torch_us = time_graph_ms(lambda: F.linear(x, w), reps=10, calls=calls) * 1e3
    mm = LtMatmul(lib, m, n, k)
    rows = []
    for rank, cand in enumerate(candidate_pool(lib, n, k, m, count)):
        y.zero_()
        try:
            mm.run(cand.algo, x, w, y)
        except RuntimeError:
            continue  # picked for other rows, not valid for these
        torch.cuda.synchronize()
        err = (y.float() - want).abs().max().item()
        us = time_graph_ms(lambda a=cand.algo: mm.run(a, x, w, y), reps=10, calls=calls) * 1e3
        rows.append({"rank": rank, "us": us, "tflops": flop / us / 1e6, "max_err": err,
                     "workspace": cand.workspace_size, "waves": cand.waves,
                     **mm.config(cand.algo)})
    torch_again = time_graph_ms(lambda: F.linear(x, w), reps=10, calls=calls) * 1e3
    spread = abs(torch_again - torch_us) / torch_us
    torch_us = min(torch_us, torch_again)
    best = min(rows, key=lambda r: r["us"]) if rows else None
    row = {"torch_us": torch_us, "torch_spread": spread, "torch_tflops": flop / torch_us / 1e6,
           "algos": rows,
           "best_rank": best and best["rank"], "best_us": best and best["us"],
           "speedup": best and torch_us / best["us"]}
    print(f"{name} M={m}: torch {torch_us:.1f} us ({row['torch_tflops']:.0f} TFLOP/s); "
          f"heuristic #0 {rows[0]['us']:.1f} us; best #{best['rank']} {best['us']:.1f} us "
          f"(x{row['speedup']:.3f}, torch spread {spread:.3f}, tile {best['tile']} splitk "
          f"{best['splitk']}, err {best['max_err']:.3g}); {len(rows)} candidates", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="64,256,512,1024,4096")
    p.add_argument("--shapes", default=",".join(GEMM_SHAPES))
    p.add_argument("--candidates", type=int, default=24)
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.manual_seed(0)
    lib = load_cublaslt()
    results = {"env": describe_environment(torch.device("cuda")), "shapes": {}}
    for name in args.shapes.split(","):
        n, k = GEMM_SHAPES[name]
        for m in (int(t) for t in args.tokens.split(",")):
            results["shapes"][f"{name} M={m}"] = probe_shape(lib, name, n, k, m,
                                                             args.candidates, args.calls)
            if args.out:
                args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
