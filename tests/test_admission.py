"""Admission order: longest outputs first, then shared prefixes, then prompt length; and what it
buys: fewer scheduler steps for a job whose output lengths vary."""
from __future__ import annotations

import random

import pytest

from batchgen.engine.admission import admission_order
from batchgen.engine.request import Request
from batchgen.engine.scheduler import Scheduler, SchedulerConfig
from batchgen.sampling_params import SamplingParams


def test_longest_outputs_first_then_prefix_then_length():
    a, b = [5, 6, 7, 8], [9, 9, 9]
    prompts = [a, b + [1], a + [1], b, a, [300, 2]]
    caps = [8, 8, 8, 8, 32, None]
    # None (no cap) first; 32 next; the 8s grouped by prefix: [5..] before [9..] (token order,
    # also for ids past one byte), shorter first within a prefix; ties keep input order.
    assert admission_order(prompts, caps) == [5, 4, 0, 2, 3, 1]
    assert admission_order([[1], [1], [1]], [4, 4, 4]) == [0, 1, 2]
    assert admission_order([], []) == []


def test_prefix_grouping_compares_token_ids_not_bytes():
    prompts = [[256, 0], [1, 0], [255, 0]]  # little-endian bytes would put 256 first
    assert admission_order(prompts, [4, 4, 4]) == [1, 2, 0]


def test_ids_outside_any_vocabulary_do_not_break_the_order():
    # The engine gives these requests an error output; ordering must not raise first.
    prompts = [[5, 6], [-1, 2], [2**40], [7]]
    assert admission_order(prompts, [4, 4, 4, 9]) == [3, 2, 1, 0]  # b"" first, then by length


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="2 max_tokens for 3 prompts"):
        admission_order([[1], [2], [3]], [1, 2])


def _num_steps(requests: list[tuple[list[int], int]], order: list[int]) -> int:
    sched = Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=256,
                                      max_model_len=512, block_size=16, num_blocks=2048))
    for i in order:
        prompt, cap = requests[i]
        sched.add_request(Request(str(i), prompt, SamplingParams(max_tokens=cap, ignore_eos=True),
                                  eos_token_ids=(), max_tokens=cap))
    steps = 0
    while sched.has_unfinished_requests():
        out = sched.schedule()
        steps += not out.is_empty
        sched.update_from_output(out, [7 if need else None for need in out.needs_sample])
    return steps


def test_longest_first_shortens_the_tail_of_a_mixed_length_job():
    r = random.Random(0)
    requests = [([r.randrange(1000) for _ in range(r.randint(8, 64))], r.randint(4, 128))
                for _ in range(64)]
    num_output_tokens = sum(cap for _, cap in requests)
    fifo = _num_steps(requests, list(range(len(requests))))
    ordered = _num_steps(requests, admission_order(*zip(*requests)))
    # 64 requests, 16 at a time, 4-128 output tokens: at least 4,300 / 16 = 269 steps. In
    # input order the long requests that come last decode nearly alone at the end (331 steps);
    # longest first stays within a few steps of the bound (276).
    assert num_output_tokens / 16 <= ordered <= 1.05 * num_output_tokens / 16, ordered
    assert ordered < 0.85 * fifo, (ordered, fifo)
