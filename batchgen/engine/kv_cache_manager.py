"""KVCacheManager: per-request block tables over the BlockPool, prefix hits, caching, stats.

The scheduler talks to this class only; it never sees KVBlock objects except the opaque
list that get_computed_blocks returns and allocate_slots takes back.

Slot of the token at position p of a request:
    block_ids[p // block_size] * block_size + p % block_size
"""
from __future__ import annotations

from collections.abc import Sequence

from batchgen.engine.block_pool import BlockHash, BlockPool, KVBlock, hash_full_blocks
from batchgen.engine.request import Request


class _ReqBlocks:
    """One request's KV state: its blocks, their ids (the list the runner reads, by
    reference, so no per-step copy of block tables) and how many of its blocks are
    registered in the prefix cache. One object per request: one dict lookup per step."""
    __slots__ = ("blocks", "block_ids", "num_cached")

    def __init__(self, num_cached: int) -> None:
        self.blocks: list[KVBlock] = []
        self.block_ids: list[int] = []
        self.num_cached = num_cached


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        # request_id -> its blocks, block ids and number of prefix-cached blocks.
        self._reqs: dict[str, _ReqBlocks] = {}
        # request_id -> chained hashes of its full blocks computed so far (never recomputed
        # per step; filled at admission lookup, before the request holds any block).
        self._req_hashes: dict[str, list[BlockHash]] = {}
        # Prefix-cache stats, counted once per admission (allocate_slots of a new request).
        self.num_cached_tokens_queried = 0
        self.num_cached_tokens_hit = 0

    # ---- stats ---------------------------------------------------------------------------
    @property
    def num_total_blocks(self) -> int:
        """Usable blocks (block 0 is the reserved null block)."""
        return self.pool.num_usable_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_usable_blocks - self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prefix-hit tokens / tokens looked up at admission (0.0 before any lookup)."""
        if self.num_cached_tokens_queried == 0:
            return 0.0
        return self.num_cached_tokens_hit / self.num_cached_tokens_queried

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- per-request ---------------------------------------------------------------------
    def get_block_ids(self, request: Request) -> list[int]:
        """The request's block table (a live reference: read it, do not mutate it)."""
        state = self._reqs.get(request.request_id)
        return state.block_ids if state is not None else []

    def fast_slots(self, request_id: str, num_tokens: int,
                   num_cache_tokens: int) -> list[int] | None:
        """Fast path of allocate_slots + cache_blocks + get_block_ids for a running request
        (the common decode step): when it already holds blocks for its first `num_tokens`
        tokens and no block becomes full within its first `num_cache_tokens`
        (<= num_tokens), nothing is to be done: return its block table. Otherwise None
        (nothing changed): take the general path."""
        state = self._reqs.get(request_id)
        if state is None:
            return None
        bs = self.block_size
        if num_tokens > len(state.blocks) * bs:
            return None
        if self.enable_prefix_caching and num_cache_tokens // bs > state.num_cached:
            return None
        return state.block_ids

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest chain of cached full blocks at the start of the request's tokens, capped
        so at least one token is left to compute (the last one must run to give logits).
        Takes no reference: pass the blocks to allocate_slots in the same scheduling pass."""
        if not self.enable_prefix_caching:
            return [], 0
        hashes = self._hashes_upto(request, request.num_tokens // self.block_size)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        get = self.pool.get_cached_block
        blocks: list[KVBlock] = []
        for block_hash in hashes[:max_hit_blocks]:
            block = get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: Sequence[KVBlock] = ()) -> list[KVBlock] | None:
        """Make room for `num_new_tokens` more tokens after request.num_computed_tokens (plus
        the prefix-hit blocks, for a request being admitted). Returns the newly allocated
        blocks, or None when they do not fit (nothing changes then)."""
        rid = request.request_id
        state = self._reqs.get(rid)
        num_held = len(state.blocks) if state is not None else 0
        num_hit = len(new_computed_blocks)
        num_tokens = request.num_computed_tokens + num_hit * self.block_size + num_new_tokens
        num_new_blocks = -(-num_tokens // self.block_size) - num_held - num_hit
        if num_new_blocks <= 0 and state is not None and not num_hit:
            return []  # the common decode step: the token fits the last block
        # Hit blocks with ref_cnt 0 sit in the free queue: touching them takes them out.
        num_free_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if max(num_new_blocks, 0) + num_free_hits > self.pool.num_free_blocks:
            return None
        if state is None:
            state = self._reqs[rid] = _ReqBlocks(num_hit)
            if self.enable_prefix_caching:
                self.num_cached_tokens_queried += request.num_tokens
                self.num_cached_tokens_hit += num_hit * self.block_size
        blocks = state.blocks
        block_ids = state.block_ids
        if num_hit:
            self.pool.touch(new_computed_blocks)
            blocks.extend(new_computed_blocks)
            block_ids.extend(b.block_id for b in new_computed_blocks)
        if num_new_blocks <= 0:
            return []
        new_blocks = self.pool.get_new_blocks(num_new_blocks)
        blocks.extend(new_blocks)
        block_ids.extend(b.block_id for b in new_blocks)
        return new_blocks

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register in the prefix cache the request's blocks that are full within its first
        `num_computed_tokens` tokens. The scheduler calls it when it schedules a chunk, with
        the count after that chunk: the K/V are written in the step, before any read."""
        if not self.enable_prefix_caching:
            return
        state = self._reqs.get(request.request_id)
        if state is None:
            return
        blocks = state.blocks
        num_full = min(num_computed_tokens // self.block_size, len(blocks))
        num_cached = state.num_cached
        if num_full <= num_cached:
            return  # no block became full: the common decode step
        hashes = self._hashes_upto(request, num_full)
        self.pool.cache_full_blocks(blocks, hashes, num_cached, num_full)
        state.num_cached = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first (its tail is evicted before its prefix,
        which other requests are likelier to share). Safe to call twice."""
        rid = request.request_id
        state = self._reqs.pop(rid, None)
        self._req_hashes.pop(rid, None)
        if state is not None and state.blocks:
            self.pool.free_blocks(reversed(state.blocks))

    def reset_prefix_cache(self) -> bool:
        """Forget all cached prefixes; only when no block is in use (returns False otherwise)."""
        return self.pool.reset_prefix_cache()

    def _hashes_upto(self, request: Request, num_full_blocks: int) -> list[BlockHash]:
        """The request's chained block hashes, extended to at least `num_full_blocks`."""
        hashes = self._req_hashes.setdefault(request.request_id, [])
        num_have = len(hashes)
        if num_have < num_full_blocks:
            bs = self.block_size
            tokens = request.token_ids_slice(num_have * bs, num_full_blocks * bs)
            parent = hashes[-1] if hashes else None
            hashes.extend(hash_full_blocks(parent, tokens, bs))
        return hashes
