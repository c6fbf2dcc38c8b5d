"""out += x @ W.T in place: an output projection adding into the residual stream, as
`torch.addmm_` does with cuBLAS, on the persistent GEMM of gate_up_silu (_persistent_gemm).

It is for the shapes where cuBLAS leaves SMs idle: llama3-8b's o_proj at a decode step's 512
rows is 128 tiles of 128 x 128 on 132 SMs, one wave, which cuBLAS ran at 554 TFLOP/s against
its 718-754 on the other projections (RESULTS.md, session 9). Smaller tiles, and the tail
split, fill the SMs.
"""
from __future__ import annotations

import torch

from ._persistent_gemm import Config, check_tma_aligned, launch
from ._triton import check_dtype, check_same_device, require_triton

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_stages, num_warps). 128-row tiles with 4 warps
# fail to compile with warp specialisation and this epilogue (Triton 3.6).
DEFAULT_CONFIG: Config = (128, 64, 64, 16, 4, 8)


def matmul_add_ref(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    # x: [T, K]; weight: [N, K]; out: [T, N] += x @ weight.T (fp32 math, rounded once)
    out.copy_((out.float() + x.float() @ weight.float().T).to(out.dtype))
    return out


def _check_args(op: str, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    if x.dim() != 2 or weight.dim() != 2 or out.dim() != 2:
        raise ValueError(f"{op}: want x [T, K], weight [N, K] and out [T, N], got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)} and {tuple(out.shape)}")
    if weight.shape[1] != x.shape[1] or out.shape != (x.shape[0], weight.shape[0]):
        raise ValueError(f"{op}: shapes do not chain: x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}, out {tuple(out.shape)}")
    check_dtype(op, "x", x, _DTYPES)
    if weight.dtype != x.dtype or out.dtype != x.dtype:
        raise ValueError(f"{op}: x, weight and out must share a dtype, got {x.dtype}, "
                         f"{weight.dtype} and {out.dtype}")
    check_same_device(op, x=x, weight=weight, out=out)
    check_tma_aligned(op, x=x, weight=weight, out=out)


def matmul_add(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
               config: Config | None = None, num_programs: int | None = None,
               tail_split: int | None = None) -> torch.Tensor:
    """out [T, N] += x [T, K] @ weight [N, K].T, in place (returned). config, num_programs and
    tail_split as gate_up_silu's."""
    op = "matmul_add"
    require_triton(op)
    _check_args(op, x, weight, out)
    if config is not None and len(config) != 6:
        raise ValueError(f"{op}: config must be (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, "
                         f"num_stages, num_warps), got {config}")
    if x.shape[0]:
        launch(x, (weight,), out, swiglu=False, add_to_out=True,
               config=config or DEFAULT_CONFIG, num_programs=num_programs,
               tail_split=tail_split)
    return out
