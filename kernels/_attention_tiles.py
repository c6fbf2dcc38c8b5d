"""The key/value tile loop both paged-attention kernels run: an online softmax over a range of
one request's keys, read from the paged cache BLOCK_N keys at a time."""
from __future__ import annotations

from ._triton import jit, tl


def _constexpr(value: int):
    # Triton kernels may read a module global only when it is a tl.constexpr.
    return tl.constexpr(value) if tl is not None else value


# What the tiles of a key range need masked (a constexpr: each kind compiles its own loop).
NO_MASK = _constexpr(0)  # every key of every tile exists and every row sees it
KEY_BOUND = _constexpr(1)  # keys at or past num_keys do not exist (a last, partial tile)
CAUSAL = _constexpr(2)  # KEY_BOUND, and row r sees keys up to row_positions[r] only


@jit
def _load(ptrs, mask, MASKED: tl.constexpr):
    # A plain load where every element exists (the unmasked tiles' loop stays pipelined).
    if MASKED:
        values = tl.load(ptrs, mask=mask, other=0)
    else:
        values = tl.load(ptrs)
    return values


@jit
def attend_keys(acc, l_i, m_i, q, key_ptr, value_ptr, block_table_row, row_positions, dims,
                key_start, key_end, num_keys, qk_scale, cache_block_stride, cache_slot_stride,
                BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                DOT_PRECISION: tl.constexpr, K_ROWS: tl.constexpr):
    # q: [ROWS, HEAD_DIM]; acc [ROWS, HEAD_DIM], l_i / m_i [ROWS] fp32 (m_i in log2 units,
    # qk_scale includes log2(e)); key_ptr / value_ptr point at the kv head's first element.
    # Keys key_start.. key_end in steps of BLOCK_N (key_start: a multiple of the block size at
    # least, so a tile's loads stay within whole blocks' runs).
    # Keeping the unmasked tiles in a loop of their own lets the compiler pipeline it.
    # K_ROWS: load K as [BLOCK_N, HEAD_DIM] and transpose it in the dot (else [HEAD_DIM,
    # BLOCK_N] straight away); which is faster is measured by bench/kernel_sweep.py.
    for start in range(key_start, key_end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        is_key = keys < num_keys  # unused in unmasked tiles
        block_ids = _load(block_table_row + keys // BLOCK_SIZE, is_key, MASK != NO_MASK)
        slot_offsets = (block_ids.to(tl.int64) * cache_block_stride
                        + (keys % BLOCK_SIZE) * cache_slot_stride)
        kv_offsets = slot_offsets[:, None] + dims[None, :]  # [BLOCK_N, HEAD_DIM]
        v = _load(value_ptr + kv_offsets, is_key[:, None], MASK != NO_MASK)
        if K_ROWS:
            k = tl.trans(_load(key_ptr + kv_offsets, is_key[:, None], MASK != NO_MASK))
        else:
            k = _load(key_ptr + slot_offsets[None, :] + dims[:, None], is_key[None, :],
                      MASK != NO_MASK)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # k: [HEAD_DIM, BLOCK_N]
        if MASK == KEY_BOUND:
            qk = tl.where(is_key[None, :], qk, float("-inf"))
        if MASK == CAUSAL:
            qk = tl.where(keys[None, :] <= row_positions[:, None], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@jit
def attend_key_range(acc, l_i, m_i, q, key_ptr, value_ptr, block_table_row, row_positions, dims,
                     key_start, open_end, num_keys, qk_scale, cache_block_stride,
                     cache_slot_stride, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                     EDGE_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     K_ROWS: tl.constexpr):
    # Keys key_start..num_keys: the whole tiles below open_end (a multiple of BLOCK_N past
    # key_start) unmasked, then the rest under EDGE_MASK (KEY_BOUND or CAUSAL).
    acc, l_i, m_i = attend_keys(
        acc, l_i, m_i, q, key_ptr, value_ptr, block_table_row, row_positions, dims, key_start,
        open_end, num_keys, qk_scale, cache_block_stride, cache_slot_stride,
        BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, MASK=NO_MASK, DOT_PRECISION=DOT_PRECISION,
        K_ROWS=K_ROWS)
    return attend_keys(
        acc, l_i, m_i, q, key_ptr, value_ptr, block_table_row, row_positions, dims, open_end,
        num_keys, num_keys, qk_scale, cache_block_stride, cache_slot_stride,
        BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, MASK=EDGE_MASK, DOT_PRECISION=DOT_PRECISION,
        K_ROWS=K_ROWS)
