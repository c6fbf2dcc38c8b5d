"""Rotary position embedding fused with the KV cache write: one pass over a step's q, k and v
rotates q in place and stores the rotated keys and the values at their cache slots, so the
rotated keys are never written back beside q, read again and copied (one kernel a layer, not
two).

Rotate-half (NeoX / HF Llama) or interleaved (GPT-J) pairs over the whole head dim.
cos_sin_cache: [max_position, head_dim] fp32, columns :head_dim/2 the cos, head_dim/2: the sin.
Caches: [num_blocks, block_size, KVH, D], contiguous; slot_mapping[t] = block_id * block_size +
offset, -1 = a padding token (its q is still rotated, nothing is stored)."""
from __future__ import annotations

import torch

from ._triton import (check_dtype, check_same_device, jit, next_power_of_2, require_triton, tl,
                      wait_for_inputs)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# One program per token: a small step has few, so each takes more warps. H200, bf16, llama3-8b
# widths, graph-timed (bench/kernel_sweep.py --only rowwise): 64 tokens 2.92 us with 8 warps
# against 4.87 with 4; 500 tokens 4.40 against 4.39; 1,024 tokens 6.87 against 6.27.
_MAX_TOKENS_FOR_8_WARPS = 256


def rotate_ref(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
               is_neox: bool = True) -> torch.Tensor:
    # x: [T, heads, D]; positions: [T] -> rotated copy of x (fp32 math, x's dtype)
    half = cos_sin_cache.shape[1] // 2
    cos_sin = cos_sin_cache[positions].float().unsqueeze(1)  # [T, 1, D]
    cos, sin = cos_sin[..., :half], cos_sin[..., half:]
    x32 = x.float()
    x1, x2 = (x32[..., :half], x32[..., half:]) if is_neox else (x32[..., 0::2], x32[..., 1::2])
    o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    rotated = torch.cat((o1, o2), dim=-1) if is_neox else torch.stack((o1, o2), -1).flatten(-2)
    return rotated.to(x.dtype)


def rotary_kv_write_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                        key_cache: torch.Tensor, value_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, is_neox: bool = True,
                        rotate_k: bool = False) -> torch.Tensor:
    # q: [T, H, D] (rotated in place and returned); k, v: [T, KVH, D] (k rotated in place too
    # when rotate_k, else left as it is; v left as it is)
    q.copy_(rotate_ref(q, positions, cos_sin_cache, is_neox))
    is_valid = slot_mapping >= 0
    slots = slot_mapping[is_valid]
    if rotate_k:  # every row rotated once, in place; the cache takes the stored ones
        k.copy_(rotate_ref(k, positions, cos_sin_cache, is_neox))
        rotated_k = k[is_valid]
    else:
        rotated_k = rotate_ref(k[is_valid], positions[is_valid], cos_sin_cache, is_neox)
    key_cache.view(-1, *key_cache.shape[2:])[slots] = rotated_k.to(key_cache.dtype)
    value_cache.view(-1, *value_cache.shape[2:])[slots] = v[is_valid].to(value_cache.dtype)
    return q


@jit
def _rotated_pairs(row_ptrs, pair_offsets1, pair_offsets2, mask, cos, sin):
    # row_ptrs: [heads, 1] pointers at each head's first element; cos, sin: [1, pairs]
    # -> the rotated (first, second) elements of each pair, fp32
    x1 = tl.load(row_ptrs + pair_offsets1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row_ptrs + pair_offsets2, mask=mask, other=0.0).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@jit
def _store_pairs(out_ptrs, pair_offsets1, pair_offsets2, mask, first, second):
    tl.store(out_ptrs + pair_offsets1, first.to(out_ptrs.dtype.element_ty), mask=mask)
    tl.store(out_ptrs + pair_offsets2, second.to(out_ptrs.dtype.element_ty), mask=mask)


