"""Prefill pacing (engine/pacing.py): when every remaining request has a known length and all
fit at once, prompt chunks ride in decode steps with room for them, and the job ends on the
same step as with greedy admission; anything uncertain admits greedily."""
from __future__ import annotations

import random

import pytest

from batchgen import LLM, SamplingParams
from batchgen.engine.admission import admission_order
from batchgen.engine.pacing import has_exact_length, prefill_allowance
from batchgen.engine.request import Request
from batchgen.engine.scheduler import Scheduler, SchedulerConfig

EOS = 2


def _request(rid: str, prompt_len: int, max_tokens: int, *, ignore_eos: bool = True,
             **params) -> Request:
    ids = [(7 * int(rid) + i) % 900 + 10 for i in range(prompt_len)]  # no shared prefixes
    return Request(rid, ids, SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos,
                                            **params),
                   eos_token_ids=(EOS,), max_tokens=max_tokens)


def _run(requests: list[Request], pace: int, *, max_num_seqs: int = 64,
         num_blocks: int = 4096) -> tuple[list[int], dict[str, int]]:
    """The scheduler alone (every sampled token 7): prompt tokens per step, and the step on
    which each request finished."""
    sched = Scheduler(SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=1024, max_model_len=4096,
        block_size=16, num_blocks=num_blocks, pace_step_tokens=pace))
    order = admission_order([r.prompt_token_ids for r in requests],
                            [r.max_tokens for r in requests])
    for i in order:
        sched.add_request(requests[i])
    prompt_tokens, finished_at = [], {}
    while sched.has_unfinished_requests():
        out = sched.schedule()
        prompt_tokens.append(sum(n for r, n, before in zip(out.requests, out.num_scheduled_tokens,
                                                           out.num_computed_before)
                                 if before < r.num_prompt_tokens))
        for r in sched.update_from_output(out, [7 if s else None for s in out.needs_sample]):
            finished_at[r.request_id] = len(prompt_tokens)
            assert len(r.output_token_ids) == r.max_tokens
    return prompt_tokens, finished_at


def _job(seed: int, n: int = 24, **params) -> list[Request]:
    r = random.Random(seed)
    return [_request(str(i), r.randint(20, 200), r.randint(2, 96), **params) for i in range(n)]


def test_paced_prompts_ride_in_decode_steps_and_the_end_does_not_move():
    greedy, greedy_done = _run(_job(0), pace=0)
    paced, paced_done = _run(_job(0), pace=48)
    assert sum(paced) == sum(greedy)  # the same prompts, all computed
    assert len(paced) == len(greedy) == max(greedy_done.values())  # the same last step
    # Greedy computes every prompt in the first three steps (1,024-token budget); paced, the
    # longest output's prompt goes first and the rest is spread over the steps decoding it.
    assert sum(t > 0 for t in greedy) == 3
    assert paced[0] < greedy[0] and sum(t > 0 for t in paced) > 50
    assert max(paced) <= 48, paced


@pytest.mark.parametrize("seed", range(6))
def test_pacing_never_delays_the_last_request(seed):
    jobs = _job(seed, n=random.Random(seed).randint(2, 40))
    greedy, _ = _run(jobs, pace=0)
    paced, _ = _run(_job(seed, n=len(jobs)), pace=32)
    assert len(paced) <= len(greedy) and sum(paced) == sum(greedy)


def test_uncertain_lengths_are_admitted_greedily():
    def job() -> list[Request]:
        requests = _job(1)
        requests[5] = _request("5", 50, 30, ignore_eos=False)  # may stop at EOS
        return requests
    assert _run(job(), pace=48) == _run(job(), pace=0)
    assert _run(_job(1, stop_token_ids=[9]), pace=48) == _run(_job(1, stop_token_ids=[9]), pace=0)
    assert not has_exact_length(_request("1", 4, 4, stop=["x"]))
    assert has_exact_length(Request("1", [5], SamplingParams(), eos_token_ids=()))


def test_a_queue_longer_than_the_batch_or_the_pool_is_admitted_greedily():
    # 24 requests, 16 at a time: greedy until 8 have finished, paced once the rest fits
    greedy, done = _run(_job(2), pace=0, max_num_seqs=16)
    paced, _ = _run(_job(2), pace=48, max_num_seqs=16)
    fits_from = sorted(done.values())[7]
    assert paced[:fits_from] == greedy[:fits_from] and paced != greedy
    # A 60-block pool holds the job only near its end: the first step is greedy's, not paced
    small_pool = _run(_job(2), pace=48, num_blocks=61)[0]
    assert small_pool[0] == _run(_job(2), pace=0, num_blocks=61)[0][0]
    assert small_pool[0] > 4 * _run(_job(2), pace=48)[0][0]


def test_allowance_is_the_deadlines_or_the_room_whichever_is_more():
    running = _request("1", 8, 12)
    running.output_token_ids = [7, 7]  # 10 tokens still to generate: the job's horizon
    running.num_computed_tokens = 9  # decoding: the last sampled token is its next input
    waiting = [_request("2", 30, 5), _request("3", 30, 8)]  # (FIFO: not longest first)
    kw = dict(num_waiting=2, was_paced=False, max_num_seqs=8, num_free_blocks=100,
              block_size=16, held_blocks=lambda r: 1)
    # "2" within 10 - 5 + 1 = 6 steps: 30 / 6 = 5 a step; "3" after it within 3: 60 / 3 = 20
    assert prefill_allowance([running], waiting, step_tokens=16, **kw) == 20
    assert prefill_allowance([running], waiting, step_tokens=64, **kw) == 63  # room less 1 decode
    assert prefill_allowance([running], waiting, step_tokens=0, **kw) is None
    assert prefill_allowance([running], [], step_tokens=16, **{**kw, "num_waiting": 0}) is None
    with pytest.raises(ValueError, match="pace_step_tokens"):
        SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=8, max_model_len=8,
                        pace_step_tokens=-1)


def test_paced_engine_gives_the_same_tokens(smol_model_dir):
    """The real small model on CPU, pacing forced on: the same greedy tokens as greedy
    admission, while prompts were really spread over decode steps."""
    llm = LLM(str(smol_model_dir), device="cpu", num_kv_blocks=256)
    tok = llm.tokenizer
    texts = ["The capital of France is", "def add(a, b):\n   ", "Once upon a time, there was",
             "1, 2, 3, 4,", "The best way to learn a language is", "Water boils at"]
    prompts = [{"prompt_token_ids": tok(t)["input_ids"]} for t in texts]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
              for n in (24, 3, 12, 6, 18, 9)]
    scheduler = llm.engine.scheduler
    schedule, prompt_steps = scheduler.schedule, []

    def recording_schedule():
        out = schedule()
        prompt_steps.append(any(n > 1 for n in out.num_scheduled_tokens))
        return out
    scheduler.schedule = recording_schedule
    assert scheduler.config.pace_step_tokens == 0  # off on CPU by default
    greedy = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    greedy_steps, prompt_steps[:] = list(prompt_steps), []
    scheduler.config.pace_step_tokens = 8
    paced = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert paced == greedy
    assert sum(greedy_steps) <= 2 < sum(prompt_steps)
