"""Write this step's keys/values into the paged KV cache at their slots."""
from __future__ import annotations

import torch

from ._triton import check_dtype, check_same_device, jit, next_power_of_2, require_triton, tl


def write_kv_cache_ref(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                       value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    # key/value: [T, KVH, D]; caches: [num_blocks, block_size, KVH, D]; slot_mapping: [T]
    # (block_id * block_size + offset, -1 = skip). Writes in place.
    is_valid = slot_mapping >= 0
    slots = slot_mapping[is_valid]
    key_cache.view(-1, *key_cache.shape[2:])[slots] = key[is_valid].to(key_cache.dtype)
    value_cache.view(-1, *value_cache.shape[2:])[slots] = value[is_valid].to(value_cache.dtype)


@jit
def _write_kv_cache_kernel(key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
                           key_stride, value_stride, row_size, BLOCK: tl.constexpr):
    # One program per token: copies its KVH * D row of K and of V. Caches are contiguous, so
    # the slot's row starts at slot * row_size.
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        cols = tl.arange(0, BLOCK)
        mask = cols < row_size
        k = tl.load(key_ptr + token * key_stride + cols, mask=mask)
        v = tl.load(value_ptr + token * value_stride + cols, mask=mask)
        tl.store(key_cache_ptr + slot * row_size + cols,
                 k.to(key_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(value_cache_ptr + slot * row_size + cols,
                 v.to(value_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    op = "write_kv_cache"
    require_triton(op)
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(f"{op}: want key and value [T, KVH, D], got {tuple(key.shape)} and "
                         f"{tuple(value.shape)}")
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape \
            or key_cache.shape[2:] != key.shape[1:]:
        raise ValueError(f"{op}: want caches [num_blocks, block_size, {key.shape[1]}, "
                         f"{key.shape[2]}], got {tuple(key_cache.shape)} and "
                         f"{tuple(value_cache.shape)}")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"{op}: slot_mapping must be [{key.shape[0]}], got "
                         f"{tuple(slot_mapping.shape)}")
    check_dtype(op, "slot_mapping", slot_mapping, (torch.int64, torch.int32))
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError(f"{op}: key_cache and value_cache must be contiguous")
    for name, t in (("key", key), ("value", value)):
        if t.stride(2) != 1 or t.stride(1) != t.shape[2]:
            raise ValueError(f"{op}: {name} rows must be contiguous [KVH, D] (stride "
                             f"{t.stride()})")
    check_same_device(op, key=key, value=value, key_cache=key_cache, value_cache=value_cache,
                      slot_mapping=slot_mapping)
    if key.shape[0] == 0:
        return
    row_size = key.shape[1] * key.shape[2]
    block = next_power_of_2(row_size)
    _write_kv_cache_kernel[(key.shape[0],)](
        key, value, key_cache, value_cache, slot_mapping, key.stride(0), value.stride(0),
        row_size, BLOCK=block, num_warps=min(max(block // 256, 1), 8))
