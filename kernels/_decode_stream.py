"""Decode attention as one stream of key tiles: a fixed grid of programs per kv head, each
walking an equal, contiguous run of the batch's (request, key tile) pairs.

The one-program-per-request grid pays every program's start (sequence length, block table,
first K/V loads, one after another) once per request: with short contexts that start is a
large share of the program. Here a program's loop runs across request boundaries, so the
next tile's loads are in flight while the current one is reduced whichever request it
belongs to, and every program gets the same number of tiles whatever the lengths (long
contexts are split across programs as flash-decoding does, with no split count to choose).

A step's tile plan (which request and keys each tile holds, and the tile's block ids) is
built on the device once per step by `plan_decode_tiles` and shared by every layer. A
request cut between programs leaves a partial softmax at each cut; `_merge_cuts_kernel`
combines them. Everything is sized from host ints, so a CUDA graph replays it as is."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._triton import jit, next_power_of_2, tl

# tile_info's 4th field: the tile's index within its request, with this bit on its last tile
_LAST = 1 << 30
_LAST_C = tl.constexpr(_LAST) if tl is not None else _LAST


class DecodeTilePlan(NamedTuple):
    tile_info: torch.Tensor  # [max_tiles, 4] int32: request, first key, keys, index | _LAST
    tile_blocks: torch.Tensor  # [max_tiles, blocks_per_tile] int32: the tile's block ids
    num_tiles: torch.Tensor  # [1] int32: tiles in this step
    block_n: int


@jit(do_not_specialize=["num_reqs", "block_table_stride"])
def _plan_tiles_kernel(seq_lens_ptr, block_tables_ptr, key_base_ptr, tile_info_ptr,
                       tile_blocks_ptr, num_tiles_ptr, num_reqs, block_table_stride,
                       BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, NBT: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, CASCADE: tl.constexpr):
    # grid: (B,). Request req's tiles follow those of requests 0..req-1 (counted here, each
    # program summing the lengths before its own: B is at most a few thousand). Keys below
    # *key_base_ptr (CASCADE) are attended elsewhere. Every request gets one tile at least,
    # so its output is written even with no keys of its own.
    req = tl.program_id(0)
    base = 0
    if CASCADE:
        base = tl.load(key_base_ptr)
    first = 0
    for start in range(0, req, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        n = tl.load(seq_lens_ptr + r, mask=r < req, other=0)
        own = tl.maximum(n - base, 0)
        first += tl.sum(tl.where(r < req, tl.maximum(tl.cdiv(own, BLOCK_N), 1), 0), axis=0)
    seq_len = tl.load(seq_lens_ptr + req)
    num_tiles = tl.maximum(tl.cdiv(tl.maximum(seq_len - base, 0), BLOCK_N), 1)
    table_row = block_tables_ptr + req.to(tl.int64) * block_table_stride
    cols = tl.arange(0, NBT)
    for chunk in range(0, num_tiles, BLOCK_T):
        idx = chunk + tl.arange(0, BLOCK_T)
        is_tile = idx < num_tiles
        key0 = base + idx * BLOCK_N
        num_keys = tl.maximum(tl.minimum(seq_len - key0, BLOCK_N), 0)
        info = tile_info_ptr + (first + idx) * 4
        tl.store(info, tl.zeros_like(idx) + req, mask=is_tile)
        tl.store(info + 1, key0, mask=is_tile)
        tl.store(info + 2, num_keys, mask=is_tile)
        tl.store(info + 3, idx | tl.where(idx == num_tiles - 1, _LAST_C, 0), mask=is_tile)
        block_cols = key0[:, None] // BLOCK_SIZE + cols[None, :]
        is_block = is_tile[:, None] & (block_cols * BLOCK_SIZE < seq_len)
        block_ids = tl.load(table_row + block_cols, mask=is_block, other=0)
        tl.store(tile_blocks_ptr + (first + idx)[:, None] * NBT + cols[None, :], block_ids,
                 mask=is_tile[:, None])
    if req == num_reqs - 1:
        tl.store(num_tiles_ptr, first + num_tiles)


@jit(do_not_specialize=["q_req_stride", "out_req_stride"])
def _decode_stream_kernel(
        q_ptr, key_cache_ptr, value_cache_ptr, out_ptr, tile_info_ptr, tile_blocks_ptr,
        num_tiles_ptr, cut_max_ptr, cut_sum_ptr, cut_acc_ptr, key_base_ptr, state_max_ptr,
        state_sum_ptr, state_acc_ptr, qk_scale, q_req_stride, q_head_stride, out_req_stride,
        out_head_stride, cache_block_stride, cache_slot_stride, cache_head_stride,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NBT: tl.constexpr,
        DOT_PRECISION: tl.constexpr, CASCADE: tl.constexpr, PREFETCH: tl.constexpr):
    # grid: (P, KVH). Program p takes tiles p*per .. (p+1)*per of the plan, per = cdiv(T, P).
    # Rows are the GROUP query heads of one kv head (padded to BLOCK_G >= 16 for tl.dot).
    # A request whose tiles all lie in this run gets its output written here; a run's first
    # (cut on its left) and last (cut on its right) fragments go to cut slot 0 / 1 instead.
    # CASCADE: a request's first tile starts from _shared_prefix_kernel's state.
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    num_kv_heads = tl.num_programs(1)
    total = tl.load(num_tiles_ptr)
    per = tl.cdiv(total, tl.num_programs(0))
    t_start = pid * per
    t_end = tl.minimum(t_start + per, total)
    rows = tl.arange(0, BLOCK_G)
    is_row = rows < GROUP
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM)
    offsets = tl.arange(0, BLOCK_N)
    head_offset = kv_head.to(tl.int64) * cache_head_stride
    key_ptr = key_cache_ptr + head_offset
    value_ptr = value_cache_ptr + head_offset
    has_prefix = 0
    if CASCADE:
        has_prefix = tl.load(key_base_ptr) > 0
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    whole = 0  # the fragment being reduced began at its request's first tile
    # PREFETCH: the next tile's plan entries are loaded one iteration ahead (loop-carried),
    # so the K/V addresses of a tile are ready when its iteration starts.
    # (scalar masks go into the index bound: a scalar & a block is not portable)
    fields = tl.arange(0, 4)
    cols = tl.arange(0, NBT)
    next_info = tl.load(tile_info_ptr + t_start * 4 + fields,
                        mask=fields < tl.where(t_start < t_end, 4, 0), other=0)
    next_blocks = tl.load(tile_blocks_ptr + t_start * NBT + cols,
                          mask=cols < tl.where(t_start < t_end, NBT, 0), other=0)
    for t in range(t_start, t_end):
        if PREFETCH:
            info = next_info
            tile_blocks = next_blocks
            has_next = t + 1 < t_end
            next_info = tl.load(tile_info_ptr + (t + 1) * 4 + fields,
                                mask=fields < tl.where(has_next, 4, 0), other=0)
            next_blocks = tl.load(tile_blocks_ptr + (t + 1) * NBT + cols,
                                  mask=cols < tl.where(has_next, NBT, 0), other=0)
        else:
            info = tl.load(tile_info_ptr + t * 4 + fields)
            tile_blocks = tl.load(tile_blocks_ptr + t * NBT + cols)
        req = tl.sum(tl.where(fields == 0, info, 0), axis=0).to(tl.int64)
        key0 = tl.sum(tl.where(fields == 1, info, 0), axis=0)
        num_keys = tl.sum(tl.where(fields == 2, info, 0), axis=0)
        index = tl.sum(tl.where(fields == 3, info, 0), axis=0)
        is_last = index >= _LAST_C
        index = index & (_LAST_C - 1)
        begins = (index == 0) | (t == t_start)
        whole = tl.where(begins, (index == 0).to(tl.int32), whole)
        m_i = tl.where(begins, -1.0e30, m_i)
        l_i = tl.where(begins, 0.0, l_i)
        acc = tl.where(begins, 0.0, acc)
        if CASCADE:
            # (a scalar & a block is not portable: the condition goes into the row bound)
            from_prefix = rows < tl.where((index == 0) & (has_prefix != 0), GROUP, 0)
            state_rows = req * GROUP * num_kv_heads + heads
            m_i = tl.where(from_prefix, tl.load(state_max_ptr + state_rows, mask=from_prefix,
                                                other=-1.0e30), m_i)
            l_i = tl.where(from_prefix, tl.load(state_sum_ptr + state_rows, mask=from_prefix,
                                                other=0.0), l_i)
            acc = tl.where(from_prefix[:, None],
                           tl.load(state_acc_ptr + state_rows[:, None] * HEAD_DIM
                                   + dims[None, :], mask=from_prefix[:, None], other=0.0), acc)
        q = tl.load(q_ptr + req * q_req_stride + heads[:, None] * q_head_stride + dims[None, :],
                    mask=is_row[:, None], other=0.0)
        within = key0 % BLOCK_SIZE + offsets
        # the tile's block ids spread to its keys (NBT is small: a select per block)
        block_ids = tl.zeros([BLOCK_N], dtype=tl.int32)
        for j in tl.static_range(NBT):
            block_ids += tl.where(within // BLOCK_SIZE == j,
                                  tl.sum(tl.where(cols == j, tile_blocks, 0),
                                         axis=0), 0)
        slots = (block_ids.to(tl.int64) * cache_block_stride
                 + (within % BLOCK_SIZE) * cache_slot_stride)
        is_key = offsets < num_keys
        k = tl.load(key_ptr + slots[None, :] + dims[:, None], mask=is_key[None, :], other=0.0)
        v = tl.load(value_ptr + slots[:, None] + dims[None, :], mask=is_key[:, None], other=0.0)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        qk = tl.where(is_key[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        if is_last & (whole != 0):
            out = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)
            tl.store(out_ptr + req * out_req_stride + heads[:, None] * out_head_stride
                     + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=is_row[:, None])
        elif is_last | (t == t_end - 1):
            cut = ((pid * num_kv_heads + kv_head) * 2 + whole) * GROUP + rows
            tl.store(cut_max_ptr + cut, m_i, mask=is_row)
            tl.store(cut_sum_ptr + cut, l_i, mask=is_row)
            tl.store(cut_acc_ptr + cut[:, None] * HEAD_DIM + dims[None, :], acc,
                     mask=is_row[:, None])


@jit(do_not_specialize=["out_req_stride"])
def _merge_cuts_kernel(tile_info_ptr, num_tiles_ptr, seq_lens_ptr, key_base_ptr, cut_max_ptr,
                       cut_sum_ptr, cut_acc_ptr, out_ptr, out_req_stride, out_head_stride,
                       GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_N: tl.constexpr, CASCADE: tl.constexpr):
    # grid: (P, KVH). Program p merges the request its run starts inside of, when the run
    # before holds that request's first tile: that run's slot 1, then slot 0 of p and of
    # every later run that starts inside the request.
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    num_progs = tl.num_programs(0)
    num_kv_heads = tl.num_programs(1)
    total = tl.load(num_tiles_ptr)
    per = tl.cdiv(total, num_progs)
    t_start = pid * per
    if (pid > 0) & (t_start < total):
        index = tl.load(tile_info_ptr + t_start * 4 + 3) & (_LAST_C - 1)
        first_tile = t_start - index
        if (index > 0) & (first_tile // per == pid - 1):
            req = tl.load(tile_info_ptr + t_start * 4).to(tl.int64)
            rows = tl.arange(0, BLOCK_G)
            is_row = rows < GROUP
            dims = tl.arange(0, HEAD_DIM)
            cut = (((pid - 1) * num_kv_heads + kv_head) * 2 + 1) * GROUP + rows
            m = tl.load(cut_max_ptr + cut, mask=is_row, other=-1.0e30)
            l = tl.load(cut_sum_ptr + cut, mask=is_row, other=0.0)
            acc = tl.load(cut_acc_ptr + cut[:, None] * HEAD_DIM + dims[None, :],
                          mask=is_row[:, None], other=0.0)
            # the runs from p on that start inside the request: up to its last tile's run
            base = 0
            if CASCADE:
                base = tl.load(key_base_ptr)
            own = tl.maximum(tl.load(seq_lens_ptr + req) - base, 0)
            last_tile = first_tile + tl.maximum(tl.cdiv(own, BLOCK_N), 1) - 1
            for run in range(pid, last_tile // per + 1):
                cut = ((run * num_kv_heads + kv_head) * 2) * GROUP + rows
                m_run = tl.load(cut_max_ptr + cut, mask=is_row, other=-1.0e30)
                m_new = tl.maximum(m, m_run)
                alpha = tl.exp2(m - m_new)
                beta = tl.exp2(m_run - m_new)
                l = l * alpha + tl.load(cut_sum_ptr + cut, mask=is_row, other=0.0) * beta
                acc = acc * alpha[:, None] + tl.load(
                    cut_acc_ptr + cut[:, None] * HEAD_DIM + dims[None, :],
                    mask=is_row[:, None], other=0.0) * beta[:, None]
                m = m_new
            out = tl.where(l[:, None] > 0, acc / l[:, None], 0.0)
            heads = kv_head * GROUP + rows
            tl.store(out_ptr + req * out_req_stride + heads[:, None] * out_head_stride
                     + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=is_row[:, None])


def plan_decode_tiles(seq_lens: torch.Tensor, block_tables: torch.Tensor, block_size: int,
                      block_n: int, max_seq_len: int,
                      key_base: torch.Tensor | None = None) -> DecodeTilePlan:
    """The step's tiles, on the device (no sync; sized from host ints for CUDA graphs):
    requests in order, each cut into BLOCK_N-key tiles from key *key_base (0 without)."""
    num_reqs = seq_lens.shape[0]
    max_tiles = num_reqs * max(1, -(-max_seq_len // block_n))
    blocks_per_tile = max(1, block_n // block_size)
    device = seq_lens.device
    plan = DecodeTilePlan(
        tile_info=torch.empty((max_tiles, 4), dtype=torch.int32, device=device),
        tile_blocks=torch.empty((max_tiles, blocks_per_tile), dtype=torch.int32,
                                device=device),
        num_tiles=torch.empty(1, dtype=torch.int32, device=device), block_n=block_n)
    if num_reqs == 0:
        return plan
    _plan_tiles_kernel[(num_reqs,)](
        seq_lens, block_tables, key_base if key_base is not None else seq_lens,
        plan.tile_info, plan.tile_blocks, plan.num_tiles, num_reqs, block_tables.stride(0),
        BLOCK_N=block_n, BLOCK_SIZE=block_size, NBT=blocks_per_tile,
        BLOCK_R=min(1024, max(16, next_power_of_2(num_reqs))), BLOCK_T=64,
        CASCADE=key_base is not None, num_warps=4)
    return plan


def stream_programs(num_kv_heads: int, device: torch.device, programs_per_sm: int) -> int:
    """Programs per kv head: programs_per_sm on every SM, all resident at once."""
    num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
               if device.type == "cuda" else 4)
    return max(1, num_sms * programs_per_sm // num_kv_heads)


def decode_attention_stream(q: torch.Tensor, key_cache: torch.Tensor,
                            value_cache: torch.Tensor, plan: DecodeTilePlan,
                            seq_lens: torch.Tensor, scale: float, out: torch.Tensor,
                            num_programs: int, num_warps: int, num_stages: int,
                            state: tuple | None = None,
                            key_base: torch.Tensor | None = None,
                            prefetch: bool = True) -> torch.Tensor:
    """q [B, H, D] over the plan's tiles into `out`. state: the shared-prefix kernel's
    (max, sum, acc) with key_base, the prefix length (cascade); None without."""
    num_reqs, num_heads, head_dim = q.shape
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    block_g = max(16, next_power_of_2(group))
    cuts = num_programs * num_kv_heads * 2 * group
    cut_max = torch.empty(cuts, dtype=torch.float32, device=q.device)
    cut_sum = torch.empty(cuts, dtype=torch.float32, device=q.device)
    cut_acc = torch.empty((cuts, head_dim), dtype=torch.float32, device=q.device)
    cascade = state is not None
    if not cascade:
        state = (cut_max, cut_sum, cut_acc)  # placeholders, never read
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (num_programs, num_kv_heads)
    base = key_base if cascade else seq_lens
    _decode_stream_kernel[grid](
        q, key_cache, value_cache, out, plan.tile_info, plan.tile_blocks, plan.num_tiles,
        cut_max, cut_sum, cut_acc, base, *state, scale * math.log2(math.e),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), key_cache.stride(0),
        key_cache.stride(1), key_cache.stride(2), GROUP=group, BLOCK_G=block_g,
        HEAD_DIM=head_dim, BLOCK_SIZE=key_cache.shape[1], BLOCK_N=plan.block_n,
        NBT=plan.tile_blocks.shape[1], DOT_PRECISION=dot_precision, CASCADE=cascade,
        PREFETCH=prefetch, num_warps=num_warps, num_stages=num_stages)
    _merge_cuts_kernel[grid](
        plan.tile_info, plan.num_tiles, seq_lens, base, cut_max, cut_sum, cut_acc, out,
        out.stride(0), out.stride(1), GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim,
        BLOCK_N=plan.block_n, CASCADE=cascade, num_warps=4 if head_dim >= 128 else 2)
    return out
