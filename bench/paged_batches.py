"""Paged attention inputs on the GPU, as the kernel sweeps, the probes and the GPU tests build
them: random caches behind block tables (shuffled ids, or laid out as the engine's pool hands
them out), the decode kernel's arguments, a mixed step as the engine attends it."""
from __future__ import annotations

import torch

BLOCK_SIZE = 16


def paged_batch(query_lens, prefix_lens, num_heads, num_kv_heads, head_dim, block_size=16,
                 dtype=torch.bfloat16, seed=0, grown_from=None):
    """Random caches, each request's blocks at random ids (holes), tables padded with 0; the
    keyword arguments of both attention kernels (GPU; also tests/test_kernels_gpu.py's).
    grown_from=k: the blocks as a fresh pool hands them out to a batch decoding in lock-step
    (the engine's `decode` workload): each request's first k blocks in a row, request after
    request (its prompt), then one block per request in turn (one per 16 decode steps)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    seq_lens = torch.tensor([q + p for q, p in zip(query_lens, prefix_lens)], device="cuda")
    blocks_per_req = (seq_lens + block_size - 1) // block_size
    num_blocks = int(blocks_per_req.sum()) + 5
    max_blocks = int(blocks_per_req.max()) + 1
    columns = torch.arange(max_blocks, device="cuda")
    is_used = columns[None, :] < blocks_per_req[:, None]
    if grown_from is None:
        block_ids = torch.randperm(num_blocks, device="cuda", generator=gen)
        first = torch.cumsum(blocks_per_req, 0) - blocks_per_req
        index = (first[:, None] + columns[None, :]).clamp(max=num_blocks - 1)
        block_tables = torch.where(is_used, block_ids[index], 0).to(torch.int32)
    else:
        if len(set(seq_lens.tolist())) > 1:  # (the ids below are dense for equal lengths only)
            raise ValueError("paged_batch: grown_from lays out requests of one length")
        num_reqs = len(query_lens)
        reqs = torch.arange(num_reqs, device="cuda")[:, None]
        prompt = reqs * grown_from + columns[None, :]
        grown = num_reqs * grown_from + (columns[None, :] - grown_from) * num_reqs + reqs
        block_tables = torch.where(is_used, torch.where(columns[None, :] < grown_from, prompt,
                                                        grown), 0).to(torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    query_start_loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()],
                                   dtype=torch.int32, device="cuda")
    return dict(
        q=torch.randn(sum(query_lens), num_heads, head_dim, device="cuda", generator=gen,
                      dtype=dtype),
        key_cache=torch.randn(shape, device="cuda", generator=gen, dtype=dtype),
        value_cache=torch.randn(shape, device="cuda", generator=gen, dtype=dtype),
        block_tables=block_tables, query_start_loc=query_start_loc,
        seq_lens=seq_lens.to(torch.int32), scale=head_dim ** -0.5,
        max_query_len=max(query_lens), max_seq_len=int(seq_lens.max()))


def decode_args(batch: dict) -> tuple:
    """A batch of one-query requests as decode_attention's (and its reference's) positional
    arguments."""
    return (batch["q"], batch["key_cache"], batch["value_cache"], batch["block_tables"],
            batch["seq_lens"], batch["scale"], batch["max_seq_len"])


def mixed_step(batch: dict, num_decodes: int, shared_prefix_len: torch.Tensor | None = None):
    """-> (Attention layer, ForwardContext): the batch as a step the engine attends with
    `Attention.attend`, its leading num_decodes requests by the decode kernel (cascade over
    shared_prefix_len keys, a [1] int32 tensor, or None) and the rest by the prefill kernel."""
    from batchgen.layers.attention import Attention
    from batchgen.layers.context import ForwardContext

    q, key_cache = batch["q"], batch["key_cache"]
    ctx = ForwardContext(
        query_start_loc=batch["query_start_loc"], seq_lens=batch["seq_lens"],
        block_tables=batch["block_tables"], slot_mapping=None,
        kv_caches=[(key_cache, batch["value_cache"])], max_query_len=batch["max_query_len"],
        max_seq_len=batch["max_seq_len"], num_decodes=num_decodes,
        shared_prefix_len=shared_prefix_len)
    layer = Attention(q.shape[1], key_cache.shape[2], q.shape[2], batch["scale"], layer_idx=0,
                      rotary_emb=None)
    return layer, ctx


def share_prefix(batch: dict, num_keys: int, block_size: int = BLOCK_SIZE) -> None:
    """Every request's first num_keys keys (whole blocks) become request 0's: its table's
    first blocks in every row, as a prompt prefix from the prefix cache."""
    num_blocks = num_keys // block_size
    batch["block_tables"][:, :num_blocks] = batch["block_tables"][0, :num_blocks].clone()
