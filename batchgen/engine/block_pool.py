"""BlockPool: the KV blocks, their ref counts, the free queue and the prefix-hash -> block map.

Block 0 is reserved as the null block: it is never handed out, so the runner can pad block
tables with 0 (and write padding tokens to slot -1) without touching any request's KV.
The pool therefore has `num_blocks - 1` usable blocks, ids 1 .. num_blocks - 1.

The free queue holds every block with ref_cnt == 0, oldest-freed at the head. Allocation
takes from the head, so among free blocks that still carry a prefix hash (still hittable)
the least recently freed one is evicted first (LRU). A block keeps its hash while free until
it is handed out again.
"""
from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from hashlib import blake2b

NULL_BLOCK_ID = 0

# Chained block hash: 16-byte blake2b of (parent hash, the block's token ids as int64).
# Python's tuple hash would be cheaper but is 64-bit and not collision-resistant (crafted
# prompts could collide and silently read another prompt's KV); a collision here would be
# a wrong answer, not a slowdown, so we pay ~1 us per 16-token block for a real digest.
# Both parts are fixed-width (16 bytes, block_size * 8 bytes), so the encoding is unambiguous.
BlockHash = bytes
ROOT_HASH: BlockHash = bytes(16)


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Hash of one full block given the hash of the block before it (None for the first)."""
    h = blake2b(parent_hash or ROOT_HASH, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def hash_full_blocks(parent_hash: BlockHash | None, token_ids: Sequence[int],
                     block_size: int) -> list[BlockHash]:
    """Chained hashes of the full blocks of `token_ids` (a trailing partial block is skipped)."""
    num_full = len(token_ids) // block_size
    data = array("q", token_ids[:num_full * block_size]).tobytes()
    step = block_size * 8  # bytes per block
    hashes: list[BlockHash] = []
    parent = parent_hash or ROOT_HASH
    for i in range(num_full):
        h = blake2b(parent, digest_size=16)
        h.update(data[i * step:(i + 1) * step])
        parent = h.digest()
        hashes.append(parent)
    return hashes


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    # Set once the block is full and registered in the prefix cache; cleared on eviction.
    block_hash: BlockHash | None = None

    def __repr__(self) -> str:
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 2:
            raise ValueError(f"num_blocks must be an integer >= 2 (block 0 is reserved), "
                             f"got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.blocks[NULL_BLOCK_ID].ref_cnt = 1  # pinned forever
        # block_id -> block, head = next to allocate; O(1) removal from the middle (touch).
        self._free_queue: OrderedDict[int, KVBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks[1:])
        self._cached: dict[BlockHash, KVBlock] = {}

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref_cnt == 0, cached or not (a free cached block is evictable)."""
        return len(self._free_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by requests (0.0 .. 1.0)."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVBlock]:
        """Take `num_blocks` from the head of the free queue (ref_cnt 1), evicting their hashes.
        The caller checks can_allocate first."""
        assert num_blocks <= self.num_free_blocks, (num_blocks, self.num_free_blocks)
        pop = self._free_queue.popitem
        out = []
        for _ in range(num_blocks):
            _, block = pop(last=False)
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on prefix-hit blocks (a free one leaves the free queue)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free_queue[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference each; a block reaching 0 goes to the free queue's tail, in the
        order given (so pass a request's blocks tail-first to have its tail evicted first)."""
        for block in blocks:
            assert block.ref_cnt > 0 and block.block_id != NULL_BLOCK_ID, block
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free_queue[block.block_id] = block

    def cache_full_blocks(self, blocks: Sequence[KVBlock], block_hashes: Sequence[BlockHash],
                          num_cached_blocks: int, num_full_blocks: int) -> None:
        """Register blocks[num_cached_blocks:num_full_blocks] (now full and computed) under
        block_hashes[i]. A hash already mapped to another block (the same prefix computed
        twice concurrently) keeps the first; the duplicate stays uncached and is reused later."""
        if not self.enable_prefix_caching:
            return
        cached = self._cached
        for i in range(num_cached_blocks, num_full_blocks):
            block = blocks[i]
            if block.block_hash is not None:
                continue
            block_hash = block_hashes[i]
            if block_hash in cached:
                continue
            block.block_hash = block_hash
            cached[block_hash] = block

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self._cached.get(block_hash)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any block is in use."""
        if self.num_free_blocks != self.num_usable_blocks:
            return False
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        return True

    def _evict(self, block: KVBlock) -> None:
        if self._cached.get(block.block_hash) is block:
            del self._cached[block.block_hash]
        block.block_hash = None
