"""ForwardContext: the per-step state every attention layer reads (built once per step by the
model runner; the model passes it down; no globals)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

# Fewer fresh-prompt tokens than this in a step: the paged kernel does them with the rest.
FRESH_MIN_TOKENS = 512


@dataclass
class FreshPrompts:
    """The step's last requests, from `req_start` on, have no cached prefix (they start at
    position 0): their attention needs only this step's own K/V, in token order, which a
    varlen FlashAttention call computes faster than the paged kernel; the requests before
    them (decodes, later chunks, prefix-cache hits) go through the paged kernel. Host ints."""
    req_start: int
    token_start: int
    max_len: int  # longest fresh prompt (chunk) in the step
    head_max_query_len: int  # over the requests before req_start (0 if none)
    head_max_seq_len: int


def plan_fresh_prompts(query_start_loc, seq_lens,
                       min_tokens: int = FRESH_MIN_TOKENS) -> FreshPrompts | None:
    """The longest run of fresh requests that ends the batch, if it has min_tokens tokens.
    query_start_loc [B + 1], seq_lens [B]: host arrays or lists."""
    cu = np.asarray(query_start_loc, dtype=np.int64)
    seq = np.asarray(seq_lens, dtype=np.int64)
    q_lens = cu[1:] - cu[:-1]
    cached = np.nonzero(seq != q_lens)[0]  # requests with keys from before this step
    start = int(cached[-1]) + 1 if cached.size else 0
    if start == len(q_lens) or int(cu[-1] - cu[start]) < min_tokens:
        return None
    return FreshPrompts(req_start=start, token_start=int(cu[start]),
                        max_len=int(q_lens[start:].max()),
                        head_max_query_len=int(q_lens[:start].max(initial=0)),
                        head_max_seq_len=int(seq[:start].max(initial=0)))


@dataclass
class ForwardContext:
    # The step's tokens are a flat, varlen batch of B requests, request b owning tokens
    # query_start_loc[b]:query_start_loc[b+1] of every [num_tokens, ...] tensor.
    query_start_loc: torch.Tensor  # [B + 1] int32, on device
    # Context length of each request after this step (cached prefix + this step's tokens).
    seq_lens: torch.Tensor  # [B] int32, on device
    # Physical KV block ids of each request, padded with 0 past its last block.
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32, on device
    # Where token t's K/V go: block_id * block_size + offset; -1 = do not write (padding).
    slot_mapping: torch.Tensor  # [num_tokens] int64, on device
    # Per layer (key_cache, value_cache), each [num_blocks, block_size, num_kv_heads, head_dim].
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    max_query_len: int  # host ints: grid sizes and fast paths, no device sync
    max_seq_len: int
    # True when every request has exactly one query token (a pure decode step).
    is_decode_only: bool = False
    # Per-step plans the attention kernels share across layers (tile maps, checked args).
    attn_plans: dict = field(default_factory=dict)
    # Set (CUDA, fp16/bf16) when the step ends with enough fresh prompts: see FreshPrompts.
    fresh: FreshPrompts | None = None

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def block_size(self) -> int:
        return self.kv_caches[0][0].shape[1]
