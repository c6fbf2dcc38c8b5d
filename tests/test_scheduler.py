"""Scheduler: token budget, decodes first, chunked prefill, max_num_seqs, preemption, stop
conditions, aborts, requests too large for the pool, prefix-hit accounting."""
from __future__ import annotations

import pytest

from batchgen.engine.request import Request, RequestStatus
from batchgen.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from batchgen.sampling_params import SamplingParams


def make_scheduler(**overrides) -> Scheduler:
    kw = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64, block_size=4,
              num_blocks=10, enable_prefix_caching=True)
    kw.update(overrides)
    return Scheduler(SchedulerConfig(**kw))


def make_request(rid: str, num_prompt: int, max_tokens: int = 16, first: int = 0,
                 eos=(2,), **params) -> Request:
    sp = SamplingParams(max_tokens=max_tokens, **params)
    return Request(rid, list(range(first, first + num_prompt)), sp, eos_token_ids=tuple(eos),
                   max_tokens=max_tokens)


def step(sched: Scheduler, tokens=None) -> tuple[SchedulerOutput, list[Request]]:
    """schedule + update, sampling tokens[request_id] (or 5) where a sample is due."""
    tokens = tokens or {}
    out = sched.schedule()
    sampled = [tokens.get(r.request_id, 5) if need else None
               for r, need in zip(out.requests, out.needs_sample)]
    return out, sched.update_from_output(out, sampled)


def rids(reqs):
    return [r.request_id for r in reqs]


def test_config_validates():
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0, max_num_batched_tokens=8, max_model_len=8)
    with pytest.raises(ValueError, match="num_blocks"):
        SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=8, max_model_len=8, num_blocks=1)
    with pytest.raises(ValueError, match="long_prefill"):
        SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=8, max_model_len=8,
                        long_prefill_token_threshold=-1)


def test_decodes_first_then_running_chunks_then_new_requests_under_the_budget():
    sched = make_scheduler(max_num_batched_tokens=8)
    sched.add_request(make_request("a", 6))
    sched.add_request(make_request("b", 6, first=100))
    out, _ = step(sched)
    assert rids(out.requests) == ["a", "b"]
    assert out.num_scheduled_tokens == [6, 2] and out.needs_sample == [True, False]
    assert out.num_computed_before == [0, 0] and out.total_num_scheduled_tokens == 8
    assert out.block_ids == [[1, 2], [3]]
    sched.add_request(make_request("c", 10, first=200))
    out, _ = step(sched)
    assert rids(out.requests) == ["a", "b", "c"]
    assert out.num_scheduled_tokens == [1, 4, 3]
    assert out.num_computed_before == [6, 2, 0]
    assert out.needs_sample == [True, True, False]
    assert out.total_num_scheduled_tokens == 8
    assert sched.get_request("a").output_token_ids == [5, 5]
    assert sched.get_request("b").output_token_ids == [5]


def test_chunked_prefill_of_a_long_prompt():
    sched = make_scheduler(max_num_batched_tokens=8)
    sched.add_request(make_request("a", 20))
    plan = []
    for _ in range(4):
        out, _ = step(sched)
        plan.append((out.num_computed_before[0], out.num_scheduled_tokens[0], out.needs_sample[0]))
    assert plan == [(0, 8, False), (8, 8, False), (16, 4, True), (20, 1, True)]
    a = sched.get_request("a")
    assert a.num_computed_tokens == 21 and a.output_token_ids == [5, 5]
    assert sched.kv_cache_manager.get_block_ids(a) == [1, 2, 3, 4, 5, 6]


def test_long_prefill_token_threshold_caps_each_chunk():
    sched = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=5)
    sched.add_request(make_request("a", 12))
    sched.add_request(make_request("b", 3, first=100))
    out, _ = step(sched)
    assert out.num_scheduled_tokens == [5, 3]
    out, _ = step(sched)
    assert out.num_scheduled_tokens == [5, 1]


def test_max_num_seqs_limits_admission():
    sched = make_scheduler(max_num_seqs=2)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", 3, first=10 * i))
    out, _ = step(sched)
    assert rids(out.requests) == ["r0", "r1"]
    assert sched.num_running == 2 and sched.num_waiting == 1


