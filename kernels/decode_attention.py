"""Attention of one new query per request over its paged KV context (flash-decoding)."""
from __future__ import annotations

import torch

from .prefill_attention import gather_kv_ref, padded_attention_ref


def decode_attention_ref(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                         max_seq_len: int) -> torch.Tensor:
    # q: [B, H, D] (request b's query sits at position seq_lens[b] - 1) -> [B, H, D]
    keys = gather_kv_ref(key_cache, block_tables, max_seq_len)
    values = gather_kv_ref(value_cache, block_tables, max_seq_len)
    positions = (seq_lens.long() - 1)[:, None]  # [B, 1]
    return padded_attention_ref(q[:, None], positions, keys, values, scale)[:, 0]


def decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     max_seq_len: int, out: torch.Tensor | None = None) -> torch.Tensor:
    raise NotImplementedError("decode_attention: the Triton kernel is not written yet")
