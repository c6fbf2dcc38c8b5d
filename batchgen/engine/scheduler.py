"""Scheduler: one token budget per step, decodes and running chunks first, then admissions
(FIFO), chunked prefill, preemption of the newest request when blocks run out.

Step protocol (the engine): out = schedule(); run the model on `out`; then ALWAYS call
update_from_output(out, sampled) - even when out.total_num_scheduled_tokens == 0 - because
requests the scheduler itself finished (e.g. FINISHED_ERROR) are returned from there.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from batchgen.engine.kv_cache_manager import KVCacheManager
from batchgen.engine.request import Request, RequestStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int = 16
    # Including the reserved null block 0 (num_blocks - 1 are usable).
    num_blocks: int = 1024
    enable_prefix_caching: bool = True
    # > 0: no request gets more than this many tokens in one step (long prompts are chunked
    # even when the budget would allow more, so they do not starve other admissions).
    long_prefill_token_threshold: int = 0

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.num_blocks, int) or self.num_blocks < 2:
            raise ValueError(f"SchedulerConfig.num_blocks must be an integer >= 2 (block 0 is "
                             f"reserved), got {self.num_blocks!r}")
        if not isinstance(self.long_prefill_token_threshold, int) \
                or self.long_prefill_token_threshold < 0:
            raise ValueError("SchedulerConfig.long_prefill_token_threshold must be an integer "
                             f">= 0, got {self.long_prefill_token_threshold!r}")


@dataclass
class SchedulerOutput:
    # Per scheduled request, aligned; running requests first (admission order), then new ones.
    requests: list[Request] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    # Position of each request's first scheduled token (= its num_computed_tokens before).
    num_computed_before: list[int] = field(default_factory=list)
    # Each request's whole block table after allocation: live references to the manager's
    # lists, valid until the next schedule(); read, never mutate.
    block_ids: list[list[int]] = field(default_factory=list)
    # True when the chunk reaches the request's last known token: sample one token for it.
    needs_sample: list[bool] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Finished by the scheduler in this step without running (FINISHED_ERROR / _LENGTH);
    # update_from_output returns them with the step's other finished requests.
    finished: list[Request] = field(default_factory=list)
    total_num_scheduled_tokens: int = 0
    num_new_prefix_hit_tokens: int = 0

    @property
    def num_reqs(self) -> int:
        return len(self.requests)

    @property
    def is_empty(self) -> bool:
        return not self.requests


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.kv_cache_manager = KVCacheManager(
            config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order; the newest is last
        self.requests: dict[str, Request] = {}  # unfinished only

    # ---- queues --------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the scheduler")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running or self.waiting)

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> None:
        """Finish requests from outside (abort, stop string): free their blocks, drop them from
        the queues. Unknown or already finished ids are ignored."""
        assert status.is_finished, status
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        done = set()
        now = time.monotonic()
        for rid in request_ids:
            request = self.requests.pop(rid, None)
            if request is None:
                continue
            request.status = status
            request.finished_time = now
            self.kv_cache_manager.free(request)
            done.add(rid)
        if not done:
            return
        self.running = [r for r in self.running if r.request_id not in done]
        if any(r.request_id in done for r in self.waiting):
            self.waiting = deque(r for r in self.waiting if r.request_id not in done)

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            budget = self._schedule_waiting(out, budget)
        out.total_num_scheduled_tokens = self.config.max_num_batched_tokens - budget
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        # The hot loop of a large decode batch: _record and the KV manager's three calls are
        # inlined here as one fast_slots call (no new block, no block newly full); anything
        # else takes the general path below, with the same effect.
        kv = self.kv_cache_manager
        fast_slots = kv.fast_slots
        threshold = self.config.long_prefill_token_threshold
        running = self.running  # mutated in place (pop) only, never rebound in this loop
        add_request = out.requests.append
        add_num_new = out.num_scheduled_tokens.append
        add_before = out.num_computed_before.append
        add_block_ids = out.block_ids.append
        add_needs_sample = out.needs_sample.append
        i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            output_ids = request.output_token_ids
            num_tokens = len(request.prompt_token_ids) + len(output_ids)
            before = request.num_computed_tokens
            num_new = num_tokens - before
            if 0 < threshold < num_new:
                num_new = threshold
            if num_new > budget:
                num_new = budget
            if num_new <= 0:  # waiting for a token the runner did not give (defensive)
                i += 1
                continue
            end = before + num_new
            # Blocks this chunk fills are registered now (see _record); with overlapped steps
            # the last token may still be a placeholder: hash a block only once all is known.
            num_known = num_tokens - 1 if output_ids and output_ids[-1] < 0 else num_tokens
            block_ids = fast_slots(request.request_id, end, end if end < num_known else num_known)
            if block_ids is None:
                while kv.allocate_slots(request, num_new) is None:
                    if len(running) == 1:
                        # Alone with the whole pool and still no room: it can never grow.
                        running.pop()
                        self._finish(request, RequestStatus.FINISHED_LENGTH)
                        out.finished.append(request)
                        return budget
                    victim = running.pop()
                    self._preempt(victim)
                    out.preempted.append(victim)
                    if victim is request:
                        return budget
                kv.cache_blocks(request, end if end < num_known else num_known)
                block_ids = kv.get_block_ids(request)
            add_request(request)
            add_num_new(num_new)
            add_before(before)
            add_block_ids(block_ids)
            add_needs_sample(end == num_tokens)
            budget -= num_new
            i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> int:
        kv = self.kv_cache_manager
        cfg = self.config
        threshold = cfg.long_prefill_token_threshold
        now = time.monotonic()
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            request = self.waiting[0]
            error = self._check_can_ever_fit(request)
            if error is not None:
                self.waiting.popleft()
                request.error = error
                self._finish(request, RequestStatus.FINISHED_ERROR)
                out.finished.append(request)
                continue
            hit_blocks, num_hit = kv.get_computed_blocks(request)
            num_new = request.num_tokens - num_hit
            if 0 < threshold < num_new:
                num_new = threshold
            num_new = min(num_new, budget)
            if kv.allocate_slots(request, num_new, hit_blocks) is None:
                break  # FIFO: no skipping ahead
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit
            request.num_cached_tokens = num_hit
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
            self.running.append(request)
            self._record(out, request, num_new, request.num_tokens)
            out.num_new_prefix_hit_tokens += num_hit
            budget -= num_new
        return budget

    def _record(self, out: SchedulerOutput, request: Request, num_new: int,
                num_tokens: int) -> None:
        before = request.num_computed_tokens
        # Register the blocks this chunk fills now, not after the forward: each attention
        # layer writes the whole step's K/V before any request reads the cache, so a request
        # admitted later in this same step can already share them (a common system prompt
        # across one batch is computed once).
        # With overlapped steps the last token may still be a placeholder (its value is on
        # the device): a block is hashed only once all its tokens are known.
        ids = request.output_token_ids
        num_known = request.num_tokens - (1 if ids and ids[-1] < 0 else 0)
        self.kv_cache_manager.cache_blocks(request, min(before + num_new, num_known))
        out.requests.append(request)
        out.num_scheduled_tokens.append(num_new)
        out.num_computed_before.append(before)
        out.block_ids.append(self.kv_cache_manager.get_block_ids(request))
        out.needs_sample.append(before + num_new == num_tokens)

    def _check_can_ever_fit(self, request: Request) -> str | None:
        num_tokens = request.num_tokens
        if request.num_prompt_tokens == 0:
            return "empty prompt: nothing to run"
        if num_tokens > self.config.max_model_len:
            return (f"request has {num_tokens} tokens, more than max_model_len="
                    f"{self.config.max_model_len}")
        kv = self.kv_cache_manager
        num_needed = kv.num_blocks_for(num_tokens)
        if num_needed > kv.num_total_blocks:
            return (f"request needs {num_needed} KV blocks ({num_tokens} tokens) but the whole "
                    f"KV cache has {kv.num_total_blocks} blocks of {kv.block_size} tokens; "
                    "raise the KV cache size or shorten the prompt")
        return None

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        request.finished_time = time.monotonic()
        self.kv_cache_manager.free(request)
        self.requests.pop(request.request_id, None)

    # ---- after the forward ---------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput,
                           sampled_token_ids: list[int | None]) -> list[Request]:
        """Advance the scheduled requests by their chunks, append sampled tokens, finish the
        ones that stop. `sampled_token_ids` is aligned with out.requests (None: no sample).
        Returns the requests finished in this step (including out.finished)."""
        if len(sampled_token_ids) != len(out.requests):
            raise ValueError(f"update_from_output: {len(sampled_token_ids)} sampled tokens for "
                             f"{len(out.requests)} scheduled requests (pass None where none)")
        finished = list(out.finished)
        num_finished_here = 0
        now = None
        running_status = RequestStatus.RUNNING
        max_model_len = self.config.max_model_len
        # _check_stop inlined: this loop runs once per scheduled request per step.
        for request, num_new, needs_sample, token in zip(
                out.requests, out.num_scheduled_tokens, out.needs_sample, sampled_token_ids):
            if request.status != running_status:
                continue  # finished or preempted from outside since schedule()
            request.num_computed_tokens += num_new
            if not needs_sample or token is None:
                continue
            output_ids = request.output_token_ids
            output_ids.append(token)
            if request.first_token_time is None:
                now = now or time.monotonic()
                request.first_token_time = now
            num_output = len(output_ids)
            params = request.sampling_params
            if num_output >= params.min_tokens \
                    and ((token in request.eos_token_ids and not params.ignore_eos)
                         or token in params.stop_token_ids):
                request.stop_reason = token
                status = RequestStatus.FINISHED_STOPPED
            elif num_output >= request.max_tokens \
                    or num_output + len(request.prompt_token_ids) >= max_model_len:
                status = RequestStatus.FINISHED_LENGTH
            else:
                continue
            self._finish(request, status)
            finished.append(request)
            num_finished_here += 1
        if num_finished_here:
            self.running = [r for r in self.running if not r.status.is_finished]
        return finished