def test_preempt_newest_then_recompute_from_zero_keeping_outputs():
    sched = make_scheduler(num_blocks=5, enable_prefix_caching=False)  # blocks 1..4
    sched.add_request(make_request("a", 7, max_tokens=4))
    sched.add_request(make_request("b", 7, max_tokens=10, first=100))
    out, _ = step(sched, {"a": 100, "b": 200})
    assert out.block_ids == [[1, 2], [3, 4]]
    step(sched, {"a": 101, "b": 201})  # position 7 still fits both second blocks
    out, _ = step(sched, {"a": 102})
    a, b = sched.get_request("a"), sched.get_request("b")
    assert rids(out.preempted) == ["b"] and rids(out.requests) == ["a"]
    assert out.block_ids == [[1, 2, 4]]  # b's blocks freed tail first: 4 is reused
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and b.output_token_ids == [200, 201]
    assert list(sched.waiting) == [b]
    out, finished = step(sched, {"a": 103})  # b needs 3 blocks, 1 free: not admitted
    assert rids(out.requests) == ["a"] and finished == [a]
    assert a.status == RequestStatus.FINISHED_LENGTH and a.output_token_ids == [100, 101, 102, 103]
    out, _ = step(sched, {"b": 202})
    assert rids(out.requests) == ["b"]
    assert out.num_computed_before == [0] and out.num_scheduled_tokens == [9]
    assert out.needs_sample == [True] and out.block_ids == [[3, 4, 2]]
    assert b.status == RequestStatus.RUNNING and b.output_token_ids == [200, 201, 202]


def test_newest_request_preempts_itself_when_it_does_not_fit():
    sched = make_scheduler(num_blocks=5, enable_prefix_caching=False)
    sched.add_request(make_request("a", 7))
    sched.add_request(make_request("b", 8, first=100))
    step(sched)
    out, _ = step(sched)  # a decodes at 7 (fits); b at 8 needs a 5th block
    assert rids(out.requests) == ["a"] and rids(out.preempted) == ["b"]
    assert sched.num_running == 1 and sched.num_waiting == 1
    assert sched.kv_cache_manager.num_used_blocks == 2


def test_no_admission_in_a_step_that_preempted():
    sched = make_scheduler(num_blocks=5, enable_prefix_caching=False)
    sched.add_request(make_request("a", 8))
    sched.add_request(make_request("b", 8, first=100))
    step(sched)
    sched.add_request(make_request("c", 1, first=200))
    out, _ = step(sched)  # a needs block 3: b preempted; c must not jump in
    assert rids(out.requests) == ["a"] and rids(out.preempted) == ["b"]
    assert rids(sched.waiting) == ["b", "c"]


def test_request_alone_that_cannot_grow_finishes_with_length():
    sched = make_scheduler(num_blocks=3)  # 2 usable blocks = 8 tokens
    sched.add_request(make_request("a", 7, max_tokens=10))
    step(sched)
    step(sched)
    out, finished = step(sched)
    a = finished[0]
    assert out.requests == [] and out.finished == [a]
    assert a.status == RequestStatus.FINISHED_LENGTH and a.output_token_ids == [5, 5]
    assert not sched.has_unfinished_requests()
    assert sched.kv_cache_manager.num_used_blocks == 0


def test_request_too_large_for_the_pool_is_an_error_and_others_still_run():
    sched = make_scheduler(num_blocks=3)  # 8 tokens of KV
    sched.add_request(make_request("big", 9))
    sched.add_request(make_request("ok", 3, first=100))
    out, finished = step(sched)
    assert rids(finished) == ["big"] and rids(out.requests) == ["ok"]
    big = finished[0]
    assert big.status == RequestStatus.FINISHED_ERROR and "KV" in big.error
    assert sched.get_request("big") is None


@pytest.mark.parametrize("params, tokens, status, output, reason", [
    ({}, [5, 2, 5], RequestStatus.FINISHED_STOPPED, [5, 2], 2),
    ({"ignore_eos": True}, [2, 2, 2, 2], RequestStatus.FINISHED_LENGTH, [2, 2, 2, 2], None),
    ({"min_tokens": 2}, [2, 2, 5], RequestStatus.FINISHED_STOPPED, [2, 2], 2),
    ({"min_tokens": 3}, [2, 2, 2, 2], RequestStatus.FINISHED_STOPPED, [2, 2, 2], 2),
    ({"stop_token_ids": [7]}, [5, 7, 5], RequestStatus.FINISHED_STOPPED, [5, 7], 7),
    ({}, [5, 5, 5, 5, 5], RequestStatus.FINISHED_LENGTH, [5, 5, 5, 5], None),
])
def test_stop_conditions(params, tokens, status, output, reason):
    sched = make_scheduler()
    req = make_request("a", 3, max_tokens=4, **params)
    sched.add_request(req)
    finished = []
    for tok in tokens:
        _, finished = step(sched, {"a": tok})
        if finished:
            break
    assert finished == [req]
    assert req.status == status and req.output_token_ids == output and req.stop_reason == reason
    assert req.first_token_time is not None and req.finished_time is not None
    assert sched.num_running == 0 and sched.kv_cache_manager.num_used_blocks == 0


