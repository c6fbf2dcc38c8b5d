"""Piecewise graphs (engine/piecewise_graphs.py): a step with prompt tokens run as graph
pieces between eager attentions gives the eager forward's hidden states. On the CPU the pieces
run uncaptured (their staging through the static buffers is what is checked); on the GPU they
replay from graphs, padded to their bucket."""
from __future__ import annotations

import pytest
import torch

from batchgen.config import EngineConfig
from batchgen.engine.model_runner import ModelRunner
from batchgen.engine.piecewise_graphs import PiecewiseGraphs, bucket_sizes
from test_cuda_graphs import _decode_batch
from test_models import ours_from, perturbed_hf_model, tiny_config

NUM_BLOCKS = 512


def test_bucket_sizes():
    assert bucket_sizes(512) == list(range(32, 513, 32))
    assert bucket_sizes(100) == [32, 64, 96] and bucket_sizes(20) == [20]


def _mixed_batch(gen: torch.Generator, query_lens: list[int]):
    """Requests with a 16-47 token prefix in the cache and query_lens[i] new tokens (1: a
    decode), with random tables into a pool of NUM_BLOCKS."""
    num_reqs = len(query_lens)
    before = torch.randint(16, 48, (num_reqs,), generator=gen).tolist()
    seq_lens = [b + q for b, q in zip(before, query_lens)]
    width = -(-max(seq_lens) // 16)
    tables = (torch.randperm(NUM_BLOCKS - 1, generator=gen)[:num_reqs * width] + 1).view(num_reqs, width)
    return _decode_batch(tables.int().numpy(), seq_lens, query_lens=query_lens)


def _runner(kind: str, device: str, dtype: torch.dtype, gen: torch.Generator) -> ModelRunner:
    model = ours_from(perturbed_hf_model(tiny_config(kind))).to(device, dtype)
    model.reset_buffers()  # the rotary table back in fp32
    config = EngineConfig(model="tiny", device=device, dtype=str(dtype)[6:], block_size=16)
    runner = ModelRunner(config, model, 256, torch.device(device), dtype)
    runner.initialize_kv_cache(NUM_BLOCKS)
    for key, value in runner.kv_caches:
        key.copy_(torch.randn(key.shape, generator=gen).to(dtype))
        value.copy_(torch.randn(value.shape, generator=gen).to(dtype))
    return runner


def _compare(runner: ModelRunner, pieces: PiecewiseGraphs, batch, **tolerance) -> None:
    with torch.inference_mode():
        ctx, input_ids, positions, _ = runner._send_step(batch)
        staged = pieces.run(input_ids, positions, ctx).clone()
        # the pieces wrote this step's K/V; the eager forward writes the same values again
        eager = runner.model(input_ids, positions, ctx)
    torch.testing.assert_close(staged, eager, **tolerance)


@pytest.mark.parametrize("kind", ["llama3-untied", "qwen3"])
def test_pieces_give_the_forward(kind):
    gen = torch.Generator().manual_seed(5)
    runner = _runner(kind, "cpu", torch.float32, gen)
    pieces = PiecewiseGraphs(runner, max_tokens=64)
    assert pieces.can_run(64) and not pieces.can_run(65)
    # 3 decodes, then prompt chunks: 41 tokens (bucket 64: 23 padding rows), then 2 tokens
    for query_lens in ([1, 1, 1, 9, 20, 8], [2]):
        _compare(runner, pieces, _mixed_batch(gen, query_lens), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_piecewise_replay_matches_the_eager_forward(dtype):
    gen = torch.Generator().manual_seed(7)
    runner = _runner("llama3-untied", "cuda", dtype, gen)
    runner.capture_cuda_graphs(max_num_seqs=32)
    pieces = runner.piecewise
    assert pieces is not None and sorted(pieces.graphs) == bucket_sizes()
    # decodes ahead of prompt chunks (the mixed split's decode kernel), and a lone chunk
    for query_lens in ([1] * 24 + [40, 17, 3], [5], [200, 100, 1]):
        batch = _mixed_batch(gen, query_lens)
        assert pieces.can_run(len(batch.input_ids))
        # bf16: cuBLAS may sum the bucket's padded rows in another order
        tolerance = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else \
            dict(atol=1e-4, rtol=0)
        _compare(runner, pieces, batch, **tolerance)
