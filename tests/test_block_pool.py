"""BlockPool: allocation order, ref counts, LRU eviction of free cached blocks, hashing."""
from __future__ import annotations

import pytest

from batchgen.engine.block_pool import (
    BlockPool, hash_block_tokens, hash_full_blocks,
)


def ids(blocks):
    return [b.block_id for b in blocks]


def test_block_zero_is_reserved_and_allocation_goes_in_id_order():
    pool = BlockPool(8)
    assert pool.num_usable_blocks == 7 and pool.num_free_blocks == 7
    assert ids(pool.get_new_blocks(3)) == [1, 2, 3]
    assert ids(pool.get_new_blocks(2)) == [4, 5]
    assert pool.num_free_blocks == 2
    assert pool.usage == pytest.approx(5 / 7)
    assert pool.can_allocate(2) and not pool.can_allocate(3)


def test_too_small_pool_is_refused():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(1)


def test_freed_blocks_go_to_the_tail_in_the_order_given():
    pool = BlockPool(6)  # usable 1..5
    a = pool.get_new_blocks(3)  # 1, 2, 3
    pool.free_blocks(reversed(a))  # tail gets 3, 2, 1
    assert ids(pool.get_new_blocks(5)) == [4, 5, 3, 2, 1]
    assert pool.num_free_blocks == 0


def test_ref_counts_with_shared_blocks():
    pool = BlockPool(6)
    blocks = pool.get_new_blocks(2)
    pool.touch(blocks)  # a second request shares them
    assert [b.ref_cnt for b in blocks] == [2, 2]
    pool.free_blocks(blocks)
    assert [b.ref_cnt for b in blocks] == [1, 1]
    assert pool.num_free_blocks == 3  # still held by one owner
    pool.free_blocks(blocks)
    assert [b.ref_cnt for b in blocks] == [0, 0] and pool.num_free_blocks == 5


def test_touch_takes_a_free_cached_block_out_of_the_free_queue():
    pool = BlockPool(6)
    (b,) = pool.get_new_blocks(1)  # block 1
    h = hash_block_tokens(None, [1, 2, 3, 4])
    pool.cache_full_blocks([b], [h], 0, 1)
    pool.free_blocks([b])
    assert pool.num_free_blocks == 5 and pool.get_cached_block(h) is b  # free but hittable
    pool.touch([b])
    assert b.ref_cnt == 1 and pool.num_free_blocks == 4
    # block 1 is no longer in the queue: allocating everything skips it
    assert ids(pool.get_new_blocks(4)) == [2, 3, 4, 5]


def test_lru_eviction_of_free_cached_blocks():
    pool = BlockPool(5)  # usable 1..4
    blocks = pool.get_new_blocks(4)
    hashes = hash_full_blocks(None, list(range(16)), 4)
    pool.cache_full_blocks(blocks, hashes, 0, 4)
    assert pool.num_cached_blocks == 4
    # Freed in the order 3, 1, 4, 2: that is the eviction order.
    pool.free_blocks([blocks[2], blocks[0], blocks[3], blocks[1]])
    (first,) = pool.get_new_blocks(1)
    assert first.block_id == 3 and first.block_hash is None
    assert pool.get_cached_block(hashes[2]) is None  # evicted
    assert pool.get_cached_block(hashes[0]) is blocks[0]  # still hittable
    assert ids(pool.get_new_blocks(2)) == [1, 4]
    assert pool.num_cached_blocks == 1 and pool.get_cached_block(hashes[1]) is blocks[1]


def test_duplicate_hash_keeps_the_first_block():
    pool = BlockPool(6)
    a, b = pool.get_new_blocks(2)
    h = hash_block_tokens(None, [7, 7, 7, 7])
    pool.cache_full_blocks([a], [h], 0, 1)
    pool.cache_full_blocks([b], [h], 0, 1)
    assert pool.get_cached_block(h) is a and b.block_hash is None
    pool.free_blocks([a, b])
    # b is reused without touching a's cache entry
    assert ids(pool.get_new_blocks(4)) == [3, 4, 5, 1]
    assert pool.get_cached_block(h) is None  # a (block 1) was evicted by the 4th block


def test_prefix_caching_off_never_caches():
    pool = BlockPool(4, enable_prefix_caching=False)
    blocks = pool.get_new_blocks(1)
    h = hash_block_tokens(None, [1, 2])
    pool.cache_full_blocks(blocks, [h], 0, 1)
    assert pool.get_cached_block(h) is None and pool.num_cached_blocks == 0


def test_reset_prefix_cache_only_when_idle():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(1)
    h = hash_block_tokens(None, [1, 2])
    pool.cache_full_blocks(blocks, [h], 0, 1)
    assert pool.reset_prefix_cache() is False
    assert pool.get_cached_block(h) is blocks[0]
    pool.free_blocks(blocks)
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(h) is None and blocks[0].block_hash is None


def test_hashes_are_chained_and_match_one_by_one():
    tokens = list(range(12))
    chained = hash_full_blocks(None, tokens + [99], 4)  # the partial block is skipped
    assert len(chained) == 3
    h0 = hash_block_tokens(None, tokens[0:4])
    h1 = hash_block_tokens(h0, tokens[4:8])
    assert chained[:2] == [h0, h1]
    # Same block content after a different prefix is a different hash.
    other = hash_full_blocks(None, [50, 51, 52, 53] + tokens[4:8], 4)
    assert other[1] != h1
    assert hash_block_tokens(None, tokens[4:8]) != h1
    # Large token ids are encoded without loss.
    assert hash_block_tokens(None, [2**40]) != hash_block_tokens(None, [0])
