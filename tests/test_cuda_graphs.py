"""Decode CUDA graphs, the parts that run on the host: bucket sizes and the staging layout
(the capture and replay themselves are covered on the GPU by the bench)."""
from types import SimpleNamespace

import numpy as np

from batchgen.engine.cuda_graphs import graph_batch_sizes, stage_decode_inputs
from batchgen.engine.input_batch import build_input_batch
from batchgen.engine.request import Request
from batchgen.sampling_params import SamplingParams


def test_graph_batch_sizes_cover_every_batch():
    sizes = graph_batch_sizes(1024)
    assert sizes[0] == 1 and sizes[-1] == 1024 and sizes == sorted(set(sizes))
    assert graph_batch_sizes(100)[-1] == 100
    assert all(b - a <= 64 for a, b in zip(sizes, sizes[1:]))  # padding stays bounded


def _decode_sched():
    reqs, blocks = [], [[3, 9], [5], [7, 2, 8]]
    for i, (prompt_len, table) in enumerate(zip((20, 10, 40), blocks)):
        r = Request(str(i), list(range(1, prompt_len + 1)), SamplingParams())
        r.output_token_ids = [100 + i]
        r.num_computed_tokens = r.num_tokens - 1
        reqs.append(r)
    return SimpleNamespace(requests=reqs, num_scheduled_tokens=[1, 1, 1],
                           num_computed_before=[r.num_computed_tokens for r in reqs],
                           block_ids=blocks, needs_sample=[True] * 3)


def test_staging_layout_pads_rows_and_keeps_the_table_narrow():
    batch = build_input_batch(_decode_sched(), block_size=16)
    bs, nb = 4, batch.block_tables.shape[1]
    assert nb == 3  # the widest row, not max_model_len / block_size
    host = np.full(bs * (4 + nb), 777, dtype=np.int64)
    stage_decode_inputs(batch, bs, host)
    ids, pos, slots, lens = (host[k * bs:(k + 1) * bs] for k in range(4))
    assert ids.tolist() == [100, 101, 102, 0]
    assert pos.tolist() == [20, 10, 40, 0]
    # position 20 of request 0 sits in its 2nd block (9) at offset 4; padding writes nothing
    assert slots.tolist() == [9 * 16 + 4, 5 * 16 + 10, 8 * 16 + 8, -1]
    assert lens.tolist() == [21, 11, 41, 1]
    table = host[4 * bs:].reshape(bs, nb)
    assert table.tolist() == [[3, 9, 0], [5, 0, 0], [7, 2, 8], [0, 0, 0]]
