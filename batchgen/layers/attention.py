"""Paged attention of one layer: rotate q and k, store this step's K/V in the cache (one fused
kernel on CUDA), then attend.

Query i of request b sits at position seq_lens[b] - q_len_b + i and sees keys 0..that
position of its request, all read back from the paged cache (prefix + this step)."""
from __future__ import annotations

import torch
from torch import nn

from batchgen.layers.context import ForwardContext
from batchgen.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 layer_idx: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.layer_idx = layer_idx
        # One table shared by every layer (the same module object; its buffer is not saved).
        self.rotary_emb = rotary_emb

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        # positions: [T]; q: [T, H, D] (rotated in place); k, v: [T, KVH, D] -> out [T, H, D]
        from batchgen.kernels import decode_attention, prefill_attention, rotary_kv_write
        is_cuda = q.is_cuda
        key_cache, value_cache = ctx.kv_caches[self.layer_idx]
        store = rotary_kv_write.rotary_kv_write if is_cuda else rotary_kv_write.rotary_kv_write_ref
        store(q, k, v, positions, self.rotary_emb.cos_sin_cache, key_cache, value_cache,
              ctx.slot_mapping)
        if ctx.is_decode_only:
            if not is_cuda:  # the reference gives what the cascade does, keys read per request
                return decode_attention.decode_attention_ref(
                    q, key_cache, value_cache, ctx.block_tables, ctx.seq_lens, self.scale,
                    ctx.max_seq_len)
            return decode_attention.decode_attention(
                q, key_cache, value_cache, ctx.block_tables, ctx.seq_lens, self.scale,
                ctx.max_seq_len, shared_prefix_len=ctx.shared_prefix_len,
                plan_cache=ctx.attn_plans)
        # plan_cache (CUDA): the tile map and argument checks once per step, not per layer
        prefill, extra = ((prefill_attention.prefill_attention, {"plan_cache": ctx.attn_plans})
                          if is_cuda else (prefill_attention.prefill_attention_ref, {}))
        return prefill(q, key_cache, value_cache, ctx.block_tables, ctx.query_start_loc,
                       ctx.seq_lens, self.scale, ctx.max_query_len, ctx.max_seq_len, **extra)
