"""ModelRunner: SchedulerOutput -> tensors -> forward -> sample. Owns the KV pool and the CUDA
graphs; never touches queues."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from batchgen.config import EngineConfig
from batchgen.engine.cuda_graphs import DecodeGraphs
from batchgen.engine.host_packer import send_arrays
from batchgen.engine.input_batch import (MIN_DENSE_RUN_TOKENS, InputBatch, build_input_batch,
                                         find_dense_run)
from batchgen.engine.sampler import Sampler
from batchgen.engine.sampling_metadata import build_sampling_metadata
from batchgen.engine.step_timer import StepTimer
from batchgen.kernels.gate_up_silu import pays_off
from batchgen.layers.context import ForwardContext

log = logging.getLogger(__name__)
# Distinct (requests, length) shapes of dense runs cuDNN is asked to plan (RESULTS.md,
# session 12: a new shape's first call costs a plan; datasets of one prompt length have few).
MAX_DENSE_SHAPES = 64


@dataclass
class StepResult:
    # Aligned with the SchedulerOutput's requests; None where the request did not sample.
    sampled_token_ids: list[int | None]
    # Aligned likewise: (sampled logprob, its rank, top ids, top logprobs) or None.
    logprobs: list[tuple[float, int, list[int], list[float]] | None] | None = None


@dataclass
class LaunchedStep:
    sample_rows: list[int]  # which scheduled requests sample, in sampled-tensor order
    sampled: torch.Tensor | None  # [S] int64 on the device
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    num_scheduled: int = 0
    # CUDA: the sampled tokens (and logprobs) copied to pinned host memory right behind the
    # sampling kernels, and an event recorded after that copy. collect() waits on the event,
    # i.e. for this step alone: a .tolist() of the device tensor would be a copy queued behind
    # whatever was launched since (the next step, with overlapped steps), and the host would
    # wait for that one too, idling the GPU for the host's whole turn.
    host: tuple[torch.Tensor, ...] | None = None
    ready: torch.cuda.Event | None = None


def _to_host(tensors: tuple[torch.Tensor, ...]
             ) -> tuple[tuple[torch.Tensor, ...], torch.cuda.Event]:
    """Device tensors -> (pinned host copies filled asynchronously, event after the copies)."""
    host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                 for t in tensors)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


class ModelRunner:
    def __init__(self, config: EngineConfig, model: torch.nn.Module, max_model_len: int,
                 device: torch.device, dtype: torch.dtype):
        self.config = config
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.vocab_size = model.vocab_size
        self.sampler = Sampler()
        self.is_cuda = device.type == "cuda"
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0
        self.graphs: DecodeGraphs | None = None
        self.timer = StepTimer()
        # A mixed step's leading decodes go to the decode kernel once they fill the GPU with
        # one program per (request, kv head): at one split it compiles no new variant
        # mid-run (the decode graphs compiled it) and beats the prefill kernel's 64-row tiles.
        self.min_mixed_decodes = None
        # A mixed step's run of fresh prompts of one length is attended densely by cuDNN
        # (batchgen.layers.dense_attention) where it runs; None: never.
        self.dense_min_tokens = None
        # The (requests, length) shapes dense runs have had: cuDNN plans each new one, so
        # past MAX_DENSE_SHAPES only those already planned are attended densely.
        self.dense_shapes: set[tuple[int, int]] = set()
        # (intermediate size, SMs): steps whose sizes pay off with them run each MLP's
        # gate/up projection and SwiGLU as one GEMM (batchgen.kernels.gate_up_silu); None:
        # never (it does not run here, or is turned off).
        self.fused_mlp_shape: tuple[int, int] | None = None
        if self.is_cuda:
            from batchgen.kernels.decode_attention import min_unsplit_batch
            from batchgen.layers.dense_attention import cudnn_attention_works
            self.min_mixed_decodes = min_unsplit_batch(model.num_kv_heads, device)
            if not config.disable_dense_attn and dtype in (torch.float16, torch.bfloat16) \
                    and cudnn_attention_works(device):
                self.dense_min_tokens = MIN_DENSE_RUN_TOKENS
            if not config.disable_fused_mlp and model.can_fuse_mlp():
                self.fused_mlp_shape = (model.config.intermediate_size,
                                        torch.cuda.get_device_properties(device)
                                        .multi_processor_count)

    def fuses_mlp(self, num_tokens: int, eager: bool = True) -> bool:
        """True when a step of num_tokens rows, launched eagerly or from a CUDA graph, runs its
        MLPs fused (ForwardContext.fused_mlp)."""
        if self.fused_mlp_shape is None:
            return False
        return pays_off(num_tokens, *self.fused_mlp_shape, eager=eager)

    # ---- KV pool -------------------------------------------------------------------------

    @property
    def kv_bytes_per_block(self) -> int:
        m = self.model
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * elem

    def determine_num_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if not self.is_cuda:
            budget = self.config.kv_cache_memory or 2 * 1024**3
            return max(budget // self.kv_bytes_per_block, 2)
        if self.config.kv_cache_memory is not None:
            return max(self.config.kv_cache_memory // self.kv_bytes_per_block, 2)
        peak = self._profile_peak_memory()
        total = torch.cuda.get_device_properties(self.device).total_memory
        free_for_kv = int(total * self.config.gpu_memory_utilization) - peak
        num = free_for_kv // self.kv_bytes_per_block
        if num < 2:
            raise ValueError(  # the settings' to fix, as vLLM's own check
                f"no memory left for the KV cache: the model and a {self.config.max_num_batched_tokens}"
                f"-token step take {peak / 2**30:.1f} GiB of {total / 2**30:.1f} GiB; lower "
                "max_num_batched_tokens or raise gpu_memory_utilization")
        return int(num)

    @torch.inference_mode()
    def _profile_peak_memory(self) -> int:
        """Peak bytes of a worst-case step (the full token budget as prefill) plus the logits of
        max_num_seqs sampled rows, weights included."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = self.config.max_num_batched_tokens
        seq = min(num_tokens, self.max_model_len)
        num_reqs = -(-num_tokens // seq)
        lens = [seq] * (num_reqs - 1) + [num_tokens - seq * (num_reqs - 1)]
        blocks_per_req = -(-seq // self.block_size)
        caches = self._allocate_caches(num_reqs * blocks_per_req + 1)
        cu = np.zeros(num_reqs + 1, dtype=np.int64)
        np.cumsum(lens, out=cu[1:])
        tables = np.arange(num_reqs * blocks_per_req, dtype=np.int32).reshape(num_reqs, -1) + 1
        positions = np.concatenate([np.arange(n) for n in lens])
        req_of = np.repeat(np.arange(num_reqs), lens)
        slots = tables[req_of, positions // self.block_size].astype(np.int64) * self.block_size \
            + positions % self.block_size
        batch = InputBatch(
            input_ids=np.zeros(num_tokens, dtype=np.int64), positions=positions.astype(np.int64),
            slot_mapping=slots, query_start_loc=cu.astype(np.int32),
            seq_lens=np.asarray(lens, dtype=np.int32), block_tables=tables,
            logits_indices=np.zeros(0, dtype=np.int64), sample_rows=[],
            max_query_len=seq, max_seq_len=seq)
        if self.dense_min_tokens is not None:  # (its output and cuDNN's workspace counted)
            batch.dense_run = find_dense_run(np.asarray(lens), np.zeros(num_reqs, np.int64), 0,
                                             self.dense_min_tokens)
        ctx, input_ids, positions, _ = self._send_step(batch, caches)
        hidden = self.model(input_ids, positions, ctx)
        rows = min(self.config.max_num_seqs, num_tokens)
        logits = self.model.compute_logits(hidden[:rows]).float()
        # The sampler's noise, sort and softmax temporaries: measured at 7-9x the fp32 logits.
        extra = 9 * logits.numel() * logits.element_size()
        del hidden, logits, caches, ctx
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) + extra
        torch.cuda.empty_cache()
        return peak

    def _allocate_caches(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        m = self.model
        # kv: [layers, 2, num_blocks, block_size, kv_heads, head_dim] in one allocation.
        kv = torch.empty((m.num_layers, 2, num_blocks, self.block_size, m.num_kv_heads, m.head_dim),
                         dtype=self.dtype, device=self.device)
        return [(kv[i, 0], kv[i, 1]) for i in range(m.num_layers)]

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.kv_caches = self._allocate_caches(num_blocks)

    def capture_cuda_graphs(self, max_num_seqs: int) -> float:
        if not self.is_cuda or self.config.enforce_eager:
            return 0.0
        t0 = time.perf_counter()
        self.graphs = DecodeGraphs(self, max_num_seqs)
        self.graphs.capture()
        return time.perf_counter() - t0

    # ---- one step ------------------------------------------------------------------------

    def _send(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """Arrays of one dtype -> device tensors, in one copy from pinned memory."""
        return send_arrays(self.device, self.is_cuda, *arrays)

    def _send_step(self, batch: InputBatch, caches=None):
        """An eager step's inputs in two copies (int32, int64) -> (ForwardContext, input_ids,
        positions, logits_indices) on the device."""
        shared = np.asarray([batch.shared_prefix_len], dtype=np.int32)
        query_start_loc, seq_lens, block_tables, shared_prefix_len = self._send(
            batch.query_start_loc, batch.seq_lens, batch.block_tables, shared)
        slot_mapping, input_ids, positions, logits_indices = self._send(
            batch.slot_mapping, batch.input_ids, batch.positions, batch.logits_indices)
        ctx = ForwardContext(
            query_start_loc=query_start_loc, seq_lens=seq_lens, block_tables=block_tables,
            slot_mapping=slot_mapping,
            kv_caches=caches if caches is not None else self.kv_caches,
            max_query_len=batch.max_query_len, max_seq_len=batch.max_seq_len,
            is_decode_only=batch.is_decode_only,
            num_decodes=0 if batch.is_decode_only else batch.num_decodes,
            shared_prefix_len=shared_prefix_len if batch.shared_prefix_len else None,
            dense_layout=batch.dense_layout,
            fused_mlp=self.fuses_mlp(len(batch.input_ids)))
        return ctx, input_ids, positions, logits_indices

    @torch.inference_mode()
    def execute(self, sched) -> StepResult:
        """One step, synchronous: launch it and wait for its tokens."""
        return self.collect(self.launch(sched, None))

    @torch.inference_mode()
    def launch(self, sched, prev: LaunchedStep | None) -> LaunchedStep:
        """Enqueue one step's forward and sampling on the device; no host sync. Placeholder
        tokens in the batch are read from `prev`'s sampled tensor on the device."""
        timer = self.timer
        batch = build_input_batch(sched, self.block_size,
                                  cascade=not self.config.disable_cascade_attn,
                                  min_mixed_decodes=self.min_mixed_decodes,
                                  dense_min_tokens=self.dense_min_tokens)
        if batch.dense_run is not None:
            self._admit_dense_shape(batch)
        fixup = None
        if batch.placeholder_index is not None:
            assert prev is not None and prev.sampled is not None, "placeholder with no step before"
            index, prev_row = self._send(batch.placeholder_index, batch.placeholder_prev_row)
            fixup = (index, prev.sampled[prev_row])
        timer.lap("prepare_inputs")
        logits_idx = None
        if self.graphs is not None and self.graphs.can_run(batch):
            hidden = self.graphs.run(batch, fixup)
        else:
            ctx, input_ids, positions, logits_idx = self._send_step(batch)
            if fixup is not None:
                input_ids[fixup[0]] = fixup[1]
            hidden = self.model(input_ids, positions, ctx)
        timer.lap("launch_forward")
        if not batch.sample_rows:
            return LaunchedStep(batch.sample_rows, None, None, len(sched.requests))
        if batch.is_decode_only and len(batch.sample_rows) == batch.num_reqs:
            rows = hidden  # one token per request, every one samples
        else:
            if logits_idx is None:
                (logits_idx,) = self._send(batch.logits_indices)
            rows = hidden[logits_idx]
        logits = self.model.compute_logits(rows)  # the sampler reads the model's dtype
        sample_reqs = [sched.requests[i] for i in batch.sample_rows]
        for j, req in enumerate(sample_reqs):
            req.pending_sample_row = j
        meta = build_sampling_metadata(sample_reqs, self.vocab_size, self.device,
                                       pin_memory=self.is_cuda)
        out = self.sampler(logits, meta)
        launched = LaunchedStep(batch.sample_rows, out.sampled_token_ids, out.logprobs,
                                len(sched.requests))
        if self.is_cuda:
            launched.host, launched.ready = _to_host(
                (out.sampled_token_ids, *(out.logprobs or ())))
        timer.lap("launch_sampling")
        return launched

    def _admit_dense_shape(self, batch: InputBatch) -> None:
        """Drops batch's dense run when its shape would be a new cuDNN plan past
        MAX_DENSE_SHAPES (its requests then go to the paged kernel)."""
        _, num_reqs, _, query_len = batch.dense_layout
        shape = (num_reqs, query_len)
        if shape not in self.dense_shapes:
            if len(self.dense_shapes) >= MAX_DENSE_SHAPES:
                batch.dense_run = None
                return
            self.dense_shapes.add(shape)

    def collect(self, launched: LaunchedStep) -> StepResult:
        """Wait for a launched step and bring its tokens to the host, aligned with its
        SchedulerOutput's requests (None where a request did not sample)."""
        num = launched.num_scheduled
        sampled: list[int | None] = [None] * num
        if launched.sampled is None:
            return StepResult(sampled)
        if launched.ready is not None:
            launched.ready.synchronize()  # the step's one host sync
            token_ids, *lp_host = (t.tolist() for t in launched.host)
        else:
            token_ids = launched.sampled.tolist()
            lp_host = [x.tolist() for x in launched.logprobs or ()]
        self.timer.lap("wait_gpu")
        for row, tok in zip(launched.sample_rows, token_ids):
            sampled[row] = tok
        logprobs = None
        if launched.logprobs is not None:
            logprobs = [None] * num
            lp, rank, top_ids, top_lps = lp_host
            for j, row in enumerate(launched.sample_rows):
                logprobs[row] = (lp[j], rank[j], top_ids[j], top_lps[j])
        return StepResult(sampled, logprobs)
