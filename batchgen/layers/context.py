"""ForwardContext: the per-step state every attention layer reads (built once per step by the
model runner; the model passes it down; no globals)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
    # Mixed steps (CUDA): the leading requests, one query each, that the decode kernel
    # attends; the prefill kernel takes the rest. 0: the prefill kernel takes every request.
    num_decodes: int = 0
    # Decode steps (and a mixed step's num_decodes): [1] int32 on device, keys 0..it held in
    # the same blocks by every such request (read once for them all: cascade attention);
    # None = no cascade.
    shared_prefix_len: torch.Tensor | None = None
    # Mixed steps (CUDA): (first request, requests, first token, query length) of a run of
    # fresh prompts of one length that batchgen.layers.dense_attention attends, the paged
    # kernels the rest; None: the paged kernels attend every request.
    dense_layout: tuple[int, int, int, int] | None = None
    # True: the MLPs run their gate/up projection and SwiGLU as one GEMM
    # (batchgen.kernels.gate_up_silu), which large CUDA steps gain from.
    fused_mlp: bool = False
    # Per-step plans the attention kernels share across layers (tile maps, checked args).
    attn_plans: dict = field(default_factory=dict)

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def block_size(self) -> int:
        return self.kv_caches[0][0].shape[1]
