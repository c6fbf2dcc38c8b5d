"""A step's batch run as two halves on two CUDA streams, their attention kernels taking turns.

A decode step's GEMMs are bound by compute and its attention by KV-cache reads: run one after
the other, each leaves the other's unit idle. Cut the batch at a request boundary into halves
A and B, run B on a second stream, and order only the attention kernels: A's layer-0
attention, then B's layer-0, then A's layer-1, ... Between two turns each half runs its own
projections, norms and MLP, so one half's attention reads the KV cache while the other half's
GEMMs use the tensor cores. The cost: every weight is read twice a step, which only pays
once a half is big enough to be compute-bound (EngineConfig.two_stream_min_tokens).

Off CUDA (tests) the halves run one after the other on the one stream: same results, so the
splitting of the step's tensors is checked on CPU against the unsplit forward."""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from batchgen.layers.context import ForwardContext


@dataclass
class Halves:
    """Where a step is cut, all host ints: requests [0, num_reqs) and tokens [0, num_tokens)
    are half A, the rest half B; each half's own longest query and context."""
    num_reqs: int
    num_tokens: int
    max_query_lens: tuple[int, int]
    max_seq_lens: tuple[int, int]
    side_stream: torch.cuda.Stream | None  # None: run the halves in turn on one stream


def plan_halves(query_start_loc: np.ndarray, seq_lens: np.ndarray, min_tokens: int,
                side_stream: torch.cuda.Stream | None) -> Halves | None:
    """The cut nearest half the step's tokens, or None when the step has fewer than
    min_tokens tokens (0: never) or fewer than two requests."""
    num_reqs = int(seq_lens.shape[0])
    num_tokens = int(query_start_loc[-1])
    if min_tokens <= 0 or num_tokens < min_tokens or num_reqs < 2:
        return None
    cut = int(np.searchsorted(query_start_loc, num_tokens / 2))
    # query_start_loc[cut] >= half: the boundary before it may be nearer
    if cut > 0 and num_tokens / 2 - query_start_loc[cut - 1] < query_start_loc[cut] - num_tokens / 2:
        cut -= 1
    cut = min(max(cut, 1), num_reqs - 1)
    q_lens = np.diff(query_start_loc)
    return Halves(cut, int(query_start_loc[cut]),
                  (int(q_lens[:cut].max()), int(q_lens[cut:].max())),
                  (int(seq_lens[:cut].max()), int(seq_lens[cut:].max())), side_stream)


class AttentionTurns:
    """Events ordering the halves' attention kernels A0, B0, A1, B1, ...: half A's layer l
    waits for half B's layer l-1, half B's layer l for half A's layer l."""

    def __init__(self, num_layers: int) -> None:
        self.finished = [(torch.cuda.Event(), torch.cuda.Event()) for _ in range(num_layers)]

    def wait(self, half: int, layer: int) -> None:
        before = (layer - 1, 1) if half == 0 else (layer, 0)
        if before[0] >= 0:
            torch.cuda.current_stream().wait_event(self.finished[before[0]][before[1]])

    def done(self, half: int, layer: int) -> None:
        self.finished[layer][half].record()


@dataclass
class AttentionTurn:
    """What one half's attention layers see in their ForwardContext."""
    turns: AttentionTurns
    half: int

    def wait(self, layer: int) -> None:
        self.turns.wait(self.half, layer)

    def done(self, layer: int) -> None:
        self.turns.done(self.half, layer)


def split_context(ctx: ForwardContext, halves: Halves, turns: AttentionTurns | None
                  ) -> tuple[ForwardContext, ForwardContext]:
    """The step's context -> one per half (views, plus half B's query_start_loc rebased on the
    device: no host sync)."""
    r, t = halves.num_reqs, halves.num_tokens
    parts = []
    for half, (reqs, tokens) in enumerate(((slice(0, r), slice(0, t)),
                                           (slice(r, None), slice(t, None)))):
        qsl = ctx.query_start_loc[r:] - t if half else ctx.query_start_loc[:r + 1]
        parts.append(dataclasses.replace(
            ctx, query_start_loc=qsl, seq_lens=ctx.seq_lens[reqs],
            block_tables=ctx.block_tables[reqs], slot_mapping=ctx.slot_mapping[tokens],
            max_query_len=halves.max_query_lens[half], max_seq_len=halves.max_seq_lens[half],
            is_decode_only=halves.max_query_lens[half] == 1, attn_plans={}, halves=None,
            attn_turn=AttentionTurn(turns, half) if turns is not None else None))
    return parts[0], parts[1]


def forward_in_halves(layers, final_norm, positions: torch.Tensor, hidden: torch.Tensor,
                      ctx: ForwardContext) -> torch.Tensor:
    """The decoder layers and final norm over hidden [T, H] as two halves -> [T, H]."""
    halves = ctx.halves
    side = halves.side_stream
    main = torch.cuda.current_stream() if side is not None else None
    turns = AttentionTurns(len(layers)) if side is not None else None
    contexts = split_context(ctx, halves, turns)
    t = halves.num_tokens
    states = [[positions[:t], hidden[:t], None], [positions[t:], hidden[t:], None]]
    streams = (main, side)
    if side is not None:
        side.wait_stream(main)  # half B's inputs were written on the main stream
    outs = []
    # Launched layer by layer, A then B, so each wait names an event already recorded.
    for i in range(len(layers) + 1):
        for half in (0, 1):
            pos, hid, res = states[half]
            with _on(streams[half]):
                if i < len(layers):
                    states[half][1:] = layers[i](pos, hid, res, contexts[half])
                else:
                    outs.append(final_norm(hid, res)[0])
    if side is not None:
        main.wait_stream(side)
    # `hidden`, `positions` and ctx's tensors, read on the side stream, live until here: the
    # caching allocator may hand their memory out again only after the join above.
    return torch.cat(outs)


def _on(stream: torch.cuda.Stream | None):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
