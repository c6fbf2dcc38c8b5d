"""Causal attention of a varlen batch of queries over the paged KV cache (prefill chunks and
decodes mixed in one step)."""
from __future__ import annotations

import math

import torch

from ._attention_tiles import CAUSAL, attend_key_range
from ._triton import (check_dtype, check_same_device, jit, next_power_of_2, require_triton,
                      tl, wait_for_inputs)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def gather_kv_ref(cache: torch.Tensor, block_tables: torch.Tensor,
                  max_seq_len: int) -> torch.Tensor:
    # cache: [num_blocks, block_size, KVH, D]; block_tables: [B, M]
    # -> [B, max_seq_len, KVH, D], each request's keys (or values) in position order.
    block_size = cache.shape[1]
    num_blocks = min(-(-max_seq_len // block_size), block_tables.shape[1])
    blocks = cache[block_tables[:, :num_blocks].long()]  # [B, num_blocks, block_size, KVH, D]
    return blocks.flatten(1, 2)[:, :max_seq_len]


def padded_attention_ref(q: torch.Tensor, q_positions: torch.Tensor, keys: torch.Tensor,
                         values: torch.Tensor, scale: float) -> torch.Tensor:
    # q: [B, Q, H, D]; q_positions: [B, Q] (-1 = padding row); keys/values: [B, S, KVH, D]
    # -> [B, Q, H, D]. Query at position p attends to keys 0..p (fp32 math).
    num_reqs, num_queries, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[2]
    group = num_heads // num_kv_heads
    q5 = q.float().view(num_reqs, num_queries, num_kv_heads, group, head_dim)
    scores = torch.einsum("bqkgd,bskd->bkgqs", q5, keys.float()) * scale  # [B, KVH, G, Q, S]
    key_positions = torch.arange(keys.shape[1], device=q.device)
    # Padding rows see key 0 only, so softmax stays finite; their output is dropped.
    is_visible = key_positions[None, None, :] <= q_positions.clamp(min=0)[:, :, None]
    scores = scores.masked_fill(~is_visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Slots past a request's context may hold garbage (even NaN): 0 * NaN would leak it.
    is_key_used = key_positions[None, :] <= q_positions.max(dim=1).values[:, None]  # [B, S]
    values = torch.where(is_key_used[:, :, None, None], values.float(), 0.0)
    out = torch.einsum("bkgqs,bskd->bqkgd", probs, values)
    return out.reshape(num_reqs, num_queries, num_heads, head_dim).to(q.dtype)


def prefill_attention_ref(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                          seq_lens: torch.Tensor, scale: float, max_query_len: int,
                          max_seq_len: int) -> torch.Tensor:
    # q: [T, H, D] -> [T, H, D]. Requests with one query (decodes) and with several are
    # padded separately, so a long prefill chunk does not pad every decode to its length.
    num_tokens = q.shape[0]
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    starts = query_start_loc.long()
    query_lens = starts[1:] - starts[:-1]  # [B]
    tokens = torch.arange(num_tokens, device=q.device)
    token_reqs = torch.searchsorted(starts[1:], tokens, right=True)  # [T]
    token_offsets = tokens - starts[token_reqs]
    token_positions = (seq_lens.long() - query_lens)[token_reqs] + token_offsets
    for is_in_group, group_max_len in ((query_lens == 1, 1), (query_lens > 1, max_query_len)):
        reqs = is_in_group.nonzero().flatten()
        if reqs.numel() == 0:
            continue
        local_req = torch.cumsum(is_in_group.long(), 0) - 1  # request -> row in this group
        is_token_in_group = is_in_group[token_reqs]
        rows = local_req[token_reqs[is_token_in_group]]
        cols = token_offsets[is_token_in_group]
        q_pad = q.new_zeros((reqs.numel(), group_max_len, *q.shape[1:]))
        q_pad[rows, cols] = q[is_token_in_group]
        positions = torch.full((reqs.numel(), group_max_len), -1, device=q.device)
        positions[rows, cols] = token_positions[is_token_in_group]
        keys = gather_kv_ref(key_cache, block_tables[reqs], max_seq_len)
        values = gather_kv_ref(value_cache, block_tables[reqs], max_seq_len)
        out_pad = padded_attention_ref(q_pad, positions, keys, values, scale)
        out[is_token_in_group] = out_pad[rows, cols]
    return out


@jit(pdl=True, do_not_specialize=["num_reqs", "block_table_stride"])
def _prefill_attention_kernel(
        q_ptr, key_cache_ptr, value_cache_ptr, out_ptr, block_tables_ptr, query_start_loc_ptr,
        seq_lens_ptr, tile_reqs_ptr, tile_first_rows_ptr, qk_scale, num_reqs,
        q_token_stride, q_head_stride, out_token_stride, out_head_stride,
        cache_block_stride, cache_slot_stride, cache_head_stride, block_table_stride,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
        K_ROWS: tl.constexpr, PDL: tl.constexpr):
    # grid: (query tiles, KVH). A tile is BLOCK_M rows of one request, row r being query
    # token r // GROUP of the request and query head kv_head * GROUP + r % GROUP: the GROUP
    # heads sharing a kv head are packed into one tl.dot and read each K/V tile once.
    wait_for_inputs(PDL)
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = tl.load(tile_reqs_ptr + tile)
    if req >= num_reqs:
        return
    first_row = tl.load(tile_first_rows_ptr + tile)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + req)
    context_start = seq_len - q_len  # position of the request's first query

    rows = first_row + tl.arange(0, BLOCK_M)
    is_row = rows < q_len * GROUP
    row_tokens = rows // GROUP
    row_heads = kv_head * GROUP + rows % GROUP
    row_positions = context_start + row_tokens
    dims = tl.arange(0, HEAD_DIM)
    tokens64 = (q_start + row_tokens).to(tl.int64)
    q_offsets = tokens64[:, None] * q_token_stride + row_heads[:, None] * q_head_stride
    q = tl.load(q_ptr + q_offsets + dims[None, :], mask=is_row[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    last_row = tl.minimum(first_row + BLOCK_M, q_len * GROUP) - 1
    # Keys below num_open_keys are visible to every row of the tile: no causal mask there.
    num_open_keys = context_start + first_row // GROUP + 1
    num_keys = context_start + last_row // GROUP + 1
    open_end = (num_open_keys // BLOCK_N) * BLOCK_N
    block_table_row = block_tables_ptr + req.to(tl.int64) * block_table_stride
    head_offset = kv_head.to(tl.int64) * cache_head_stride
    key_ptr = key_cache_ptr + head_offset
    value_ptr = value_cache_ptr + head_offset
    acc, l_i, m_i = attend_key_range(
        acc, l_i, m_i, q, key_ptr, value_ptr, block_table_row, row_positions, dims, 0, open_end,
        num_keys, qk_scale, cache_block_stride, cache_slot_stride, BLOCK_SIZE=BLOCK_SIZE,
        BLOCK_N=BLOCK_N, EDGE_MASK=CAUSAL, DOT_PRECISION=DOT_PRECISION, K_ROWS=K_ROWS)
    out = acc / l_i[:, None]
    out_offsets = tokens64[:, None] * out_token_stride + row_heads[:, None] * out_head_stride
    tl.store(out_ptr + out_offsets + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=is_row[:, None])


def _tile_map(query_start_loc: torch.Tensor, num_tokens: int, num_reqs: int, group: int,
              block_m: int, first_req: int = 0, skip: tuple[int, int, int] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile -> (request, first row), built on the device without a sync. Request b has
    cdiv(q_len_b * group, block_m) tiles, none below first_req nor in skip's (first request,
    requests, their tokens); the grid's bound covers every split. -> (tile_reqs [N] int32
    (num_reqs past the end), tile_first_rows [N] int32)."""
    starts = query_start_loc.long()
    tiles_per_req = ((starts[1:] - starts[:-1]) * group + block_m - 1) // block_m  # [B]
    tiles_per_req[:first_req] = 0
    skip_first, skip_reqs, skip_tokens = skip or (0, 0, 0)
    tiles_per_req[skip_first:skip_first + skip_reqs] = 0
    tile_ends = torch.cumsum(tiles_per_req, 0)
    # (each request left out holds one token at least)
    num_tiles = (-(-(num_tokens - first_req - skip_tokens) * group // block_m)
                 + num_reqs - first_req - skip_reqs)
    tiles = torch.arange(num_tiles, device=query_start_loc.device)
    tile_reqs = torch.searchsorted(tile_ends, tiles, right=True)
    tile_firsts = tile_ends - tiles_per_req
    tile_first_rows = (tiles - tile_firsts[tile_reqs.clamp(max=max(num_reqs - 1, 0))]) * block_m
    return tile_reqs.to(torch.int32), tile_first_rows.to(torch.int32)


def check_paged_attention_args(op: str, q: torch.Tensor, key_cache: torch.Tensor,
                               value_cache: torch.Tensor, block_tables: torch.Tensor,
                               seq_lens: torch.Tensor) -> None:
    """Shared by the prefill and decode wrappers: q [*, H, D] against the paged caches."""
    require_triton(op)
    if q.dim() != 3:
        raise ValueError(f"{op}: q must be [tokens, heads, head_dim], got {tuple(q.shape)}")
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError(f"{op}: caches must both be [num_blocks, block_size, KVH, D], got "
                         f"{tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = key_cache.shape[2]
    if key_cache.shape[3] != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"{op}: q has {num_heads} heads of dim {head_dim}; the cache has "
                         f"{num_kv_heads} kv heads of dim {key_cache.shape[3]}")
    if head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"{op}: head_dim must be a power of two in 16..256, got {head_dim}")
    check_dtype(op, "q", q, _DTYPES)
    if key_cache.dtype != q.dtype or value_cache.dtype != q.dtype:
        raise ValueError(f"{op}: q, key_cache and value_cache must share a dtype, got "
                         f"{q.dtype}, {key_cache.dtype}, {value_cache.dtype}")
    check_dtype(op, "block_tables", block_tables, (torch.int32, torch.int64))
    check_dtype(op, "seq_lens", seq_lens, (torch.int32, torch.int64))
    if block_tables.dim() != 2 or block_tables.shape[0] != seq_lens.shape[0] \
            or block_tables.stride(1) != 1:
        raise ValueError(f"{op}: block_tables must be a row-contiguous [B, M] for B = "
                         f"{seq_lens.shape[0]}, got {tuple(block_tables.shape)}")
    if q.stride(2) != 1 or key_cache.stride() != value_cache.stride() \
            or key_cache.stride(3) != 1:
        raise ValueError(f"{op}: q and the caches must be contiguous in head_dim, the caches "
                         f"with equal strides")
    check_same_device(op, q=q, key_cache=key_cache, value_cache=value_cache,
                      block_tables=block_tables, seq_lens=seq_lens)


def _tile_sizes(head_dim: int, num_rows: int) -> tuple[int, int, int, int, bool]:
    # -> (BLOCK_M, BLOCK_N, num_warps, num_stages, K_ROWS); rows are (token, head) pairs of a
    # request. Measured on an H200 (bf16, triton 3.6, `bench/kernel_sweep.py`): on the
    # workloads' steps (16 x 1024-token prompts; 12 x 416-token chunks beside 900 decodes)
    # (64, 64, 4, 2) with K loaded by rows was best or within 3% of best for dims 64 and 128,
    # 1.18x (dim 128) and 1.35x (dim 64) faster on the mixed step than the tiles tuned before
    # on 4 x 4096-token prompts.
    if head_dim <= 128:
        block_m, block_n, num_warps, num_stages, k_rows = 64, 64, 4, 2, True
    else:
        block_m, block_n, num_warps, num_stages, k_rows = 64, 32, 4, 2, False
    block_m = min(block_m, max(16, next_power_of_2(num_rows)))  # short chunks / decodes
    return block_m, block_n, num_warps, num_stages, k_rows


def prefill_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                      seq_lens: torch.Tensor, scale: float, max_query_len: int,
                      max_seq_len: int, plan_cache: dict | None = None,
                      tuning: tuple[int, int, int, int, bool] | None = None,
                      first_req: int = 0,
                      skip: tuple[int, int, int] | None = None) -> torch.Tensor:
    """plan_cache: a dict that lives for one step (every layer passes the same one): the
    argument checks and the tile map are then done once per step, not once per layer.
    tuning: (BLOCK_M, BLOCK_N, num_warps, num_stages, K_ROWS) instead of _tile_sizes'.
    first_req: the requests before it are left out (their output rows are not written): a
    mixed step's leading decodes, which decode_attention attends (layers/attention.py).
    skip: (first request, requests, their tokens), past first_req, also left out: a run of
    fresh prompts attended densely (layers/dense_attention.py)."""
    op = "prefill_attention"
    num_tokens, num_heads, head_dim = q.shape
    num_reqs = seq_lens.shape[0]
    group = num_heads // key_cache.shape[2]
    block_m, block_n, num_warps, num_stages, k_rows = (
        tuning or _tile_sizes(head_dim, max_query_len * group))
    plan_key = (op, block_m, group, q.dtype, tuple(key_cache.shape), first_req, skip)
    plan = plan_cache.get(plan_key) if plan_cache is not None else None
    if plan is None:
        check_paged_attention_args(op, q, key_cache, value_cache, block_tables, seq_lens)
        if query_start_loc.shape != (num_reqs + 1,):
            raise ValueError(f"{op}: query_start_loc must be [{num_reqs + 1}], got "
                             f"{tuple(query_start_loc.shape)}")
        check_same_device(op, q=q, query_start_loc=query_start_loc)
        if not 0 <= first_req <= num_reqs:
            raise ValueError(f"{op}: first_req must be in 0..{num_reqs}, got {first_req}")
        if skip is not None and not (first_req <= skip[0] <= skip[0] + skip[1] <= num_reqs
                                     and 0 <= skip[2] <= num_tokens):
            raise ValueError(f"{op}: skip {skip} is not (first request, requests, tokens) "
                             f"within requests {first_req}..{num_reqs} and {num_tokens} tokens")
        plan = _tile_map(query_start_loc, num_tokens, num_reqs, group, block_m, first_req, skip)
        if plan_cache is not None:
            plan_cache[plan_key] = plan
    out = torch.empty_like(q)
    tile_reqs, tile_first_rows = plan
    if num_tokens == 0 or tile_reqs.shape[0] == 0:
        return out
    grid = (tile_reqs.shape[0], key_cache.shape[2])
    _prefill_attention_kernel[grid](
        q, key_cache, value_cache, out, block_tables, query_start_loc, seq_lens,
        tile_reqs, tile_first_rows, scale * math.log2(math.e),
        num_reqs, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=key_cache.shape[1], BLOCK_M=block_m,
        BLOCK_N=block_n, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        K_ROWS=k_rows, num_warps=num_warps, num_stages=num_stages)
    return out