@jit(pdl=True)
def _rotary_kv_write_kernel(q_ptr, k_ptr, v_ptr, positions_ptr, cos_sin_ptr, key_cache_ptr,
                            value_cache_ptr, slot_mapping_ptr, num_heads, num_kv_heads,
                            q_token_stride, q_head_stride, k_token_stride, k_head_stride,
                            v_token_stride, v_head_stride, cos_sin_stride,
                            HEAD_DIM: tl.constexpr, IS_NEOX: tl.constexpr,
                            BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr,
                            ROTATE_K: tl.constexpr, PDL: tl.constexpr):
    # One program per token: all its q heads in place, then its k and v rows into the cache
    # (and its k heads in place too when ROTATE_K).
    wait_for_inputs(PDL)
    HALF: tl.constexpr = HEAD_DIM // 2
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    pairs = tl.arange(0, HALF)
    cos = tl.load(cos_sin_ptr + pos * cos_sin_stride + pairs)[None, :]
    sin = tl.load(cos_sin_ptr + pos * cos_sin_stride + HALF + pairs)[None, :]
    if IS_NEOX:
        offsets1 = pairs[None, :]
        offsets2 = pairs[None, :] + HALF
    else:
        offsets1 = 2 * pairs[None, :]
        offsets2 = 2 * pairs[None, :] + 1

    heads = tl.arange(0, BLOCK_H)[:, None]
    q_rows = q_ptr + token * q_token_stride + heads * q_head_stride
    is_head = heads < num_heads
    q1, q2 = _rotated_pairs(q_rows, offsets1, offsets2, is_head, cos, sin)
    _store_pairs(q_rows, offsets1, offsets2, is_head, q1, q2)

    kv_heads = tl.arange(0, BLOCK_KVH)[:, None]
    is_kv_head = kv_heads < num_kv_heads
    k_rows = k_ptr + token * k_token_stride + kv_heads * k_head_stride
    k1, k2 = _rotated_pairs(k_rows, offsets1, offsets2, is_kv_head, cos, sin)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        cache_rows = slot * num_kv_heads * HEAD_DIM + kv_heads * HEAD_DIM
        _store_pairs(key_cache_ptr + cache_rows, offsets1, offsets2, is_kv_head, k1, k2)
        dims = tl.arange(0, HEAD_DIM)[None, :]
        v = tl.load(v_ptr + token * v_token_stride + kv_heads * v_head_stride + dims,
                    mask=is_kv_head, other=0.0)
        tl.store(value_cache_ptr + cache_rows + dims,
                 v.to(value_cache_ptr.dtype.element_ty), mask=is_kv_head)
    if ROTATE_K:  # the rows rotated once, stored twice
        _store_pairs(k_rows, offsets1, offsets2, is_kv_head, k1, k2)


def _check(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
           cos_sin_cache: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
           slot_mapping: torch.Tensor) -> None:
    require_triton(op)
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or k.shape[0] != q.shape[0] \
            or k.shape[2] != q.shape[2]:
        raise ValueError(f"{op}: want q [T, H, D] and k, v [T, KVH, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    num_tokens, head_dim = q.shape[0], q.shape[2]
    if head_dim < 2 or head_dim & (head_dim - 1):
        raise ValueError(f"{op}: head_dim must be a power of two, got {head_dim}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError(f"{op}: cos_sin_cache must be [max_position, {head_dim}] (rotary over "
                         f"the whole head), got {tuple(cos_sin_cache.shape)}")
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape \
            or key_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"{op}: want caches [num_blocks, block_size, {k.shape[1]}, {head_dim}], "
                         f"got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        if t.shape != (num_tokens,):
            raise ValueError(f"{op}: {name} must be [{num_tokens}], got {tuple(t.shape)}")
        check_dtype(op, name, t, (torch.int64, torch.int32))
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_dtype(op, name, t, _DTYPES)
        if t.stride(2) != 1:
            raise ValueError(f"{op}: {name} must be contiguous in head_dim (stride {t.stride()})")
    if cos_sin_cache.dtype != torch.float32 or cos_sin_cache.stride(1) != 1:
        raise ValueError(f"{op}: cos_sin_cache must be fp32, contiguous in its last dim")
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError(f"{op}: key_cache and value_cache must be contiguous")
    check_same_device(op, q=q, k=k, v=v, positions=positions, cos_sin_cache=cos_sin_cache,
                      key_cache=key_cache, value_cache=value_cache, slot_mapping=slot_mapping)


def rotary_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    cos_sin_cache: torch.Tensor, key_cache: torch.Tensor,
                    value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    is_neox: bool = True, rotate_k: bool = False) -> torch.Tensor:
    """Rotates q in place (returned) and stores rotated k and v at slot_mapping's slots;
    rotate_k: k is rotated in place as well (dense attention reads it there)."""
    op = "rotary_kv_write"
    _check(op, q, k, v, positions, cos_sin_cache, key_cache, value_cache, slot_mapping)
    if q.shape[0] == 0:
        return q
    _rotary_kv_write_kernel[(q.shape[0],)](
        q, k, v, positions, cos_sin_cache, key_cache, value_cache, slot_mapping, q.shape[1],
        k.shape[1], q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), cos_sin_cache.stride(0), HEAD_DIM=q.shape[2], IS_NEOX=is_neox,
        BLOCK_H=next_power_of_2(q.shape[1]), BLOCK_KVH=next_power_of_2(k.shape[1]),
        ROTATE_K=rotate_k, num_warps=8 if q.shape[0] <= _MAX_TOKENS_FOR_8_WARPS else 4)
    return q
