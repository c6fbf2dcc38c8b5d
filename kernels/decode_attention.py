"""Attention of one new query per request over its paged KV context (flash-decoding: the
context is cut into splits processed in parallel, then their partial softmaxes combined)."""
from __future__ import annotations

import math

import torch

from ._attention_tiles import KEY_BOUND, NO_MASK, attend_keys
from ._triton import check_same_device, jit, next_power_of_2, tl
from .prefill_attention import check_paged_attention_args, gather_kv_ref, padded_attention_ref

# Enough programs to fill every SM several times; a split below this many keys does not pay.
# H200, bf16: 32 splits beat fewer for B*KVH <= 256 up to 32k keys; 128 splits were 2x slower.
_PROGRAMS_PER_SM = 8
_MIN_KEYS_PER_SPLIT = 128
_MAX_SPLITS = 32
# (BLOCK_N keys per iteration, num_warps, num_stages, K_ROWS) by head_dim;
# bench/kernel_sweep.py times the alternatives.
_TUNING = {64: (64, 4, 2, False), 128: (64, 4, 2, False), 256: (32, 4, 2, False)}


def decode_attention_ref(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                         max_seq_len: int) -> torch.Tensor:
    # q: [B, H, D] (request b's query sits at position seq_lens[b] - 1) -> [B, H, D]
    keys = gather_kv_ref(key_cache, block_tables, max_seq_len)
    values = gather_kv_ref(value_cache, block_tables, max_seq_len)
    positions = (seq_lens.long() - 1)[:, None]  # [B, 1]
    return padded_attention_ref(q[:, None], positions, keys, values, scale)[:, 0]


