"""KVCacheManager: block tables, prefix hits (chained, capped), caching, freeing, stats."""
from __future__ import annotations

from batchgen.engine.kv_cache_manager import KVCacheManager
from batchgen.engine.request import Request
from batchgen.sampling_params import SamplingParams


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), SamplingParams())


def admit(kv: KVCacheManager, req: Request, num_new: int | None = None):
    """What the scheduler does at admission: look up hits, allocate, set computed tokens."""
    hits, num_hit = kv.get_computed_blocks(req)
    n = req.num_tokens - num_hit if num_new is None else num_new
    new = kv.allocate_slots(req, n, hits)
    if new is not None:
        req.num_computed_tokens = num_hit
    return new, num_hit


def compute(kv: KVCacheManager, req: Request, n: int) -> None:
    req.num_computed_tokens += n
    kv.cache_blocks(req, req.num_computed_tokens)


def test_allocation_ids_and_growth():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    assert kv.num_total_blocks == 9
    a = make_request("a", range(10))  # 3 blocks
    new, num_hit = admit(kv, a)
    assert num_hit == 0 and [b.block_id for b in new] == [1, 2, 3]
    assert kv.get_block_ids(a) == [1, 2, 3]
    compute(kv, a, 10)
    # Decode tokens 10 and 11 fit the third block; token 12 needs a fourth.
    a.append_output_token(5)
    assert kv.allocate_slots(a, 1) == []
    compute(kv, a, 1)
    a.append_output_token(6)
    assert kv.allocate_slots(a, 1) == []
    compute(kv, a, 1)
    a.append_output_token(7)
    assert [b.block_id for b in kv.allocate_slots(a, 1)] == [4]
    assert kv.get_block_ids(a) == [1, 2, 3, 4]
    assert kv.num_used_blocks == 4


def test_allocation_that_does_not_fit_returns_none_and_changes_nothing():
    kv = KVCacheManager(num_blocks=5, block_size=4)  # 4 usable
    a = make_request("a", range(12))
    admit(kv, a)
    b = make_request("b", range(100, 108))
    assert kv.allocate_slots(b, 8) is None
    assert kv.get_block_ids(b) == [] and kv.num_used_blocks == 3
    assert kv.num_cached_tokens_queried == 12  # b's failed admission is not counted
    assert [x.block_id for x in kv.allocate_slots(b, 4)] == [4]


def test_shared_prefix_ref_counts_and_hit():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    prefix = list(range(8))
    a = make_request("a", prefix + [50, 51])
    admit(kv, a)
    compute(kv, a, 10)
    b = make_request("b", prefix + [60, 61, 62])
    new, num_hit = admit(kv, b)
    assert num_hit == 8 and b.num_computed_tokens == 8
    assert [x.block_id for x in new] == [4]
    assert kv.get_block_ids(b) == [1, 2, 4]
    blocks = kv.pool.blocks
    assert [blocks[i].ref_cnt for i in (1, 2, 3, 4)] == [2, 2, 1, 1]
    kv.free(a)
    assert [blocks[i].ref_cnt for i in (1, 2, 3, 4)] == [1, 1, 0, 1]
    assert kv.num_used_blocks == 3
    assert kv.num_cached_tokens_queried == 10 + 11
    assert kv.num_cached_tokens_hit == 8
    assert kv.prefix_cache_hit_rate == 8 / 21


def test_hit_after_the_first_request_finished_and_tail_evicted_first():
    kv = KVCacheManager(num_blocks=8, block_size=4)  # 7 usable
    a = make_request("a", range(12))  # exactly 3 full blocks
    admit(kv, a)
    compute(kv, a, 12)
    kv.free(a)
    assert kv.num_used_blocks == 0 and kv.pool.num_cached_blocks == 3
    # Free queue now: 4 5 6 7 | 3 2 1 (a's tail first).
    c = make_request("c", range(200, 220))  # 5 blocks: takes 4..7 then evicts block 3
    new, _ = admit(kv, c)
    assert [x.block_id for x in new] == [4, 5, 6, 7, 3]
    kv.free(c)
    # Same prompt as a again: blocks 1 and 2 still cached, block 3 (a's tail) was evicted.
    a2 = make_request("a2", list(range(12)) + [99])  # the cap would allow all 3 blocks
    new, num_hit = admit(kv, a2)
    assert num_hit == 8
    assert kv.get_block_ids(a2) == [1, 2, 3, 7]  # queue after c freed: 3 7 6 5 4


