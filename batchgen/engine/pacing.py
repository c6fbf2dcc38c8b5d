"""Prefill pacing: prompt tokens spread over the decode steps that have room for them, when the
rest of a job is known exactly.

A decode step of a few dozen sequences is bound by reading the weights: it costs about the same
whether it carries 50 tokens or 150. Admitted greedily, the last prompts of a job are prefilled
in one or two large compute-bound steps, and every running request waits for them. When every
remaining request runs to a known length (EOS ignored or absent, no stop tokens or strings) and
all of them fit in the batch and the KV pool at once, the job's end is known too: the request
with the most steps left sets it. A request with L tokens to generate must then be prefilled
within (steps left) - L + 1 steps, and the rest of a step's room (up to `step_tokens` tokens)
is free. The scheduler gives prompt chunks, running and new, only what the deadlines ask or
what the room holds, whichever is more; the finish line does not move, and the prompts ride in
steps that were reading the weights anyway.

Anything uncertain (an output that may stop early, a queue longer than the batch or the pool)
turns pacing off for the step: greedy admission is right when the end is not known.
"""
from __future__ import annotations

from collections.abc import Iterable

from batchgen.engine.request import Request

# A step's tokens that cost about one weight read: the GPU's matmul rate over its memory
# bandwidth in tokens (2 FLOPs per weight per token, 2 bytes per bf16 weight): H200 ~180 at
# its burst clock, ~140 under the power cap; H100 ~300. The deadlines ask more when needed.
PACE_STEP_TOKENS = 128


def has_exact_length(request: Request) -> bool:
    """True when the request runs to its max_tokens: nothing can stop it earlier."""
    params = request.sampling_params
    return (params.ignore_eos or not request.eos_token_ids) \
        and not params.stop_token_ids and not params.stop


def prefill_allowance(running: list[Request], waiting: Iterable[Request], *, num_waiting: int,
                      was_paced: bool, step_tokens: int, max_num_seqs: int,
                      num_free_blocks: int, block_size: int, held_blocks) -> int | None:
    """Prompt tokens this step may schedule (running chunks and admissions together), or None
    when the step is not paced. `held_blocks(request)` -> blocks a running request holds.
    Without waiting requests only a paced step's unfinished chunks are looked for
    (`was_paced`): the running batch is not scanned every decode step."""
    if step_tokens <= 0 or not (num_waiting or was_paced) \
            or len(running) + num_waiting > max_num_seqs:
        return None
    horizon = num_decodes = blocks_needed = 0
    pending: list[tuple[int, int]] = []  # (prompt tokens to compute, tokens to generate)
    for request, is_running in _in_order(running, waiting):
        if not has_exact_length(request):
            return None
        to_generate = request.max_tokens - len(request.output_token_ids)
        horizon = max(horizon, to_generate)
        final_blocks = -(-(request.num_tokens + to_generate) // block_size)
        blocks_needed += final_blocks - (held_blocks(request) if is_running else 0)
        to_compute = request.num_tokens - (request.num_computed_tokens if is_running else 0)
        if to_compute > 1:
            pending.append((to_compute, to_generate))
        else:
            num_decodes += 1
    if not pending or blocks_needed > num_free_blocks:
        return None
    # Request j (admission order: chunks cannot overtake) ends on time if its prompt and all
    # those before it are computed within horizon - to_generate + 1 steps.
    asked = computed = 0
    for to_compute, to_generate in pending:
        computed += to_compute
        asked = max(asked, -(-computed // (horizon - to_generate + 1)))
    return max(asked, step_tokens - num_decodes)


def _in_order(running: list[Request], waiting: Iterable[Request]):
    for request in running:
        yield request, True
    for request in waiting:
        yield request, False
