"""Attention of one new query per request over its paged KV context (flash-decoding: the
context is cut into splits processed in parallel, then their partial softmaxes combined).

Cascade: when every request's block table starts with the same physical blocks (a prompt
prefix served from the prefix cache, e.g. a recipe's instruction), those shared keys are
attended once for the whole batch (`_shared_prefix_kernel`: all requests' query heads against
each K/V tile, read once) and each request's own program continues the online softmax from
that state over the rest of its context. A batch of B requests sharing P keys then reads P
keys once instead of B times. That pays only for long prefixes and large batches: the L2
cache already serves a short shared prefix to every request (the caller's bar:
batchgen.engine.input_batch)."""
from __future__ import annotations

import math

import torch

from ._attention_tiles import KEY_BOUND, attend_key_range
from ._triton import check_same_device, jit, next_power_of_2, tl, wait_for_inputs
from .prefill_attention import check_paged_attention_args, gather_kv_ref, padded_attention_ref

# Enough programs to fill every SM a few times; a split below this many keys does not pay.
# H200, bf16, timed replayed from CUDA graphs (bench/kernel_sweep.py): 64 requests x 8 kv
# heads (512 programs) ran fastest unsplit, 8 x 4,096 keys with 8 splits.
_PROGRAMS_PER_SM = 3
_MIN_KEYS_PER_SPLIT = 128
_MAX_SPLITS = 32
# (BLOCK_N keys per iteration, num_warps, num_stages, K_ROWS) by head_dim, from the same
# sweep: against (64, 4, 2) 1.09x on a reviews decode step (933 requests, 600 keys), 1.28x
# on the baseline set's (64 x 740), 1.27x on small's (dim 64: one warp), equal elsewhere.
_TUNING = {64: (64, 1, 2, False), 128: (64, 2, 2, False), 256: (32, 4, 2, False)}
# The shared-prefix kernel's (BLOCK_M, BLOCK_N, num_warps, num_stages, K_ROWS): rows are
# (request, query head) pairs, as in the prefill kernel, whose measured tiles it takes.
_PREFIX_TUNING = {64: (64, 64, 4, 2, True), 128: (64, 64, 4, 2, True),
                  256: (64, 32, 4, 2, False)}


def decode_attention_ref(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                         max_seq_len: int) -> torch.Tensor:
    # q: [B, H, D] (request b's query sits at position seq_lens[b] - 1) -> [B, H, D]
    keys = gather_kv_ref(key_cache, block_tables, max_seq_len)
    values = gather_kv_ref(value_cache, block_tables, max_seq_len)
    positions = (seq_lens.long() - 1)[:, None]  # [B, 1]
    return padded_attention_ref(q[:, None], positions, keys, values, scale)[:, 0]


@jit(pdl=True, do_not_specialize=["block_table_stride"])
def _decode_attention_kernel(
        q_ptr, key_cache_ptr, value_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr,
        partial_max_ptr, partial_sum_ptr, partial_acc_ptr, prefix_len_ptr, state_max_ptr,
        state_sum_ptr, state_acc_ptr, qk_scale,
        q_req_stride, q_head_stride, out_req_stride, out_head_stride,
        cache_block_stride, cache_slot_stride, cache_head_stride, block_table_stride,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
        DOT_PRECISION: tl.constexpr, K_ROWS: tl.constexpr, CASCADE: tl.constexpr,
        PDL: tl.constexpr):
    # grid: (B, KVH, NUM_SPLITS). Rows are the GROUP query heads of one kv head, padded to
    # BLOCK_G >= 16 for tl.dot. With one split the program writes the output itself;
    # otherwise it writes its (max, sum, acc) to the partial buffers [B, H, NUM_SPLITS(, D)].
    # CASCADE: keys below *prefix_len_ptr were attended by _shared_prefix_kernel; the splits
    # cut the keys after them, and split 0 starts from that kernel's state [B, H(, D)].
    wait_for_inputs(PDL)
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req)
    key_base = 0
    if CASCADE:
        key_base = tl.load(prefix_len_ptr)
    keys_per_split = tl.cdiv(tl.cdiv(tl.maximum(seq_len - key_base, 0), NUM_SPLITS),
                             BLOCK_N) * BLOCK_N
    split_start = key_base + split * keys_per_split
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
    if CASCADE:
        # (is_row, and split 0 of a step with a prefix: a scalar & a block is not portable)
        from_prefix = rows < tl.where((split == 0) & (key_base > 0), GROUP, 0)
        state_rows = req64 * GROUP * tl.num_programs(1) + heads
        m_i = tl.load(state_max_ptr + state_rows, mask=from_prefix, other=-1.0e30)
        l_i = tl.load(state_sum_ptr + state_rows, mask=from_prefix, other=0.0)
        acc = tl.load(state_acc_ptr + state_rows[:, None] * HEAD_DIM + dims[None, :],
                      mask=from_prefix[:, None], other=0.0)
    block_table_row = block_tables_ptr + req64 * block_table_stride
    head_offset = kv_head.to(tl.int64) * cache_head_stride
    key_ptr = key_cache_ptr + head_offset
    value_ptr = value_cache_ptr + head_offset
    # Whole tiles unmasked, then the split's last, partial tile (if any) bounds-checked.
    full_end = split_start + tl.maximum(split_end - split_start, 0) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = attend_key_range(
        acc, l_i, m_i, q, key_ptr, value_ptr, block_table_row, rows, dims, split_start,
        full_end, split_end, qk_scale, cache_block_stride, cache_slot_stride,
        BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, EDGE_MASK=KEY_BOUND,
        DOT_PRECISION=DOT_PRECISION, K_ROWS=K_ROWS)

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


