"""Paged attention of one layer: rotate q and k, store this step's K/V in the cache (one fused
kernel on CUDA), then attend.

Query i of request b sits at position seq_lens[b] - q_len_b + i and sees keys 0..that
position of its request, read back from the paged cache (prefix + this step); a step's run of
fresh prompts of one length (ForwardContext.dense_layout) is attended from its own q, k and
v instead (batchgen.layers.dense_attention)."""
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
                v: torch.Tensor, ctx: ForwardContext) -> list[torch.Tensor]:
        """positions: [T]; q: [T, H, D] (rotated in place); k, v: [T, KVH, D] (k rotated in
        place when a run is attended densely) -> the output's rows [n, H * D] in consecutive
        pieces covering the T tokens in order: one, or up to three around a dense run (each
        piece is projected on its own: no copy gathers them)."""
        from batchgen.kernels import rotary_kv_write
        is_cuda = q.is_cuda
        key_cache, value_cache = ctx.kv_caches[self.layer_idx]
        store = rotary_kv_write.rotary_kv_write if is_cuda else rotary_kv_write.rotary_kv_write_ref
        store(q, k, v, positions, self.rotary_emb.cos_sin_cache, key_cache, value_cache,
              ctx.slot_mapping, rotate_k=ctx.dense_layout is not None)
        attend = self.attend if is_cuda else self.attend_ref
        num_tokens = q.shape[0]
        out = attend(q, key_cache, value_cache, ctx).reshape(num_tokens, -1)
        if ctx.dense_layout is None:
            return [out]
        from batchgen.layers.dense_attention import dense_causal_attention
        _, num_reqs, first_token, query_len = ctx.dense_layout
        end = first_token + num_reqs * query_len
        dense = dense_causal_attention(q, k, v, first_token, num_reqs, query_len, self.scale)
        return [piece for piece in (out[:first_token], dense, out[end:]) if piece.shape[0]]

    def attend(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
               ctx: ForwardContext) -> torch.Tensor:
        """The Triton kernels (CUDA; the CPU under TRITON_INTERPRET, in tests). A dense run's
        rows are left unwritten."""
        from batchgen.kernels import decode_attention, prefill_attention
        if ctx.is_decode_only:
            return decode_attention.decode_attention(
                q, key_cache, value_cache, ctx.block_tables, ctx.seq_lens, self.scale,
                ctx.max_seq_len, shared_prefix_len=ctx.shared_prefix_len,
                plan_cache=ctx.attn_plans)
        skip = None
        if ctx.dense_layout is not None:
            first_req, num_reqs, _, query_len = ctx.dense_layout
            skip = (first_req, num_reqs, num_reqs * query_len)
        # plan_cache: the tile map and argument checks once per step, not per layer
        out = prefill_attention.prefill_attention(
            q, key_cache, value_cache, ctx.block_tables, ctx.query_start_loc, ctx.seq_lens,
            self.scale, ctx.max_query_len, ctx.max_seq_len, plan_cache=ctx.attn_plans,
            first_req=ctx.num_decodes, skip=skip)
        nd = ctx.num_decodes
        if nd:
            # The prefill kernel would pad each decode's GROUP rows to a 64-row tile; the
            # decode kernel's rows are the GROUP heads alone (one split: there are enough
            # requests to fill the GPU, batchgen.engine.model_runner).
            decode_attention.decode_attention(
                q[:nd], key_cache, value_cache, ctx.block_tables[:nd], ctx.seq_lens[:nd],
                self.scale, ctx.max_seq_len, out=out[:nd], num_splits=1,
                shared_prefix_len=ctx.shared_prefix_len, plan_cache=ctx.attn_plans)
        return out

    def attend_ref(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                   ctx: ForwardContext) -> torch.Tensor:
        """Plain torch (CPU). A decode step's reference gives what the cascade does, its keys
        read per request."""
        from batchgen.kernels import decode_attention, prefill_attention
        if ctx.is_decode_only:
            return decode_attention.decode_attention_ref(
                q, key_cache, value_cache, ctx.block_tables, ctx.seq_lens, self.scale,
                ctx.max_seq_len)
        return prefill_attention.prefill_attention_ref(
            q, key_cache, value_cache, ctx.block_tables, ctx.query_start_loc, ctx.seq_lens,
            self.scale, ctx.max_query_len, ctx.max_seq_len)
