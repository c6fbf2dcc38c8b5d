"""RMSNorm and the fused residual-add + RMSNorm, HF Llama numerics: normalise in fp32, cast to
the input dtype, then multiply by the weight."""
from __future__ import annotations

import torch

from ._triton import (check_dtype, check_last_dim_contiguous, check_same_device, jit,
                      next_power_of_2, require_triton, tl)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [num_tokens, hidden], weight: [hidden]
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = x + residual
    return rms_norm_ref(new_residual, weight, eps), new_residual


@jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr,
                     hidden, x_stride, residual_stride, out_stride, new_residual_stride, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    # One program per token row.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * residual_stride + cols, mask=mask, other=0.0)
        # Round the sum to the input dtype first: the next layer sees exactly this residual.
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(new_residual_ptr + row * new_residual_stride + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = (x32 * inv_rms).to(x.dtype) * weight
    tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check(op: str, x: torch.Tensor, weight: torch.Tensor, **others: torch.Tensor) -> None:
    require_triton(op)
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"{op}: want x [T, H] and weight [H], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    check_dtype(op, "x", x, _DTYPES)
    for name, t in others.items():
        if t.shape != x.shape or t.dtype != x.dtype:
            raise ValueError(f"{op}: {name} must match x ({tuple(x.shape)}, {x.dtype}), got "
                             f"{tuple(t.shape)}, {t.dtype}")
    check_same_device(op, x=x, weight=weight, **others)
    check_last_dim_contiguous(op, x=x, weight=weight, **others)


def _num_warps(block: int) -> int:
    return min(max(block // 256, 1), 8)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check("rms_norm", x, weight)
    out = torch.empty_like(x)
    if x.shape[0] == 0:
        return out
    block = next_power_of_2(x.shape[1])
    _rms_norm_kernel[(x.shape[0],)](
        x, x, weight, out, out, x.shape[1], x.stride(0), x.stride(0), out.stride(0),
        out.stride(0), eps, HAS_RESIDUAL=False, BLOCK=block, num_warps=_num_warps(block))
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check("fused_add_rms_norm", x, weight, residual=residual)
    out = torch.empty_like(x)
    new_residual = torch.empty_like(x)
    if x.shape[0] == 0:
        return out, new_residual
    block = next_power_of_2(x.shape[1])
    _rms_norm_kernel[(x.shape[0],)](
        x, residual, weight, out, new_residual, x.shape[1], x.stride(0), residual.stride(0),
        out.stride(0), new_residual.stride(0), eps, HAS_RESIDUAL=True, BLOCK=block,
        num_warps=_num_warps(block))
    return out, new_residual
