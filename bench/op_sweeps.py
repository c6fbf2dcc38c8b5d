"""kernel_sweep.py's sections beyond attention: the sampler, the row-wise kernels, the read and
copy bandwidth, and the projections under each BLAS library (GPU only)."""
from __future__ import annotations

import itertools

import torch

from gpu_timing import time_graph_ms, time_ms

# llama3-8b's projections (out, in) and the tokens per step the workloads run
GEMM_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
               "down": (4096, 14336), "lm_head": (128256, 4096)}
GEMM_TOKENS = (64, 512, 1024, 8192, 16384)


def sweep_sample() -> dict:
    """The sampler on a step's bf16 logits (llama3-8b's vocabulary), ms by blocks per split,
    graph-timed; the tokens checked against the reference. (The exponential race it replaced,
    one kernel with a hash and two logs a token, is in git history: session 18.)"""
    from batchgen.kernels.cdf_sample import cdf_sample, cdf_sample_ref

    results = {}
    for rows in (64, 500, 1024):
        x = torch.randn(rows, 128256, device="cuda", dtype=torch.bfloat16)
        keys = torch.randint(0, 2**32, (rows,), device="cuda")
        for label, temperature in (("t=1", torch.ones(rows, device="cuda")),
                                   ("t=0.7", torch.full((rows,), 0.7, device="cuda"))):
            expected = cdf_sample_ref(x, keys, temperature)
            row = {}
            for blocks in (1, 2, 4, 8):
                same = (cdf_sample(x, keys, temperature, blocks) == expected).float().mean()
                assert same.item() > 0.95, (blocks, same.item())  # rounding at CDF steps
                row[f"cdf {blocks}"] = time_graph_ms(
                    lambda: cdf_sample(x, keys, temperature, blocks))
            best = min(row, key=row.get)
            print(f"sample {rows} x 128256 {label}: cdf 4 (the engine's) {row['cdf 4']:.3f} ms, "
                  f"best {best} {row[best]:.3f} ms")
            results[f"{rows} {label}"] = row
    return results


