"""Decode CUDA graphs, the parts that run on the host: bucket sizes and the staging layout
and, on the GPU, a replay against the eager forward."""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

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


@pytest.mark.gpu
def test_graph_replay_matches_the_eager_forward():
    """A decode step replayed from its captured graph (padded to its bucket) gives the eager
    forward's hidden states."""
    import torch

    from batchgen.config import EngineConfig
    from batchgen.engine.model_runner import ModelRunner
    from test_models import ours_from, perturbed_hf_model, tiny_config

    device = torch.device("cuda")
    model = ours_from(perturbed_hf_model(tiny_config("llama3-untied"))).to(device)
    config = EngineConfig(model="tiny", device="cuda", dtype="float32", block_size=16)
    runner = ModelRunner(config, model, 256, device, torch.float32)
    runner.initialize_kv_cache(64)
    gen = torch.Generator().manual_seed(3)
    for key, value in runner.kv_caches:
        key.copy_(torch.randn(key.shape, generator=gen))
        value.copy_(torch.randn(value.shape, generator=gen))
    runner.capture_cuda_graphs(max_num_seqs=32)
    num_reqs = 21  # bucket 32: 11 padding rows
    lens = torch.randint(1, 48, (num_reqs,), generator=gen)
    tables = (torch.randperm(63, generator=gen)[:num_reqs * 3] + 1).view(num_reqs, 3).int()
    positions = (lens - 1).numpy()
    batch = SimpleNamespace(
        num_reqs=num_reqs, is_decode_only=True, block_tables=tables.numpy(),
        input_ids=torch.randint(0, 128, (num_reqs,), generator=gen).numpy(),
        positions=positions, seq_lens=lens.int().numpy(),
        slot_mapping=tables.numpy()[np.arange(num_reqs), positions // 16].astype(np.int64) * 16
        + positions % 16)
    assert runner.graphs.can_run(batch)
    graphs = runner.graphs
    with torch.inference_mode():
        replayed = graphs.run(batch).clone()
        # the replay wrote this step's K/V; the eager forward writes the same values again
        ctx = graphs._context(32)
        eager_ctx = dataclasses.replace(
            ctx, query_start_loc=ctx.query_start_loc[:num_reqs + 1],
            **{name: getattr(ctx, name)[:num_reqs]
               for name in ("seq_lens", "block_tables", "slot_mapping")})
        eager = model(graphs.input_ids[:num_reqs], graphs.positions[:num_reqs], eager_ctx)
    torch.testing.assert_close(replayed, eager, atol=1e-4, rtol=0)
