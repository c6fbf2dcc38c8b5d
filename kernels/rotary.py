"""Rotary position embedding, rotate-half (NeoX / HF Llama) or interleaved (GPT-J) pairs.

cos_sin_cache: [max_position, rot_dim] fp32, columns :rot_dim/2 the cos, rot_dim/2: the sin;
rot_dim <= head_dim (dims past rot_dim pass through)."""
from __future__ import annotations

import torch

from ._triton import check_dtype, check_same_device, jit, next_power_of_2, require_triton, tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                is_neox: bool) -> torch.Tensor:
    # x: [T, heads, head_dim]; cos/sin: [T, 1, rot_dim / 2] fp32
    rot_dim = 2 * cos.shape[-1]
    x_rot = x[..., :rot_dim].float()
    if is_neox:
        x1, x2 = x_rot[..., :rot_dim // 2], x_rot[..., rot_dim // 2:]
    else:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
    o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    rotated = torch.cat((o1, o2), dim=-1) if is_neox else torch.stack((o1, o2), -1).flatten(-2)
    return torch.cat((rotated.to(x.dtype), x[..., rot_dim:]), dim=-1)


def apply_rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor,
                     is_neox: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    # q: [T, H, D], k: [T, KVH, D], positions: [T]. Rotates q and k in place, returns them.
    half = cos_sin_cache.shape[1] // 2
    cos_sin = cos_sin_cache[positions].float().unsqueeze(1)  # [T, 1, rot_dim]
    cos, sin = cos_sin[..., :half], cos_sin[..., half:]
    q.copy_(_rotate_ref(q, cos, sin, is_neox))
    k.copy_(_rotate_ref(k, cos, sin, is_neox))
    return q, k


@jit
def _apply_rotary_kernel(q_ptr, k_ptr, positions_ptr, cos_sin_ptr, num_heads, num_kv_heads,
                         q_token_stride, q_head_stride, k_token_stride, k_head_stride,
                         cos_sin_stride, HALF: tl.constexpr, IS_NEOX: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # One program per token: rotates all its q heads and k heads in place.
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    pairs = tl.arange(0, BLOCK_HALF)
    pair_mask = pairs < HALF
    cos = tl.load(cos_sin_ptr + pos * cos_sin_stride + pairs, mask=pair_mask, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * cos_sin_stride + HALF + pairs, mask=pair_mask, other=0.0)
    cos = cos.to(tl.float32)[None, :]
    sin = sin.to(tl.float32)[None, :]
    if IS_NEOX:
        offs1 = pairs
        offs2 = pairs + HALF
    else:
        offs1 = 2 * pairs
        offs2 = 2 * pairs + 1
    heads = tl.arange(0, BLOCK_H)

    q_mask = (heads < num_heads)[:, None] & pair_mask[None, :]
    q_row = q_ptr + token * q_token_stride + heads[:, None] * q_head_stride
    x1 = tl.load(q_row + offs1[None, :], mask=q_mask, other=0.0).to(tl.float32)
    x2 = tl.load(q_row + offs2[None, :], mask=q_mask, other=0.0).to(tl.float32)
    tl.store(q_row + offs1[None, :], (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty),
             mask=q_mask)
    tl.store(q_row + offs2[None, :], (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty),
             mask=q_mask)

    k_mask = (heads < num_kv_heads)[:, None] & pair_mask[None, :]
    k_row = k_ptr + token * k_token_stride + heads[:, None] * k_head_stride
    x1 = tl.load(k_row + offs1[None, :], mask=k_mask, other=0.0).to(tl.float32)
    x2 = tl.load(k_row + offs2[None, :], mask=k_mask, other=0.0).to(tl.float32)
    tl.store(k_row + offs1[None, :], (x1 * cos - x2 * sin).to(k_ptr.dtype.element_ty),
             mask=k_mask)
    tl.store(k_row + offs2[None, :], (x2 * cos + x1 * sin).to(k_ptr.dtype.element_ty),
             mask=k_mask)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor,
                 is_neox: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    op = "apply_rotary"
    require_triton(op)
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"{op}: want q [T, H, D] and k [T, KVH, D], got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    if positions.shape != (q.shape[0],):
        raise ValueError(f"{op}: positions must be [{q.shape[0]}], got {tuple(positions.shape)}")
    rot_dim = cos_sin_cache.shape[1] if cos_sin_cache.dim() == 2 else -1
    if rot_dim <= 0 or rot_dim % 2 or rot_dim > q.shape[2]:
        raise ValueError(f"{op}: cos_sin_cache must be [max_position, rot_dim] with an even "
                         f"rot_dim <= {q.shape[2]}, got {tuple(cos_sin_cache.shape)}")
    check_dtype(op, "q", q, _DTYPES)
    check_dtype(op, "k", k, _DTYPES)
    check_dtype(op, "positions", positions, (torch.int64, torch.int32))
    if q.stride(2) != 1 or k.stride(2) != 1 or cos_sin_cache.stride(1) != 1:
        raise ValueError(f"{op}: q, k and cos_sin_cache must be contiguous in their last dim")
    check_same_device(op, q=q, k=k, positions=positions, cos_sin_cache=cos_sin_cache)
    if q.shape[0] == 0:
        return q, k
    half = rot_dim // 2
    _apply_rotary_kernel[(q.shape[0],)](
        q, k, positions, cos_sin_cache, q.shape[1], k.shape[1], q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), cos_sin_cache.stride(0), HALF=half, IS_NEOX=is_neox,
        BLOCK_H=next_power_of_2(max(q.shape[1], k.shape[1])),
        BLOCK_HALF=next_power_of_2(half), num_warps=4)
    return q, k
