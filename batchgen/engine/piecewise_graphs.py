"""PiecewiseGraphs: steps with prompt tokens, up to MAX_TOKENS of them, run from CUDA graphs
cut at each attention.

Launched eagerly, a small mixed step is bound by the host: a llama3-8b forward launches ~300
kernels through ~290 module calls, ~12 ms of host work for ~6.5 ms of GPU work at 200 tokens
(RESULTS.md, session 16). Everything but attention depends on the token count alone, so each
bucket of token counts captures the forward's pieces between two attentions: the embedding
and layer 0's q/k/v projection, then per layer its output projection, MLP and the next
layer's q/k/v (or the final norm). Attention, whose work depends on every request's lengths,
runs eagerly between the replays, reading q/k/v from static buffers and writing its output
into one the next piece reads. Padding rows (past the step's tokens) run through the pieces
and are never attended to or read.
"""
from __future__ import annotations

import bisect

import torch

from batchgen.layers.context import ForwardContext

# Bucket sizes: 32-token steps up to 512 (padding costs up to 31 rows of every GEMM); larger
# steps do enough GPU work to hide their eager launches.
BUCKET_STEP = 32
MAX_TOKENS = 512


def bucket_sizes(max_tokens: int = MAX_TOKENS) -> list[int]:
    """Multiples of BUCKET_STEP up to max_tokens (max_tokens alone when it is smaller)."""
    return list(range(BUCKET_STEP, max_tokens + 1, BUCKET_STEP)) or [max_tokens]


class PiecewiseGraphs:
    def __init__(self, runner, max_tokens: int = MAX_TOKENS, pool=None):
        self.runner = runner
        model = runner.model
        self.num_layers = model.num_layers
        self.sizes = bucket_sizes(max_tokens)
        self.max_tokens = self.sizes[-1]
        n, dev, dtype = self.max_tokens, runner.device, runner.dtype
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.q = torch.zeros((n, model.num_heads, model.head_dim), dtype=dtype, device=dev)
        self.k = torch.zeros((n, model.num_kv_heads, model.head_dim), dtype=dtype, device=dev)
        self.v = torch.zeros_like(self.k)
        self.attn_out = torch.zeros((n, model.num_heads * model.head_dim), dtype=dtype,
                                    device=dev)
        self.pool = pool
        # per bucket: its graphs in replay order, and the tensors they keep (the residual
        # stream, written by the first piece, and the last piece's hidden states)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.kept: dict[int, dict[str, torch.Tensor]] = {}

    def can_run(self, num_tokens: int) -> bool:
        return num_tokens <= self.max_tokens

    def _pieces(self, size: int, fused_mlp: bool, kept: dict[str, torch.Tensor]) -> list:
        """The forward's pieces at `size` rows, as callables to run (or capture) in order."""
        model = self.runner.model
        attn_out = self.attn_out[:size]

        def stage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
            self.q[:size].copy_(q)
            self.k[:size].copy_(k)
            self.v[:size].copy_(v)

        def first() -> None:
            kept["residual"], *qkv = model.first_piece(self.input_ids[:size])
            stage(*qkv)

        def following(i: int) -> None:
            out = model.next_piece(i, attn_out, kept["residual"], fused_mlp)
            if i + 1 < self.num_layers:
                stage(*out)
            else:
                kept["hidden"] = out
        return [first] + [lambda i=i: following(i) for i in range(self.num_layers)]

    @torch.inference_mode()
    def capture(self) -> None:
        """Every bucket's graphs, the largest first (the smaller reuse its pool memory)."""
        for size in reversed(self.sizes):
            fused = self.runner.fuses_mlp(size, eager=False)
            for piece in self._pieces(size, fused, {}):  # warm-up: compiles, cuBLAS plans
                piece()
            torch.cuda.synchronize(self.runner.device)
            kept: dict[str, torch.Tensor] = {}
            graphs = []
            for piece in self._pieces(size, fused, kept):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    piece()
                if self.pool is None:
                    self.pool = graph.pool()
                graphs.append(graph)
            self.graphs[size], self.kept[size] = graphs, kept
        torch.cuda.synchronize(self.runner.device)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            ctx: ForwardContext) -> torch.Tensor:
        """One step's forward (input_ids, positions: [T], on the device) -> hidden [T, hidden].
        Without captured graphs (CPU, tests) the same pieces run eagerly."""
        num_tokens = input_ids.shape[0]
        size = self.sizes[bisect.bisect_left(self.sizes, num_tokens)]
        self.input_ids[:num_tokens].copy_(input_ids)
        graphs = self.graphs.get(size)
        kept: dict[str, torch.Tensor] = self.kept.get(size, {})
        pieces = [graph.replay for graph in graphs] if graphs is not None \
            else self._pieces(size, ctx.fused_mlp, kept)
        model = self.runner.model
        q, k, v = self.q[:num_tokens], self.k[:num_tokens], self.v[:num_tokens]
        pieces[0]()
        for i in range(self.num_layers):
            start = 0
            for part in model.attend(i, positions, q, k, v, ctx):
                self.attn_out[start:start + part.shape[0]].copy_(part)
                start += part.shape[0]
            pieces[i + 1]()
        return kept["hidden"][:num_tokens]