@jit(pdl=True, do_not_specialize=["num_reqs"])
def _shared_prefix_kernel(
        q_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, prefix_len_ptr,
        state_max_ptr, state_sum_ptr, state_acc_ptr, qk_scale, num_reqs,
        q_req_stride, q_head_stride, cache_block_stride, cache_slot_stride, cache_head_stride,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
        K_ROWS: tl.constexpr, PDL: tl.constexpr):
    # grid: (cdiv(B * GROUP, BLOCK_M), KVH). Keys 0..prefix_len of request 0's block table,
    # which every request shares, against BLOCK_M rows of the whole batch: row r is request
    # r // GROUP, query head kv_head * GROUP + r % GROUP. Writes each row's unnormalised
    # softmax state (max in log2 units, sum, acc) for the decode kernel to continue.
    wait_for_inputs(PDL)
    prefix_len = tl.load(prefix_len_ptr)
    if prefix_len == 0:
        return
    kv_head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    is_row = rows < num_reqs * GROUP
    reqs = (rows // GROUP).to(tl.int64)
    heads = kv_head * GROUP + rows % GROUP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + reqs[:, None] * q_req_stride + heads[:, None] * q_head_stride
                + dims[None, :], mask=is_row[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    head_offset = kv_head.to(tl.int64) * cache_head_stride
    key_ptr = key_cache_ptr + head_offset
    value_ptr = value_cache_ptr + head_offset
    full_end = prefix_len // BLOCK_N * BLOCK_N
    acc, l_i, m_i = attend_key_range(
        acc, l_i, m_i, q, key_ptr, value_ptr, block_tables_ptr, rows, dims, 0, full_end,
        prefix_len, qk_scale, cache_block_stride, cache_slot_stride, BLOCK_SIZE=BLOCK_SIZE,
        BLOCK_N=BLOCK_N, EDGE_MASK=KEY_BOUND, DOT_PRECISION=DOT_PRECISION, K_ROWS=K_ROWS)
    state_rows = reqs * GROUP * tl.num_programs(1) + heads
    tl.store(state_max_ptr + state_rows, m_i, mask=is_row)
    tl.store(state_sum_ptr + state_rows, l_i, mask=is_row)
    tl.store(state_acc_ptr + state_rows[:, None] * HEAD_DIM + dims[None, :], acc,
             mask=is_row[:, None])


@jit(pdl=True)
def _combine_splits_kernel(partial_max_ptr, partial_sum_ptr, partial_acc_ptr, out_ptr,
                           out_req_stride, out_head_stride, HEAD_DIM: tl.constexpr,
                           NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    # grid: (B, H). Rescales each split's partial softmax to the global max and sums them.
    wait_for_inputs(PDL)
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


def _target_programs(device: torch.device) -> int:
    num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
               if device.type == "cuda" else 132)
    return _PROGRAMS_PER_SM * num_sms


def min_unsplit_batch(num_kv_heads: int, device: torch.device) -> int:
    """The fewest requests that fill the GPU unsplit (choose_num_splits gives 1 from here)."""
    return -(-_target_programs(device) // num_kv_heads)


def choose_num_splits(num_reqs: int, num_kv_heads: int, max_seq_len: int,
                      device: torch.device) -> int:
    """Splits per request: enough programs for every SM, no split under 128 keys. Host ints
    only, so a CUDA graph captured for (B, max_seq_len bucket) replays with the same grid."""
    num_programs = num_reqs * num_kv_heads
    target = _target_programs(device)
    if num_programs >= target:
        return 1
    return max(1, min(-(-target // num_programs), -(-max_seq_len // _MIN_KEYS_PER_SPLIT),
                      _MAX_SPLITS))


def decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     max_seq_len: int, out: torch.Tensor | None = None,
                     num_splits: int | None = None,
                     tuning: tuple[int, int, int, bool] | None = None,
                     shared_prefix_len: torch.Tensor | None = None,
                     plan_cache: dict | None = None) -> torch.Tensor:
    """Never syncs the device (safe under CUDA-graph capture); scratch sizes come from host
    ints. `out` may be preallocated; `num_splits` overrides choose_num_splits and `tuning`
    the (BLOCK_N, num_warps, num_stages, K_ROWS) of _TUNING. plan_cache: a dict that lives
    for one step (every layer passes the same one): the arguments are checked once a step.

    shared_prefix_len: [1] int32 on the device, or None (no cascade). The keys 0..that length
    are held in the same blocks by every request's table (request 0's row is read for them),
    and lie before every request's newest key; a multiple of the block size, or 0 (then the
    cascade kernel returns at once). The caller checks the sharing on the host
    (batchgen.engine.input_batch.shared_prefix_len): the kernels trust it."""
    op = "decode_attention"
    cascade = shared_prefix_len is not None
    checked = (op, tuple(q.shape), q.dtype, tuple(key_cache.shape), cascade)
    if plan_cache is None or checked not in plan_cache:
        check_paged_attention_args(op, q, key_cache, value_cache, block_tables, seq_lens)
        if cascade:
            if shared_prefix_len.shape != (1,) or shared_prefix_len.dtype != torch.int32:
                raise ValueError(f"{op}: shared_prefix_len must be a [1] int32 tensor, got "
                                 f"{tuple(shared_prefix_len.shape)} {shared_prefix_len.dtype}")
            check_same_device(op, q=q, shared_prefix_len=shared_prefix_len)
        if plan_cache is not None:
            plan_cache[checked] = True
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
    tile_dim = max(64, min(head_dim, 256))
    block_n, num_warps, num_stages, k_rows = tuning or _TUNING[tile_dim]
    partial_shape = (num_reqs, num_heads, num_splits) if num_splits > 1 else (1,)
    partial_max = torch.empty(partial_shape, dtype=torch.float32, device=q.device)
    partial_sum = torch.empty(partial_shape, dtype=torch.float32, device=q.device)
    partial_acc = torch.empty((*partial_shape, head_dim) if num_splits > 1 else (1,),
                              dtype=torch.float32, device=q.device)
    qk_scale = scale * math.log2(math.e)
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    state = (partial_max, partial_sum, partial_acc)  # placeholders when there is no cascade
    if cascade:
        state = (torch.empty((num_reqs, num_heads), dtype=torch.float32, device=q.device),
                 torch.empty((num_reqs, num_heads), dtype=torch.float32, device=q.device),
                 torch.empty((num_reqs, num_heads, head_dim), dtype=torch.float32,
                             device=q.device))
        block_m, prefix_block_n, prefix_warps, prefix_stages, prefix_k_rows = \
            _PREFIX_TUNING[tile_dim]
        _shared_prefix_kernel[(-(-num_reqs * group // block_m), num_kv_heads)](
            q, key_cache, value_cache, block_tables, shared_prefix_len, *state, qk_scale,
            num_reqs, q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1),
            key_cache.stride(2), GROUP=group, HEAD_DIM=head_dim,
            BLOCK_SIZE=key_cache.shape[1], BLOCK_M=block_m, BLOCK_N=prefix_block_n,
            DOT_PRECISION=dot_precision, K_ROWS=prefix_k_rows, num_warps=prefix_warps,
            num_stages=prefix_stages)
    _decode_attention_kernel[(num_reqs, num_kv_heads, num_splits)](
        q, key_cache, value_cache, out, block_tables, seq_lens, partial_max, partial_sum,
        partial_acc, shared_prefix_len if cascade else seq_lens, *state, qk_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), key_cache.stride(0),
        key_cache.stride(1), key_cache.stride(2), block_tables.stride(0), GROUP=group,
        BLOCK_G=max(16, next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=key_cache.shape[1], BLOCK_N=block_n, NUM_SPLITS=num_splits,
        DOT_PRECISION=dot_precision, K_ROWS=k_rows, CASCADE=cascade, num_warps=num_warps,
        num_stages=num_stages)
    if num_splits > 1:
        _combine_splits_kernel[(num_reqs, num_heads)](
            partial_max, partial_sum, partial_acc, out, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits, BLOCK_S=next_power_of_2(num_splits),
            num_warps=4 if head_dim >= 128 else 2)
    return out