@jit(do_not_specialize=["block_table_stride"])
def _decode_attention_kernel(
        q_ptr, key_cache_ptr, value_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr,
        partial_max_ptr, partial_sum_ptr, partial_acc_ptr, qk_scale,
        q_req_stride, q_head_stride, out_req_stride, out_head_stride,
        cache_block_stride, cache_slot_stride, cache_head_stride, block_table_stride,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
        DOT_PRECISION: tl.constexpr, K_ROWS: tl.constexpr):
    # grid: (B, KVH, NUM_SPLITS). Rows are the GROUP query heads of one kv head, padded to
    # BLOCK_G >= 16 for tl.dot. With one split the program writes the output itself;
    # otherwise it writes its (max, sum, acc) to the partial buffers [B, H, NUM_SPLITS(, D)].
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req)
    keys_per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    split_start = split * keys_per_split
    split_end = tl.minimum(split_start + keys_per_split, seq_len)

    rows = tl.arange(0, BLOCK_G)
    is_row = rows < GROUP
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM)
    req64 = req.to(tl.int64)
    q = tl.load(q_ptr + req64 * q_req_stride + heads[:, None] * q_head_stride + dims[None, :],
                mask=is_row[:, None], other=0.0)

    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    block_table_row = block_tables_ptr + req64 * block_table_stride
    head_offset = kv_head.to(tl.int64) * cache_head_stride
    key_ptr = key_cache_ptr + head_offset
    value_ptr = value_cache_ptr + head_offset
    # Whole tiles unmasked, then the split's last, partial tile (if any) bounds-checked.
    full_end = split_start + tl.maximum(split_end - split_start, 0) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = attend_keys(
        acc, l_i, m_i, q, key_ptr, value_ptr, block_table_row, rows, dims, split_start,
        full_end, split_end, qk_scale, cache_block_stride, cache_slot_stride,
        BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, MASK=NO_MASK, DOT_PRECISION=DOT_PRECISION,
        K_ROWS=K_ROWS)
    acc, l_i, m_i = attend_keys(
        acc, l_i, m_i, q, key_ptr, value_ptr, block_table_row, rows, dims, full_end,
        split_end, split_end, qk_scale, cache_block_stride, cache_slot_stride,
        BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, MASK=KEY_BOUND, DOT_PRECISION=DOT_PRECISION,
        K_ROWS=K_ROWS)

    if NUM_SPLITS == 1:
        # A request with no context (a padded graph slot) gets zeros, not 0 / 0.
        out = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)
        out_offsets = req64 * out_req_stride + heads[:, None] * out_head_stride
        tl.store(out_ptr + out_offsets + dims[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=is_row[:, None])
    else:
        partial_rows = (req64 * GROUP * tl.num_programs(1) + heads) * NUM_SPLITS + split
        tl.store(partial_max_ptr + partial_rows, m_i, mask=is_row)
        tl.store(partial_sum_ptr + partial_rows, l_i, mask=is_row)
        tl.store(partial_acc_ptr + partial_rows[:, None] * HEAD_DIM + dims[None, :], acc,
                 mask=is_row[:, None])


@jit
def _combine_splits_kernel(partial_max_ptr, partial_sum_ptr, partial_acc_ptr, out_ptr,
                           out_req_stride, out_head_stride, HEAD_DIM: tl.constexpr,
                           NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
    # grid: (B, H). Rescales each split's partial softmax to the global max and sums them.
    req = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = req * tl.num_programs(1) + head
    splits = tl.arange(0, BLOCK_S)
    is_split = splits < NUM_SPLITS
    dims = tl.arange(0, HEAD_DIM)
    m = tl.load(partial_max_ptr + row * NUM_SPLITS + splits, mask=is_split, other=-1.0e30)
    l = tl.load(partial_sum_ptr + row * NUM_SPLITS + splits, mask=is_split, other=0.0)
    acc = tl.load(partial_acc_ptr + (row * NUM_SPLITS + splits)[:, None] * HEAD_DIM
                  + dims[None, :], mask=is_split[:, None], other=0.0)  # [BLOCK_S, HEAD_DIM]
    weights = tl.exp2(m - tl.max(m, axis=0))
    total = tl.sum(l * weights, axis=0)
    out = tl.sum(acc * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + req * out_req_stride + head * out_head_stride + dims,
             out.to(out_ptr.dtype.element_ty))


def choose_num_splits(num_reqs: int, num_kv_heads: int, max_seq_len: int,
                      device: torch.device) -> int:
    """Splits per request: enough programs for every SM, no split under 128 keys. Host ints
    only, so a CUDA graph captured for (B, max_seq_len bucket) replays with the same grid."""
    num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
               if device.type == "cuda" else 132)
    num_programs = num_reqs * num_kv_heads
    target = _PROGRAMS_PER_SM * num_sms
    if num_programs >= target:
        return 1
    return max(1, min(-(-target // num_programs), -(-max_seq_len // _MIN_KEYS_PER_SPLIT),
                      _MAX_SPLITS))


def decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     max_seq_len: int, out: torch.Tensor | None = None,
                     num_splits: int | None = None,
                     tuning: tuple[int, int, int, bool] | None = None) -> torch.Tensor:
    """Never syncs the device (safe under CUDA-graph capture); scratch sizes come from host
    ints. `out` may be preallocated; `num_splits` overrides choose_num_splits and `tuning`
    the (BLOCK_N, num_warps, num_stages, K_ROWS) of _TUNING."""
    op = "decode_attention"
    check_paged_attention_args(op, q, key_cache, value_cache, block_tables, seq_lens)
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1:
        raise ValueError(f"{op}: out must be {tuple(q.shape)} {q.dtype} contiguous in head_dim,"
                         f" got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    check_same_device(op, q=q, out=out)
    num_reqs, num_heads, head_dim = q.shape
    num_kv_heads = key_cache.shape[2]
    if num_reqs == 0:
        return out
    if num_splits is None:
        num_splits = choose_num_splits(num_reqs, num_kv_heads, max_seq_len, q.device)
    if num_splits < 1:
        raise ValueError(f"{op}: num_splits must be >= 1, got {num_splits}")
    group = num_heads // num_kv_heads
    block_n, num_warps, num_stages, k_rows = tuning or _TUNING[max(64, min(head_dim, 256))]
    partial_shape = (num_reqs, num_heads, num_splits) if num_splits > 1 else (1,)
    partial_max = torch.empty(partial_shape, dtype=torch.float32, device=q.device)
    partial_sum = torch.empty(partial_shape, dtype=torch.float32, device=q.device)
    partial_acc = torch.empty((*partial_shape, head_dim) if num_splits > 1 else (1,),
                              dtype=torch.float32, device=q.device)
    _decode_attention_kernel[(num_reqs, num_kv_heads, num_splits)](
        q, key_cache, value_cache, out, block_tables, seq_lens, partial_max, partial_sum,
        partial_acc, scale * math.log2(math.e), q.stride(0), q.stride(1), out.stride(0),
        out.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_tables.stride(0), GROUP=group, BLOCK_G=max(16, next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_SIZE=key_cache.shape[1], BLOCK_N=block_n,
        NUM_SPLITS=num_splits, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        K_ROWS=k_rows, num_warps=num_warps, num_stages=num_stages)
    if num_splits > 1:
        _combine_splits_kernel[(num_reqs, num_heads)](
            partial_max, partial_sum, partial_acc, out, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits, BLOCK_S=next_power_of_2(num_splits),
            num_warps=4 if head_dim >= 128 else 2)
    return out
