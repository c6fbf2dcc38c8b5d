"""Causal attention of a varlen batch of queries over the paged KV cache (prefill chunks and
decodes mixed in one step)."""
from __future__ import annotations

import torch


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
    out = torch.einsum("bkgqs,bskd->bqkgd", probs, values.float())
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


def prefill_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                      seq_lens: torch.Tensor, scale: float, max_query_len: int,
                      max_seq_len: int) -> torch.Tensor:
    raise NotImplementedError("prefill_attention: the Triton kernel is not written yet")
