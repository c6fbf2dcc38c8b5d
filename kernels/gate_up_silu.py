"""The Llama MLP's gate/up projection fused with SwiGLU: silu(x @ W_gate.T) * (x @ W_up.T),
without writing the [T, 2 * I] projection to memory."""
from __future__ import annotations

import torch

from ._triton import (check_dtype, check_last_dim_contiguous, check_same_device, jit,
                      next_power_of_2, require_triton, tl)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
Config = tuple[int, int, int, int, int, int]


def gate_up_silu_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # x: [T, H]; weight: [2 * I, H], gate rows first -> [T, I] (fp32 math)
    intermediate = weight.shape[0] // 2
    gate = x.float() @ weight[:intermediate].float().T
    up = x.float() @ weight[intermediate:].float().T
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


@jit(do_not_specialize=["num_tokens"])
def _gate_up_silu_kernel(x_ptr, weight_ptr, out_ptr, num_tokens, hidden, intermediate,
                         x_stride, weight_stride, out_stride,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    # grid: (cdiv(T, BLOCK_M) * cdiv(I, BLOCK_N),). Programs walk GROUP_M row tiles down one
    # column of output tiles before moving right: neighbours in launch order share a weight
    # tile, and a group's x rows stay in L2 while its columns are swept.
    pid = tl.program_id(0)
    num_m_tiles = tl.cdiv(num_tokens, BLOCK_M)
    num_n_tiles = tl.cdiv(intermediate, BLOCK_N)
    tiles_per_group = GROUP_M * num_n_tiles
    first_m_tile = (pid // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(num_m_tiles - first_m_tile, GROUP_M)  # the last group is short
    m_tile = first_m_tile + (pid % tiles_per_group) % group_rows
    n_tile = (pid % tiles_per_group) // group_rows

    rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    # Tail rows and columns read a valid row (wrapped) instead of masking every load of the
    # K loop; their results are dropped by the store's mask.
    x_rows = (rows % num_tokens).to(tl.int64)
    gate_rows = (cols % intermediate).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    # x tiles: [BLOCK_M, BLOCK_K]; weight tiles, read transposed: [BLOCK_K, BLOCK_N]
    x_ptrs = x_ptr + x_rows[:, None] * x_stride + ks[None, :]
    gate_ptrs = weight_ptr + gate_rows[None, :] * weight_stride + ks[:, None]
    up_ptrs = weight_ptr + (gate_rows + intermediate)[None, :] * weight_stride + ks[:, None]

    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(hidden, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs)
            gate_w = tl.load(gate_ptrs)
            up_w = tl.load(up_ptrs)
        else:
            is_k = ks < hidden - k * BLOCK_K
            x = tl.load(x_ptrs, mask=is_k[None, :], other=0.0)
            gate_w = tl.load(gate_ptrs, mask=is_k[:, None], other=0.0)
            up_w = tl.load(up_ptrs, mask=is_k[:, None], other=0.0)
        acc_gate = tl.dot(x, gate_w, acc=acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(x, up_w, acc=acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K

    out = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
    is_out = (rows < num_tokens)[:, None] & (cols < intermediate)[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * out_stride + cols[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=is_out)


def default_config(num_tokens: int) -> Config:
    # Placeholders until bench/gemm_silu_sweep.py has run on the H200. A program holds two
    # [BLOCK_M, BLOCK_N] fp32 accumulators, like one BLOCK_M x 2 * BLOCK_N matmul tile; a
    # pipeline stage keeps (BLOCK_M + 2 * BLOCK_N) * BLOCK_K inputs in shared memory.
    if num_tokens <= 64:
        # Weight-bound: the row tile shrinks to the batch (tl.dot needs 16 rows), and narrow
        # column tiles give I / 64 programs (224 for Llama-8B), enough to cover the SMs.
        return max(16, next_power_of_2(num_tokens)), 64, 64, 8, 4, 4
    return 128, 128, 64, 8, 8, 3  # 48 KiB a stage


def _check_args(op: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{op}: want x [T, H] and weight [2 * I, H], got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: weight has {weight.shape[1]} input features, x has "
                         f"{x.shape[1]}")
    if weight.shape[0] % 2 != 0:
        raise ValueError(f"{op}: weight must stack gate and up rows (an even count), got "
                         f"{weight.shape[0]} rows")
    check_dtype(op, "x", x, _DTYPES)
    if weight.dtype != x.dtype:
        raise ValueError(f"{op}: x and weight must share a dtype, got {x.dtype} and "
                         f"{weight.dtype}")
    check_last_dim_contiguous(op, x=x, weight=weight)
    check_same_device(op, x=x, weight=weight)


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor,
                 config: Config | None = None) -> torch.Tensor:
    """x: [T, H]; weight: [2 * I, H] (rows [0, I) gate, [I, 2I) up) -> [T, I].
    config: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) instead of
    default_config's."""
    op = "gate_up_silu"
    require_triton(op)
    _check_args(op, x, weight)
    if config is not None and len(config) != 6:
        raise ValueError(f"{op}: config must be (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, "
                         f"num_warps, num_stages), got {config}")
    num_tokens, hidden = x.shape
    intermediate = weight.shape[0] // 2
    out = torch.empty((num_tokens, intermediate), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_m, block_n, block_k, group_m, num_warps, num_stages = (
        config or default_config(num_tokens))
    num_m_tiles, num_n_tiles = -(-num_tokens // block_m), -(-intermediate // block_n)
    grid = (num_m_tiles * num_n_tiles,)
    _gate_up_silu_kernel[grid](
        x, weight, out, num_tokens, hidden, intermediate, x.stride(0), weight.stride(0),
        out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        EVEN_K=hidden % block_k == 0,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages)
    return out
