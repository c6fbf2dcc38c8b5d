"""Attention of a mixed step (decodes beside prefill chunks) over the paged KV cache: the
step's leading single-query requests by the decode kernel, the rest by the prefill kernel,
both writing one output.

In the prefill kernel a tile is BLOCK_M (token, head) rows of one request, so a decode's 4
rows (one token, GQA 4:1) fill a 64-row tile and 60 rows of every QK^T and PV product are
padding; the decode kernel pads them to 16. A reviews step of ~900 decodes and a dozen
416-token chunks is mostly those decodes."""
from __future__ import annotations

import torch

from .decode_attention import decode_attention
from .prefill_attention import prefill_attention, prefill_attention_ref


def mixed_attention_ref(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                        seq_lens: torch.Tensor, scale: float, max_query_len: int,
                        max_seq_len: int, num_leading_decodes: int) -> torch.Tensor:
    # The same attention as prefill_attention_ref's, however the requests are split.
    return prefill_attention_ref(q, key_cache, value_cache, block_tables, query_start_loc,
                                 seq_lens, scale, max_query_len, max_seq_len)


def mixed_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, scale: float, max_query_len: int, max_seq_len: int,
                    num_leading_decodes: int, plan_cache: dict | None = None) -> torch.Tensor:
    """prefill_attention's arguments, plus num_leading_decodes: a host int D such that
    requests 0..D-1 each have exactly one query (tokens 0..D-1). -> [T, H, D]."""
    num_decodes = num_leading_decodes
    if num_decodes < 0 or num_decodes > seq_lens.shape[0]:
        raise ValueError(f"mixed_attention: num_leading_decodes must be in [0, "
                         f"{seq_lens.shape[0]}], got {num_decodes}")
    out = torch.empty_like(q)
    if num_decodes:
        # One split: the split count is a compile-time constant of the kernel, and a count
        # that followed each step's batch would compile new variants mid-run (the prefill
        # kernel did not split a decode's context either).
        decode_attention(q[:num_decodes], key_cache, value_cache, block_tables[:num_decodes],
                         seq_lens[:num_decodes], scale, max_seq_len, out=out[:num_decodes],
                         num_splits=1, plan_cache=plan_cache)
    # The rest keep their absolute token offsets in query_start_loc: the kernel reads q and
    # writes out at those rows, leaving the decodes' rows as written above.
    return prefill_attention(
        q, key_cache, value_cache, block_tables[num_decodes:], query_start_loc[num_decodes:],
        seq_lens[num_decodes:], scale, max_query_len, max_seq_len, plan_cache=plan_cache,
        out=out)
