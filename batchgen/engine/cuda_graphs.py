"""DecodeGraphs: the model's forward for pure-decode steps, captured once per bucketed batch
size and replayed, so a decode step costs one graph launch instead of hundreds of kernels.

Sizes large enough for cascade attention (input_batch's bar) get a second graph whose
attention reads the blocks every request shares once for the batch (the shared length is
an input, so one graph serves every prefix). Other steps replay the plain graph."""
from __future__ import annotations

import bisect

import torch

from batchgen.engine import input_batch
from batchgen.layers.context import ForwardContext


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 256, 16)) + list(range(256, max_num_seqs + 1, 64))
    sizes = sorted({s for s in sizes if s <= max_num_seqs} | {max_num_seqs})
    return sizes


class DecodeGraphs:
    def __init__(self, runner, max_num_seqs: int):
        self.runner = runner
        self.device = runner.device
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_bs = self.sizes[-1]
        self.max_blocks = -(-runner.max_model_len // runner.block_size)
        dev = self.device
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(self.max_bs, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((self.max_bs,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(self.max_bs, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(self.max_bs + 1, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros((self.max_bs, self.max_blocks), dtype=torch.int32, device=dev)
        self.shared_prefix_len = torch.zeros(1, dtype=torch.int32, device=dev)
        # keyed by (batch size, cascade)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, bool], torch.Tensor] = {}
        self.pool = None

    def _context(self, bs: int, cascade: bool = False) -> ForwardContext:
        return ForwardContext(
            query_start_loc=self.query_start_loc[:bs + 1], seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs], slot_mapping=self.slot_mapping[:bs],
            kv_caches=self.runner.kv_caches, max_query_len=1,
            max_seq_len=self.runner.max_model_len, is_decode_only=True,
            shared_prefix_len=self.shared_prefix_len if cascade else None,
            fused_mlp=self.runner.fuses_mlp(bs, eager=False))

    @torch.inference_mode()
    def capture(self) -> None:
        """The plain graph of every size, and the cascade graph of every size where a step
        could pass input_batch's bar for one (even with a prefix of max_model_len keys). Again
        mid-run, it replaces them: the warm-up forwards then write no KV either."""
        self.slot_mapping.fill_(-1)
        bar = input_batch.MIN_CASCADE_SAVED_KEYS
        cascade_from = max(2, -(-bar // self.runner.max_model_len) + 1)
        use_cascade = not self.runner.config.disable_cascade_attn
        for bs in reversed(self.sizes):
            self._capture((bs, False))
            if use_cascade and bs >= cascade_from:
                self._capture((bs, True))
        torch.cuda.synchronize(self.device)

    def _capture(self, key: tuple[int, bool]) -> None:
        bs = key[0]
        ctx = self._context(*key)
        model = self.runner.model
        # Warm-up outside the graph (Triton compiles, cuBLAS picks algorithms). From capture()
        # the padding inputs write no KV; from run() (a size capture() left out) it writes
        # this step's K/V, which the replay then writes again.
        model(self.input_ids[:bs], self.positions[:bs], ctx)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = model(self.input_ids[:bs], self.positions[:bs], ctx)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[key] = graph
        self.outputs[key] = out

    def can_run(self, batch) -> bool:
        return batch.is_decode_only and batch.num_reqs <= self.max_bs \
            and batch.block_tables.shape[1] <= self.max_blocks

    def run(self, batch, fixup=None) -> torch.Tensor:
        """fixup: (token indices, token ids) already on the device, written into input_ids
        after the copy (the previous step's sampled tokens, overlapped steps)."""
        n = batch.num_reqs
        bs = self.sizes[bisect.bisect_left(self.sizes, n)]
        nb = batch.block_tables.shape[1]
        # One pinned staging tensor, one H2D copy. A fresh one from torch's caching host
        # allocator each step: it is not reused before its copy has run, which matters when
        # the host runs a step ahead of the device (overlapped steps).
        staging = torch.empty(bs * (4 + nb) + 1, dtype=torch.int64, pin_memory=True)
        stage_decode_inputs(batch, bs, staging.numpy())
        dev = staging.to(self.device, non_blocking=True)
        self.input_ids[:bs].copy_(dev[0:bs])
        self.positions[:bs].copy_(dev[bs:2 * bs])
        self.slot_mapping[:bs].copy_(dev[2 * bs:3 * bs])
        self.seq_lens[:bs].copy_(dev[3 * bs:4 * bs])
        # Only the batch's widest row: the kernels read no block past a sequence's length, so
        # the stale columns beyond are never touched (a full max_model_len-wide table would
        # be 67 MB a step for a 128k-context model).
        self.block_tables[:bs, :nb].copy_(dev[4 * bs:-1].view(bs, nb))
        key = (bs, batch.shared_prefix_len > 0)  # > 0 only for two requests or more
        if key[1]:
            self.shared_prefix_len.copy_(dev[-1:])
        if fixup is not None:
            self.input_ids[fixup[0]] = fixup[1]
        if key not in self.graphs:  # a size capture() left out (a lowered bar: tests)
            self._capture(key)
        self.graphs[key].replay()
        return self.outputs[key][:n]


def stage_decode_inputs(batch, bs: int, host) -> None:
    """Fill `host` ([bs * (4 + nb) + 1] int64) for a decode batch of n <= bs requests padded to
    bs: ids | positions | slots | seq_lens | block table rows [bs, nb] | shared prefix length.
    Padding rows write no KV (slot -1) and attend to one key of block 0 (and, with a shared
    prefix, to the prefix: their output is dropped)."""
    n, nb = batch.num_reqs, batch.block_tables.shape[1]
    host[:2 * bs] = 0
    host[0:n] = batch.input_ids
    host[bs:bs + n] = batch.positions
    host[2 * bs:2 * bs + n] = batch.slot_mapping
    host[2 * bs + n:3 * bs] = -1
    host[3 * bs:3 * bs + n] = batch.seq_lens
    host[3 * bs + n:4 * bs] = 1
    table = host[4 * bs:4 * bs + bs * nb].reshape(bs, nb)
    table[:n] = batch.block_tables
    table[n:] = 0
    host[-1] = batch.shared_prefix_len