def test_max_model_len_finishes_with_length():
    sched = make_scheduler(max_model_len=8)
    req = make_request("a", 6, max_tokens=16)
    sched.add_request(req)
    step(sched)
    _, finished = step(sched)
    assert finished == [req] and req.status == RequestStatus.FINISHED_LENGTH
    assert req.num_tokens == 8


def test_finish_requests_frees_blocks_and_queues():
    sched = make_scheduler(max_num_seqs=1)
    sched.add_request(make_request("a", 5))
    sched.add_request(make_request("b", 5, first=100))
    step(sched)
    assert sched.kv_cache_manager.num_used_blocks == 2
    sched.finish_requests(["a", "b", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert sched.kv_cache_manager.num_used_blocks == 0
    assert sched.num_running == 0 and sched.num_waiting == 0
    assert not sched.has_unfinished_requests()
    assert sched.schedule().is_empty


def test_abort_between_schedule_and_update_is_skipped():
    sched = make_scheduler()
    sched.add_request(make_request("a", 5))
    sched.add_request(make_request("b", 5, first=100))
    out = sched.schedule()
    sched.finish_requests("a", RequestStatus.FINISHED_STOPPED)
    finished = sched.update_from_output(out, [9, 9])
    a, b = out.requests
    assert finished == [] and a.output_token_ids == [] and a.status == RequestStatus.FINISHED_STOPPED
    assert b.output_token_ids == [9] and b.num_computed_tokens == 5
    assert rids(sched.running) == ["b"] and sched.kv_cache_manager.num_used_blocks == 2


def test_prefix_hits_are_counted():
    sched = make_scheduler()
    sched.add_request(make_request("a", 10, max_tokens=1))
    step(sched)  # a computes 10 tokens, blocks [0:4] and [4:8] cached, finishes
    b = make_request("b", 9, max_tokens=1)
    sched.add_request(b)
    out = sched.schedule()
    assert out.num_new_prefix_hit_tokens == 8 and b.num_cached_tokens == 8
    assert out.num_computed_before == [8] and out.num_scheduled_tokens == [1]
    assert out.block_ids == [[1, 2, 4]]
    kv = sched.kv_cache_manager
    assert kv.prefix_cache_hit_rate == pytest.approx(8 / 19)


def test_requests_admitted_in_the_same_step_share_a_prefix():
    sched = make_scheduler()
    sched.add_request(make_request("a", 10))
    sched.add_request(make_request("b", 9))  # same first 9 tokens as a
    sched.add_request(make_request("c", 9, first=1))  # shifted: no hit
    out = sched.schedule()
    assert out.num_computed_before == [0, 8, 0] and out.num_scheduled_tokens == [10, 1, 9]
    assert out.block_ids == [[1, 2, 3], [1, 2, 4], [5, 6, 7]]
    assert out.num_new_prefix_hit_tokens == 8
    assert sched.kv_cache_manager.pool.blocks[1].ref_cnt == 2


def test_partial_chunk_caches_only_the_blocks_it_fills():
    sched = make_scheduler(max_num_batched_tokens=6)
    sched.add_request(make_request("a", 10))
    step(sched)  # a: tokens 0..5 -> block 1 full, block 2 half
    assert sched.kv_cache_manager.pool.num_cached_blocks == 1
    sched.add_request(make_request("b", 10))
    out = sched.schedule()  # a fills block 2 (and half of 3); b hits blocks 1 and 2
    assert out.num_computed_before == [6, 8] and out.num_scheduled_tokens == [4, 2]
    assert out.block_ids == [[1, 2, 3], [1, 2, 4]] and out.needs_sample == [True, True]
    assert sched.kv_cache_manager.pool.num_cached_blocks == 2


def test_update_checks_the_sampled_list_is_aligned():
    sched = make_scheduler()
    sched.add_request(make_request("a", 3))
    out = sched.schedule()
    with pytest.raises(ValueError, match="sampled"):
        sched.update_from_output(out, [])