def test_at_least_one_token_is_left_to_compute():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = make_request("a", range(8))
    admit(kv, a)
    compute(kv, a, 8)
    # An identical 8-token prompt hits only the first block (the last token must run).
    b = make_request("b", range(8))
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 4 and [x.block_id for x in hits] == [1]
    new = kv.allocate_slots(b, 4, hits)
    assert [x.block_id for x in new] == [3]
    # One more token: both full blocks hit.
    c = make_request("c", list(range(8)) + [9])
    _, num_hit = kv.get_computed_blocks(c)
    assert num_hit == 8


def test_same_block_after_a_different_prefix_is_not_a_hit():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 0])
    admit(kv, a)
    compute(kv, a, 9)
    b = make_request("b", [9, 9, 9, 9, 5, 6, 7, 8, 0])
    assert kv.get_computed_blocks(b) == ([], 0)


def test_partial_blocks_are_cached_only_once_full_and_computed():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = make_request("a", range(10))
    admit(kv, a, num_new=6)  # chunked: 6 of 10 computed this step
    compute(kv, a, 6)
    assert kv.pool.num_cached_blocks == 1
    kv.allocate_slots(a, 4)
    compute(kv, a, 4)
    assert kv.pool.num_cached_blocks == 2
    # Output tokens fill the third block; it is cached (hash over prompt + output).
    a.append_output_token(10)
    kv.allocate_slots(a, 1)
    compute(kv, a, 1)
    a.append_output_token(11)
    kv.allocate_slots(a, 1)
    compute(kv, a, 1)
    assert kv.pool.num_cached_blocks == 3
    b = make_request("b", list(range(12)) + [77])
    _, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 12


def test_prefix_caching_disabled():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    a = make_request("a", range(9))
    admit(kv, a)
    compute(kv, a, 9)
    kv.free(a)
    b = make_request("b", range(9))
    assert kv.get_computed_blocks(b) == ([], 0)
    assert kv.prefix_cache_hit_rate == 0.0


def test_reset_prefix_cache_and_double_free():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = make_request("a", range(9))
    admit(kv, a)
    compute(kv, a, 9)
    assert kv.reset_prefix_cache() is False
    kv.free(a)
    kv.free(a)  # no-op
    assert kv.num_used_blocks == 0
    assert kv.reset_prefix_cache() is True
    assert kv.get_computed_blocks(make_request("b", range(9))) == ([], 0)


def test_fast_slots_only_when_no_block_is_needed_and_none_becomes_full():
    for caching in (True, False):
        kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=caching)
        a = make_request("a", range(6))  # 2 blocks, the second half full
        assert kv.fast_slots("a", 6, 6) is None  # holds no blocks yet
        admit(kv, a)
        compute(kv, a, 6)
        assert kv.fast_slots("a", 7, 7) is kv.get_block_ids(a)  # fits, nothing new full
        # Token 8 fills block 2: with caching it must be registered (general path).
        assert (kv.fast_slots("a", 8, 8) is None) == caching
        assert kv.fast_slots("a", 8, 7) is kv.get_block_ids(a)  # last token not known yet
        assert kv.fast_slots("a", 9, 8 if not caching else 7) is None  # needs a third block
        assert kv.get_block_ids(a) == [1, 2] and kv.num_used_blocks == 2  # nothing changed
        kv.free(a)
        assert kv.fast_slots("a", 6, 6) is None