def sweep_rowwise() -> dict:
    """The step's row-wise kernels at llama3-8b's widths, us by launch config, graph-timed:
    RMSNorm by num_warps, SiLU-and-mul by (BLOCK, num_warps), rotary + KV write by num_warps
    (the first config of each is the engine's)."""
    from batchgen.kernels import rms_norm as norm_mod
    from batchgen.kernels import rotary_kv_write as rotary_mod
    from batchgen.kernels import silu_and_mul as silu_mod

    hidden, intermediate, heads, kv_heads, dim = 4096, 14336, 32, 8, 128
    results = {}
    for rows in (64, 500, 1024):
        x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(x)
        gate_up = torch.randn(rows, 2 * intermediate, device="cuda", dtype=torch.bfloat16)
        act = torch.empty(rows, intermediate, device="cuda", dtype=torch.bfloat16)
        qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, device="cuda",
                          dtype=torch.bfloat16)
        q = qkv[:, :heads * dim].view(rows, heads, dim)
        k = qkv[:, heads * dim:(heads + kv_heads) * dim].view(rows, kv_heads, dim)
        v = qkv[:, (heads + kv_heads) * dim:].view(rows, kv_heads, dim)
        cache = [torch.zeros(rows, 16, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
                 for _ in range(2)]
        positions = torch.randint(0, 4096, (rows,), device="cuda")
        cos_sin = torch.randn(4096, dim, device="cuda")
        slots = torch.randperm(rows * 16, device="cuda")[:rows]
        rotary_warps = 8 if rows <= rotary_mod._MAX_TOKENS_FOR_8_WARPS else 4

        def norm(warps):
            norm_mod._rms_norm_kernel[(rows,)](x, w, out, hidden, x.stride(0), out.stride(0),
                                               1e-5, BLOCK=hidden, num_warps=warps)

        def silu(config):
            block, warps = config
            silu_mod._silu_and_mul_kernel[(rows, -(-intermediate // block))](
                gate_up, act, intermediate, gate_up.stride(0), act.stride(0), BLOCK=block,
                num_warps=warps)

        def rotary(warps):
            rotary_mod._rotary_kv_write_kernel[(rows,)](
                q, k, v, positions, cos_sin, *cache, slots, heads, kv_heads, q.stride(0),
                q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                cos_sin.stride(0), HEAD_DIM=dim, IS_NEOX=True, BLOCK_H=heads,
                BLOCK_KVH=kv_heads, ROTATE_K=False, num_warps=warps)

        for name, run, configs in (
                ("rms_norm", norm, (8, 16, 4, 2, 1)),
                ("silu_and_mul", silu, ((4096, 8), (4096, 4), (4096, 16), (2048, 4), (2048, 8),
                                        (1024, 4), (1024, 2), (8192, 8), (8192, 16))),
                ("rotary_kv_write", rotary, (rotary_warps, *(
                    w for w in (1, 2, 4, 8) if w != rotary_warps)))):
            row = {str(c): time_graph_ms(lambda: run(c), reps=100) * 1000 for c in configs}
            best = min(row, key=row.get)
            print(f"{name} {rows} rows: engine's {configs[0]} {row[str(configs[0])]:.2f} us, "
                  f"best {best} {row[best]:.2f} us; " + ", ".join(
                      f"{c} {t:.2f}" for c, t in row.items()))
            results[f"{name} {rows} (us)"] = row
    return results


def sweep_bandwidth() -> dict:
    """Read-only and copy bandwidth over 4 GiB, TB/s: the decode kernel's ceilings. Read by
    torch's sum and by a plain Triton streaming read at several (BLOCK, ITERS, num_warps):
    whether the sum leaves read bandwidth that a kernel could still take."""
    import triton
    import triton.language as tl

    @triton.jit
    def read_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
        # each program sums ITERS consecutive blocks of BLOCK elements
        start = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
        acc = tl.zeros((BLOCK,), tl.float32)
        for i in range(ITERS):
            acc += tl.load(x_ptr + start + i * BLOCK + tl.arange(0, BLOCK)).to(tl.float32)
        tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))

    x = torch.empty(2 * 1024**3, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    read_ms = time_ms(lambda: x.sum(dtype=torch.float32))
    copy_ms = time_ms(lambda: y.copy_(x))
    out = {"read TB/s": x.numel() * 2 / read_ms / 1e9,
           "copy TB/s": 2 * x.numel() * 2 / copy_ms / 1e9}
    sums = torch.empty(x.numel() // 1024, device="cuda")
    for block, iters, warps in itertools.product((1024, 4096, 8192), (1, 8, 64), (4, 8)):
        grid = (x.numel() // (block * iters),)
        ms = time_ms(lambda: read_kernel[grid](x, sums, BLOCK=block, ITERS=iters,
                                               num_warps=warps))
        out[f"triton read {block}/{iters}/{warps} TB/s"] = x.numel() * 2 / ms / 1e9
    best = max((k for k in out if k.startswith("triton")), key=out.get)
    print(f"bandwidth: read {out['read TB/s']:.3f} TB/s, copy {out['copy TB/s']:.3f} TB/s, "
          f"best Triton read ({best[12:-5]}) {out[best]:.3f} TB/s")
    del x, y, sums
    torch.cuda.empty_cache()
    return out


def sweep_gemm() -> dict:
    """F.linear at the model's shapes under each BLAS library torch can call: TFLOP/s, graph
    timed. Replays reuse one weight, which L2 (50 MB) may hold where it is small (o_proj's
    34 MB): the engine reads every layer's from HBM, so take these as upper bounds."""
    import torch.nn.functional as F

    results = {}
    default = torch.backends.cuda.preferred_blas_library()
    try:
        for name, (n, k) in GEMM_SHAPES.items():
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            for m in GEMM_TOKENS:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                row = {}
                for lib in ("cublas", "cublaslt"):
                    torch.backends.cuda.preferred_blas_library(lib)
                    ms = time_graph_ms(lambda: F.linear(x, w))
                    row[lib] = 2 * m * n * k / ms / 1e9
                results[f"{name} M={m}"] = row
                print(f"gemm {name} [{m} x {k}] x [{k} x {n}]: " + ", ".join(
                    f"{lib} {tf:.0f} TFLOP/s" for lib, tf in row.items()))
    finally:
        torch.backends.cuda.preferred_blas_library(default)
    return results
