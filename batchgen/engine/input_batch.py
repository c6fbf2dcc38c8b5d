"""InputBatch: one step's flat varlen batch built from a SchedulerOutput, on the host.

Everything is vectorised with numpy over the batch: the only Python loop is one pass over the
scheduled requests to gather their new token ids and block-table rows."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A decode step reads the blocks all its requests share once for the batch (cascade
# attention) when the shared keys outnumber each request's own keys after them at least
# this many times, and (requests - 1) x shared keys reach MIN_CASCADE_SAVED_KEYS. Below
# that the plain kernel is as fast or faster: the H200's L2 already serves one layer's shared
# prefix to every request (bench/kernel_sweep.py --only cascade, RESULTS.md: x1.0 at 933
# requests of 256 shared + 344 own keys (239k saved), x0.8 at 64 of 256 + 484, x2.3 at 256
# of 2,048 + 128 (522k saved)).
MIN_CASCADE_SHARED_PER_OWN_KEY = 2.0
MIN_CASCADE_SAVED_KEYS = 1 << 19
# A run of fresh prompts (no cached keys) of one length, two at least, is attended densely
# (batchgen.layers.dense_attention) when it holds this many tokens: on the H200 cuDNN's fused
# attention ran 1.45x the paged kernel on 15 x 1,024 tokens (RESULTS.md, session 12); smaller
# runs were not measured, and each new (requests, length) pair costs cuDNN a plan.
MIN_DENSE_RUN_TOKENS = 4096


@dataclass
class InputBatch:
    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [B + 1] int32
    seq_lens: np.ndarray  # [B] int32
    block_tables: np.ndarray  # [B, max_blocks] int32, padded with 0
    logits_indices: np.ndarray  # [S] int64: the last token of each request that samples
    sample_rows: list[int]  # [S] which of the B requests sample
    max_query_len: int
    max_seq_len: int
    # Tokens still on the device (overlapped steps): input_ids[placeholder_index] comes from
    # the previous step's sampled tensor at row placeholder_prev_row.
    placeholder_index: np.ndarray | None = None  # [P] int64
    placeholder_prev_row: np.ndarray | None = None  # [P] int64
    # The leading requests with one query each that the decode kernel attends: every request
    # of a decode step; a mixed step's when there are enough of them (else 0).
    num_decodes: int = 0
    # Keys at the start of those requests' contexts held in the same blocks, read once for
    # them all (0: no cascade).
    shared_prefix_len: int = 0
    # (first request, requests): consecutive fresh prompts of one length, past the decodes,
    # that the step attends densely (find_dense_run); None: none.
    dense_run: tuple[int, int] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_reqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @property
    def dense_layout(self) -> tuple[int, int, int, int] | None:
        """The dense run as (first request, requests, first token, query length), or None."""
        if self.dense_run is None:
            return None
        first_req, num_reqs = self.dense_run
        first_token = int(self.query_start_loc[first_req])
        return (first_req, num_reqs, first_token,
                int(self.query_start_loc[first_req + 1]) - first_token)


def build_input_batch(sched, block_size: int, cascade: bool = True,
                      min_mixed_decodes: int | None = None,
                      dense_min_tokens: int | None = None) -> InputBatch:
    """sched: a SchedulerOutput (requests, num_scheduled_tokens, num_computed_before, block_ids,
    needs_sample). cascade: look for a shared prefix to read once (decode steps).
    min_mixed_decodes: a mixed step's leading one-query requests go to the decode kernel when
    there are at least this many (None: never; the prefill kernel then attends them).
    dense_min_tokens: look for a run of fresh prompts to attend densely, this many tokens at
    least (None: never)."""
    reqs = sched.requests
    num_reqs = len(reqs)
    q_lens = np.asarray(sched.num_scheduled_tokens, dtype=np.int64)
    starts = np.asarray(sched.num_computed_before, dtype=np.int64)
    seq_lens = starts + q_lens
    cu = np.zeros(num_reqs + 1, dtype=np.int64)
    np.cumsum(q_lens, out=cu[1:])
    num_tokens = int(cu[-1])

    ids: list[int] = []
    max_blocks = max((len(b) for b in sched.block_ids), default=1) or 1
    block_tables = np.zeros((num_reqs, max_blocks), dtype=np.int32)
    for i, req in enumerate(reqs):
        start, n = int(starts[i]), int(q_lens[i])
        if n == 1 and start == req.num_tokens - 1:
            ids.append(req.output_token_ids[-1] if req.output_token_ids else req.prompt_token_ids[-1])
        else:
            ids.extend(req.token_ids_slice(start, start + n))
        row = sched.block_ids[i]
        block_tables[i, :len(row)] = row
    input_ids = np.asarray(ids, dtype=np.int64)
    assert input_ids.shape[0] == num_tokens
    placeholder_index = np.nonzero(input_ids < 0)[0]
    placeholder_prev_row = None
    if placeholder_index.size:
        owners = np.searchsorted(cu[1:], placeholder_index, side="right")
        placeholder_prev_row = np.asarray([reqs[r].pending_sample_row for r in owners.tolist()],
                                          dtype=np.int64)
        input_ids[placeholder_index] = 0
    else:
        placeholder_index = None

    # positions: start of each request + offset inside its chunk.
    req_of_token = np.repeat(np.arange(num_reqs), q_lens)
    positions = np.arange(num_tokens, dtype=np.int64) - np.repeat(cu[:-1] - starts, q_lens)
    blocks = block_tables[req_of_token, positions // block_size].astype(np.int64)
    slot_mapping = blocks * block_size + positions % block_size

    max_query_len = int(q_lens.max()) if num_reqs else 0
    if max_query_len == 1:
        num_decodes = num_reqs
    else:
        num_decodes = int(np.argmax(q_lens != 1)) if num_reqs else 0  # the leading run
        if min_mixed_decodes is None or num_decodes < min_mixed_decodes:
            num_decodes = 0
    shared = 0
    decode_lens = seq_lens[:num_decodes]
    # (no search when even a prefix of every context's older keys could not pass the bar)
    if num_decodes and cascade \
            and (num_decodes - 1) * (int(decode_lens.min()) - 1) >= MIN_CASCADE_SAVED_KEYS:
        shared = shared_prefix_len(block_tables[:num_decodes], decode_lens, block_size)
        mean_own_keys = float(decode_lens.mean()) - shared  # (two requests or more here)
        if (num_decodes - 1) * shared < MIN_CASCADE_SAVED_KEYS \
                or shared < MIN_CASCADE_SHARED_PER_OWN_KEY * mean_own_keys:
            shared = 0
    dense_run = None
    if dense_min_tokens is not None and max_query_len > 1:
        dense_run = find_dense_run(q_lens, starts, num_decodes, dense_min_tokens)
    sample_rows = [i for i, s in enumerate(sched.needs_sample) if s]
    logits_indices = cu[1:][sample_rows] - 1 if sample_rows else np.zeros(0, dtype=np.int64)
    return InputBatch(
        input_ids=input_ids, positions=positions, slot_mapping=slot_mapping,
        query_start_loc=cu.astype(np.int32), seq_lens=seq_lens.astype(np.int32),
        block_tables=block_tables, logits_indices=np.asarray(logits_indices, dtype=np.int64),
        sample_rows=sample_rows, max_query_len=max_query_len,
        max_seq_len=int(seq_lens.max()) if num_reqs else 0,
        placeholder_index=placeholder_index, placeholder_prev_row=placeholder_prev_row,
        num_decodes=num_decodes, shared_prefix_len=shared, dense_run=dense_run)


def find_dense_run(q_lens: np.ndarray, starts: np.ndarray, first: int,
                   min_tokens: int) -> tuple[int, int] | None:
    """The longest run (in tokens) of two or more consecutive requests from `first` on that
    have no cached keys (starts == 0) and the same query length, when it holds min_tokens at
    least: -> (first request, requests), else None."""
    lens = np.where(starts[first:] == 0, q_lens[first:], 0)  # 0: a request that breaks runs
    if lens.size < 2:
        return None
    # run_ids[i]: which run request first + i is in (a new one wherever the length changes)
    run_ids = np.concatenate(([0], np.cumsum(lens[1:] != lens[:-1])))
    run_starts = np.flatnonzero(np.diff(run_ids, prepend=-1))
    counts = np.diff(np.append(run_starts, lens.size))
    tokens = np.where((counts >= 2) & (lens[run_starts] > 0), counts * lens[run_starts], 0)
    best = int(np.argmax(tokens))
    if tokens[best] < min_tokens:
        return None
    return first + int(run_starts[best]), int(counts[best])


def shared_prefix_len(block_tables: np.ndarray, seq_lens: np.ndarray, block_size: int) -> int:
    """Keys at the start of every request's context that sit in the same physical blocks for
    all of them (a prompt prefix the prefix cache shares): whole blocks, all before every
    request's newest key (the one this step writes). 0 for fewer than two requests."""
    if block_tables.shape[0] < 2:
        return 0
    limit = min(int(seq_lens.min()) - 1, block_tables.shape[1] * block_size) // block_size
    if limit <= 0:
        return 0
    head = block_tables[:, :limit]
    same = (head == head[0]).all(axis=0)
    return (limit if same.all() else int(same.argmin())) * block_size
