"""Engine: add_request / step / has_unfinished / abort / stats over scheduler + model runner.
Knows nothing about files; works on token ids (the tokenizer only turns outputs into text)."""
from __future__ import annotations

import logging
import random
import time

import torch

from batchgen.config import EngineConfig
from batchgen.engine.detokenizer import IncrementalDetokenizer
from batchgen.engine.model_runner import ModelRunner
from batchgen.engine.output_processor import build_request_output, merge_fanout, output_text
from batchgen.engine.overlap import (PendingStep, fill_placeholders, is_stop_token,
                                     placeholder_tokens, record_placeholders, stop_after)
from batchgen.engine.request import (Request, RequestStatus, as_token_ids, child_seed,
                                     prompt_error)
from batchgen.engine.scheduler import Scheduler, SchedulerConfig
from batchgen.engine.stats import EngineStats, PeakTracker
from batchgen.models import loader
from batchgen.models.registry import attention_window
from batchgen.outputs import RequestOutput
from batchgen.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, config: EngineConfig):
        t0 = time.perf_counter()
        self.config = config
        self.model_path = loader.resolve_model(config.model)
        self.hf_config = loader.load_hf_config(self.model_path)
        self.tokenizer = None if config.skip_tokenizer_init else loader.load_tokenizer(
            config.tokenizer or self.model_path)
        self.eos_token_ids = loader.load_eos_token_ids(self.model_path, self.hf_config)
        # The EOS that vLLM reports as stop_reason None; the other EOS ids stop by id.
        self.eos_token_id = getattr(self.tokenizer, "eos_token_id", None)
        self.generation_defaults = loader.load_generation_defaults(self.model_path)
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype(getattr(self.hf_config, "dtype", None))
        self.model = loader.load_model(self.model_path, self.hf_config, dtype=self.dtype,
                                       device=self.device, load_format=config.load_format,
                                       seed=config.seed)
        num_blocks, pool_tokens = self._size_kv_pool()
        self.runner.initialize_kv_cache(num_blocks)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=max(config.max_num_batched_tokens, 1),
            max_model_len=self.max_model_len, block_size=config.block_size,
            num_blocks=num_blocks, enable_prefix_caching=config.enable_prefix_caching))
        self.graph_seconds = self.runner.capture_cuda_graphs(config.max_num_seqs)
        self._rng = random.Random(config.seed)
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        # Finished without running (errors), by id: add_request checks ids against it.
        self._pending: dict[str, RequestOutput] = {}
        self._fanout: dict[str, list] = {}  # parent id -> [n, outputs so far]
        self._num_prompt_tokens = 0
        self._num_generated_tokens = 0
        self._num_steps = 0
        self._num_preemptions = 0
        self._num_penalized = 0  # live requests with penalties (they need real tokens)
        self._inflight: PendingStep | None = None
        # Overlap host and device work where the device runs asynchronously.
        self.overlap = config.async_scheduling if config.async_scheduling is not None \
            else self.device.type == "cuda"
        self.peaks = PeakTracker(config.block_size)
        self.startup_seconds = time.perf_counter() - t0
        log.info("engine ready in %.1f s: %d KV blocks (%d tokens), max_model_len %d",
                 self.startup_seconds, num_blocks, pool_tokens, self.max_model_len)

    def _size_kv_pool(self) -> tuple[int, int]:
        """Build the model runner and size its KV pool; max_model_len shrinks to the pool when
        the user left it at the model's default. Returns (blocks, tokens the pool holds)."""
        config = self.config
        max_pos = getattr(self.hf_config, "max_position_embeddings", None) or 4096
        if config.max_model_len is not None and config.max_model_len > max_pos:
            raise ValueError(f"max_model_len={config.max_model_len} is longer than the model's "
                             f"max_position_embeddings ({max_pos})")
        window = attention_window(self.hf_config)
        if window is not None and window < max_pos:
            if config.max_model_len is not None and config.max_model_len > window:
                raise ValueError(
                    f"max_model_len={config.max_model_len} is longer than the model's sliding "
                    f"attention window ({window}); batchgen attends to every earlier token, "
                    f"which matches the model only within the window: use {window} or less")
            if config.max_model_len is None:
                log.warning("max_model_len capped at the model's sliding attention window "
                            "(%d of %d positions): past it, full attention would differ from "
                            "the model's", window, max_pos)
            max_pos = window
        self.max_model_len = config.max_model_len or max_pos
        self.runner = ModelRunner(config, self.model, self.max_model_len, self.device, self.dtype)
        num_blocks = self.runner.determine_num_blocks()
        pool_tokens = (num_blocks - 1) * config.block_size
        if pool_tokens < self.max_model_len:
            if config.max_model_len is not None:
                raise ValueError(
                    f"max_model_len={config.max_model_len} does not fit the KV pool "
                    f"({pool_tokens} tokens); lower it or give the pool more memory")
            self.max_model_len = pool_tokens
            self.runner.max_model_len = pool_tokens
        return num_blocks, pool_tokens

    # ---- requests ------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams | None = None, prompt: str | None = None) -> None:
        """Queue a request. Token ids that are not integers (numpy's are) or not in the
        vocabulary raise ValueError with nothing added: a wrong id is the caller's mistake,
        where an unrunnable prompt (empty, too long) finishes as an error output."""
        params = params or SamplingParams()
        if self._is_live(request_id):
            raise ValueError(f"request id {request_id!r} is already in the engine")
        # Before anything is registered: a prompt that raises here leaves no trace.
        prompt_token_ids = as_token_ids(prompt_token_ids, self.model.vocab_size)
        error = prompt_error(prompt_token_ids, params, self.max_model_len,
                             has_tokenizer=self.tokenizer is not None)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
        if params.n == 1:
            self._add_one(request_id, prompt_token_ids, params, seed, prompt, error)
            return
        self._fanout[request_id] = [params.n, []]
        for i in range(params.n):
            self._add_one(f"{request_id}#{i}", prompt_token_ids, params, child_seed(seed, i),
                          prompt, error)

    def _is_live(self, request_id: str) -> bool:
        """request_id names a request added and not yet emitted (or aborted)."""
        unemitted = self._inflight.finished if self._inflight is not None else []
        return (request_id in self._fanout or self.scheduler.get_request(request_id) is not None
                or request_id in self._pending
                or any(r.request_id == request_id for r in unemitted))

    def _add_one(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 seed: int, prompt: str | None, error: str | None) -> None:
        req = Request(request_id=request_id, prompt_token_ids=prompt_token_ids,
                      sampling_params=params, eos_token_ids=self.eos_token_ids, seed=seed,
                      prompt_text=prompt)
        # Counted for every request, uncounted once when its output is built or it is aborted
        # (also a request the scheduler fails later, e.g. one that can never fit).
        self._num_penalized += params.has_penalties
        if error is not None:
            req.status = RequestStatus.FINISHED_ERROR
            req.error = error
            self._finish_output(req, prompt)
            return
        req.max_tokens = params.max_tokens or (self.max_model_len - len(prompt_token_ids))
        if params.stop and self.tokenizer is not None:
            self._detokenizers[request_id] = IncrementalDetokenizer(
                self.tokenizer, params, prompt_token_ids, eos_token_ids=self.eos_token_ids)
        self.scheduler.add_request(req)

    def abort(self, request_id: str) -> None:
        """Drop a request (all n of a fan-out): it is never emitted, also when it already
        finished but its output was not returned yet (overlapped steps emit one step late)."""
        ids = [f"{request_id}#{i}" for i in range(self._fanout[request_id][0])] \
            if request_id in self._fanout else [request_id]
        unemitted = self._inflight.finished if self._inflight is not None else []
        for rid in ids:
            req = self.scheduler.get_request(rid)
            if req is None:
                req = next((r for r in unemitted if r.request_id == rid), None)
                if req is None:
                    continue  # unknown, or already emitted
                unemitted.remove(req)
                req.status = RequestStatus.FINISHED_ABORTED
            self._num_penalized -= req.sampling_params.has_penalties
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
        for rid in ids:
            self._detokenizers.pop(rid, None)
        self._fanout.pop(request_id, None)
        self._pending.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self._pending) or self._inflight is not None \
            or self.scheduler.has_unfinished_requests()

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; returns the requests that finished (with overlapped steps, those whose
        last token became known during this call)."""
        outputs, self._pending = list(self._pending.values()), {}
        timer = self.runner.timer
        timer.start()
        prev, self._inflight = self._inflight, None
        if prev is not None and self._num_penalized:
            # penalties count output tokens on the host: no placeholders allowed
            outputs += self._resolve(prev)
            prev = None
        sched = self.scheduler.schedule()
        timer.lap("schedule")
        self._num_preemptions += len(sched.preempted)
        if sched.is_empty:
            # prev first: a request the scheduler finished here may wait for its last token
            if prev is not None:
                outputs += self._resolve(prev)
            outputs += self._emit(self.scheduler.update_from_output(sched, []))
            return outputs
        self._num_steps += 1
        self._num_prompt_tokens += sum(
            n for req, n, before in zip(sched.requests, sched.num_scheduled_tokens,
                                        sched.num_computed_before)
            if before < req.num_prompt_tokens)
        launched = self.runner.launch(sched, prev.launch if prev is not None else None)
        if self.overlap:
            finished = self.scheduler.update_from_output(sched, placeholder_tokens(sched))
            self._inflight = PendingStep(sched, launched, record_placeholders(sched), finished)
            self.peaks.track(self.scheduler.kv_cache_manager, self.scheduler.running)
            timer.lap("update_outputs")
            if prev is not None:
                outputs += self._resolve(prev)
            return outputs
        result = self.runner.collect(launched)
        if result.logprobs is not None:
            for req, lp in zip(sched.requests, result.logprobs):
                if lp is not None and req.sampling_params.logprobs is not None:
                    req.logprobs.append(lp)
        finished = self.scheduler.update_from_output(sched, result.sampled_token_ids)
        self._num_generated_tokens += sum(t is not None for t in result.sampled_token_ids)
        self.peaks.track(self.scheduler.kv_cache_manager, self.scheduler.running)
        finished = finished + self._check_stop_strings(sched, result.sampled_token_ids, finished)
        outputs += self._emit(finished)
        timer.lap("update_outputs")
        return outputs

    def _resolve(self, pending: PendingStep) -> list[RequestOutput]:
        """Wait for an overlapped step, put its real tokens in place, finish on stop tokens and
        stop strings, and emit what finished."""
        result = self.runner.collect(pending.launch)
        tokens, lps = {}, None
        for req, tok in zip(pending.sched.requests, result.sampled_token_ids):
            if tok is not None:
                tokens[req.request_id] = tok
        if result.logprobs is not None:
            lps = {req.request_id: lp for req, lp in zip(pending.sched.requests,
                                                         result.logprobs) if lp is not None}
        # Finished by length at placeholder time (a stop found since moved them out of the
        # list and emitted them; an abort dropped them).
        finished = list(pending.finished)
        # Finished by the step launched after this one, still to be resolved.
        later = self._inflight.finished if self._inflight is not None else []
        filled = fill_placeholders(pending, tokens, lps)
        self._num_generated_tokens += len(filled)
        stopped: list[str] = []
        for req, token, index in filled:
            if req.status == RequestStatus.FINISHED_ABORTED:
                continue
            reason = self._stop_reason(req, token, index)
            if reason is None:
                continue
            was_finished = req.is_finished
            stop_after(req, index, reason)
            if not was_finished:
                stopped.append(req.request_id)
                finished.append(req)
            elif req in later:
                # The later step finished it by length with a token now dropped: its output
                # is complete here, and that step must not emit it again.
                later.remove(req)
                finished.append(req)
        # One pass over the scheduler's queues for all of them, not one per request.
        self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        self.runner.timer.lap("update_outputs")
        return self._emit(finished)

    def _stop_reason(self, req: Request, token: int, index: int) -> int | str | None:
        """Why req stops at its output `token` (index `index`): a stop token, or the stop
        string this token completes; None if it goes on."""
        reason = token if is_stop_token(req, token, index + 1) else None
        detok = self._detokenizers.get(req.request_id)
        if detok is not None:
            hit = detok.update([token])
            reason = hit if hit is not None else reason
        return reason

    def _emit(self, finished: list[Request]) -> list[RequestOutput]:
        done = (self._finish_output(r, r.prompt_text, emit=False) for r in finished)
        return [o for o in done if o is not None]

    def _check_stop_strings(self, sched, sampled, already: list[Request]) -> list[Request]:
        """Feed each new token to its request's detokenizer; a stop string finishes the request
        (also one the scheduler just finished by length: the stop string wins, as in vLLM)."""
        if not self._detokenizers:
            return []
        done = {r.request_id for r in already}
        stopped = []
        for req, tok in zip(sched.requests, sampled):
            detok = self._detokenizers.get(req.request_id)
            if tok is None or detok is None:
                continue
            hit = detok.update([tok])
            if hit is None:
                continue
            req.stop_reason = hit
            if req.request_id in done:
                req.status = RequestStatus.FINISHED_STOPPED
            else:
                stopped.append(req)
        self.scheduler.finish_requests([r.request_id for r in stopped],
                                       RequestStatus.FINISHED_STOPPED)
        return stopped

    def _finish_output(self, req: Request, prompt: str | None, emit: bool = True):
        self._num_penalized -= req.sampling_params.has_penalties
        text = output_text(req, self._detokenizers.pop(req.request_id, None), self.tokenizer)
        out = build_request_output(req, prompt, text, self.tokenizer,
                                   eos_token_id=self.eos_token_id)
        parent = req.request_id.rsplit("#", 1)[0] if "#" in req.request_id else None
        if parent in self._fanout:
            entry = self._fanout[parent]
            entry[1].append(out)
            if len(entry[1]) < entry[0]:
                return None
            del self._fanout[parent]
            out = merge_fanout(parent, entry[1])
        if emit:
            self._pending[out.request_id] = out
            return None
        return out

    # ---- stats ---------------------------------------------------------------------------

    def reset_peak_stats(self) -> None:
        self.runner.timer.reset()
        self.peaks.reset()

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.kv_cache_manager.reset_prefix_cache()

    def stats(self) -> EngineStats:
        kv = self.scheduler.kv_cache_manager
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            num_kv_blocks_used=kv.num_used_blocks, num_kv_blocks_total=kv.num_total_blocks,
            block_size=self.config.block_size,
            kv_pool_tokens=kv.num_total_blocks * self.config.block_size,
            prefix_cache_hit_rate=kv.prefix_cache_hit_rate,
            num_prompt_tokens=self._num_prompt_tokens,
            num_generated_tokens=self._num_generated_tokens,
            num_preemptions=self._num_preemptions, num_steps=self._num_steps,
            peak_num_running=self.peaks.num_running, peak_kv_slots_allocated=self.peaks.num_slots,
            peak_kv_tokens_held=self.peaks.num_held, startup_seconds=self.startup_seconds,
            step_seconds=dict(self.runner.timer.totals))
