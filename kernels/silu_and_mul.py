"""SwiGLU activation: silu(gate) * up over the gate/up halves of the fused projection."""
from __future__ import annotations

import torch

from ._triton import (check_dtype, check_last_dim_contiguous, jit, next_power_of_2,
                      require_triton, tl, wait_for_inputs)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    # x: [num_tokens, 2 * intermediate] -> [num_tokens, intermediate]
    half = x.shape[-1] // 2
    gate, up = x[..., :half].float(), x[..., half:].float()
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


@jit(pdl=True)
def _silu_and_mul_kernel(x_ptr, out_ptr, intermediate, x_stride, out_stride,
                         BLOCK: tl.constexpr, PDL: tl.constexpr):
    # grid: (num_tokens, cdiv(intermediate, BLOCK))
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + intermediate + cols, mask=mask, other=0.0)
    out = gate / (1.0 + tl.exp(-gate)) * up.to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    require_triton("silu_and_mul")
    if x.dim() != 2 or x.shape[1] % 2 != 0:
        raise ValueError(f"silu_and_mul: want x [T, 2 * I], got {tuple(x.shape)}")
    check_dtype("silu_and_mul", "x", x, _DTYPES)
    check_last_dim_contiguous("silu_and_mul", x=x)
    num_tokens, intermediate = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_tokens, intermediate), dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    # A row can be wide (Llama-8B: I = 14336): split it over programs past 4096 columns.
    block = min(next_power_of_2(intermediate), 4096)
    grid = (num_tokens, -(-intermediate // block))
    _silu_and_mul_kernel[grid](x, out, intermediate, x.stride(0), out.stride(0), BLOCK=block,
                               num_warps=min(max(block // 256, 1), 8))
    return out
