"""RMSNorm, HF Llama numerics: normalise in fp32, cast to the input dtype, then multiply by the
weight. (The residual add before it rides in the previous projection's matmul epilogue.)"""
from __future__ import annotations

import torch

from ._triton import (check_dtype, check_last_dim_contiguous, check_same_device, jit,
                      next_power_of_2, require_triton, tl, wait_for_inputs)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [num_tokens, hidden], weight: [hidden]
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight


@jit(pdl=True)
def _rms_norm_kernel(x_ptr, weight_ptr, out_ptr, hidden, x_stride, out_stride, eps,
                     BLOCK: tl.constexpr, PDL: tl.constexpr):
    # One program per token row.
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    x32 = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = (x32 * inv_rms).to(x.dtype) * weight
    tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check(op: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    require_triton(op)
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"{op}: want x [T, H] and weight [H], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    check_dtype(op, "x", x, _DTYPES)
    check_same_device(op, x=x, weight=weight)
    check_last_dim_contiguous(op, x=x, weight=weight)


def _num_warps(block: int) -> int:
    return min(max(block // 256, 1), 8)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check("rms_norm", x, weight)
    out = torch.empty_like(x)
    if x.shape[0] == 0:
        return out
    block = next_power_of_2(x.shape[1])
    _rms_norm_kernel[(x.shape[0],)](
        x, weight, out, x.shape[1], x.stride(0), out.stride(0), eps, BLOCK=block,
        num_warps=_num_warps(block))
    return out
