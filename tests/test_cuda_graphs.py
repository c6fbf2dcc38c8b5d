"""Decode CUDA graphs, the parts that run on the host: bucket sizes and the staging layout
and, on the GPU, a replay against the eager forward."""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from batchgen.engine import input_batch
from batchgen.engine.cuda_graphs import graph_batch_sizes, stage_decode_inputs
from batchgen.engine.input_batch import (MIN_CASCADE_SAVED_KEYS,
                                         MIN_CASCADE_SHARED_PER_OWN_KEY, build_input_batch,
                                         shared_prefix_len)
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
    host = np.full(bs * (4 + nb) + 1, 777, dtype=np.int64)
    stage_decode_inputs(batch, bs, host)
    assert host[-1] == 0  # no block is shared
    ids, pos, slots, lens = (host[k * bs:(k + 1) * bs] for k in range(4))
    assert ids.tolist() == [100, 101, 102, 0]
    assert pos.tolist() == [20, 10, 40, 0]
    # position 20 of request 0 sits in its 2nd block (9) at offset 4; padding writes nothing
    assert slots.tolist() == [9 * 16 + 4, 5 * 16 + 10, 8 * 16 + 8, -1]
    assert lens.tolist() == [21, 11, 41, 1]
    table = host[4 * bs:-1].reshape(bs, nb)
    assert table.tolist() == [[3, 9, 0], [5, 0, 0], [7, 2, 8], [0, 0, 0]]


def _decode_batch(tables, seq_lens, block_size=16, query_lens=None, **kwargs):
    """Requests of seq_lens[i] tokens after the step; query_lens (default all 1) of them are
    this step's: a decode (one output token so far) or a prompt chunk."""
    query_lens = query_lens or [1] * len(seq_lens)
    reqs = []
    for i, (seq_len, q_len) in enumerate(zip(seq_lens, query_lens)):
        if q_len == 1:
            r = Request(str(i), list(range(1, seq_len)), SamplingParams())
            r.output_token_ids = [7]
        else:
            r = Request(str(i), list(range(1, seq_len + 1)), SamplingParams())
        r.num_computed_tokens = seq_len - q_len
        reqs.append(r)
    sched = SimpleNamespace(requests=reqs, num_scheduled_tokens=list(query_lens),
                            num_computed_before=[s - q for s, q in zip(seq_lens, query_lens)],
                            block_ids=tables, needs_sample=[True] * len(reqs))
    return build_input_batch(sched, block_size, **kwargs)


def test_shared_prefix_len_counts_whole_common_blocks_before_every_newest_key():
    tables = np.array([[4, 5, 6, 9], [4, 5, 6, 2], [4, 5, 8, 3]], dtype=np.int32)
    assert shared_prefix_len(tables, np.array([64, 60, 50]), 16) == 32  # block 6 is not common
    # request 2 writes its newest key (position 32) into block 8: the common 4, 5 stay
    assert shared_prefix_len(tables[:2], np.array([64, 33]), 16) == 32
    # its newest key is position 31, in block 5 (a block one request writes is never shared,
    # but the count must not rely on that)
    assert shared_prefix_len(tables[:2], np.array([64, 32]), 16) == 16
    assert shared_prefix_len(tables[:1], np.array([64]), 16) == 0  # one request: no cascade
    assert shared_prefix_len(tables[[0, 2]][:, ::-1].copy(), np.array([64, 64]), 16) == 0


def test_decode_batches_cascade_only_when_shared_keys_dominate_and_enough_reads_are_saved(
        monkeypatch):
    monkeypatch.setattr(input_batch, "MIN_CASCADE_SAVED_KEYS", 4096)
    blocks = 4096 // 16  # the prefix every table shares, in blocks
    prefix = list(range(1, blocks + 1))
    tables = [prefix + [1000 + i] for i in range(3)]
    lens = [blocks * 16 + 5] * 3
    batch = _decode_batch(tables, lens)
    assert batch.shared_prefix_len == 4096  # 2 of 3 requests skip 4096 reads each
    assert _decode_batch(tables[:1], lens[:1]).shared_prefix_len == 0
    short = [prefix[:8] + [1000 + i] for i in range(3)]  # 2 x 128 keys: not worth a launch
    assert _decode_batch(short, [8 * 16 + 5] * 3).shared_prefix_len == 0
    # at the default bar, 3 requests never pay: it takes a batch of hundreds
    monkeypatch.undo()
    assert _decode_batch(tables, lens).shared_prefix_len == 0
    assert MIN_CASCADE_SAVED_KEYS // 4096 > 64
    # 4096 shared keys against 3000 own ones each: L2 serves the prefix to the plain kernel
    long_own = [prefix + list(range(2000 + 200 * i, 2000 + 200 * i + 188)) for i in range(3)]
    own = int(4096 / MIN_CASCADE_SHARED_PER_OWN_KEY) + 904
    assert _decode_batch(long_own, [4096 + own] * 3).shared_prefix_len == 0


def test_mixed_steps_give_their_leading_decodes_to_the_decode_kernel_when_enough(monkeypatch):
    tables = [[1, 2, 10], [1, 2, 11], [1, 2, 12], [13, 14], [1, 2, 15]]
    seq_lens, query_lens = [40, 41, 42, 20, 43], [1, 1, 1, 5, 1]  # 3 decodes, a chunk, 1
    for min_decodes, expected in [(None, 0), (1, 3), (3, 3), (4, 0)]:
        batch = _decode_batch(tables, seq_lens, query_lens=query_lens,
                              min_mixed_decodes=min_decodes)
        assert (batch.is_decode_only, batch.num_decodes) == (False, expected)
    # a decode step's requests all go to the decode kernel, with or without the bar
    decode = _decode_batch(tables[:3], seq_lens[:3], min_mixed_decodes=None)
    assert (decode.is_decode_only, decode.num_decodes) == (True, 3)
    # the cascade looks at the decode kernel's requests alone: the chunk shares nothing
    monkeypatch.setattr(input_batch, "MIN_CASCADE_SAVED_KEYS", 64)
    monkeypatch.setattr(input_batch, "MIN_CASCADE_SHARED_PER_OWN_KEY", 0.5)
    assert _decode_batch(tables, seq_lens, query_lens=query_lens,
                         min_mixed_decodes=3).shared_prefix_len == 32
    assert _decode_batch(tables, seq_lens, query_lens=query_lens,
                         min_mixed_decodes=None).shared_prefix_len == 0


@pytest.mark.gpu
@pytest.mark.parametrize("shared_blocks, fused", [(0, False), (1, False), (0, True)])
def test_graph_replay_matches_the_eager_forward(shared_blocks, fused, monkeypatch):
    """A decode step replayed from its captured graph (padded to its bucket) gives the eager
    forward's hidden states; with a shared first block, the cascade graph (prefix keys read
    once for the batch) gives what the eager forward gets reading them per request. fused: in
    bf16, buckets where it pays off (from 32 rows here, on one SM) capture the fused MLP
    (test_models checks it against cuBLAS and silu_and_mul)."""
    import torch

    from batchgen.config import EngineConfig
    from batchgen.engine.model_runner import ModelRunner
    from test_models import ours_from, perturbed_hf_model, tiny_config

    device = torch.device("cuda")
    dtype = torch.bfloat16 if fused else torch.float32
    model = ours_from(perturbed_hf_model(tiny_config("llama3-untied"))).to(device, dtype)
    model.reset_buffers()  # the rotary table back in fp32
    config = EngineConfig(model="tiny", device="cuda", dtype=str(dtype)[6:], block_size=16)
    runner = ModelRunner(config, model, 256, device, dtype)
    if fused:
        if runner.fused_mlp_shape is None:
            pytest.skip("the fused MLP does not run on this GPU")
        from batchgen.kernels import gate_up_silu
        monkeypatch.setattr(gate_up_silu, "MIN_TOKENS", 32)
        runner.fused_mlp_shape = (runner.fused_mlp_shape[0], 1)
    runner.initialize_kv_cache(64)
    gen = torch.Generator().manual_seed(3)
    for key, value in runner.kv_caches:
        key.copy_(torch.randn(key.shape, generator=gen))
        value.copy_(torch.randn(value.shape, generator=gen))
    runner.capture_cuda_graphs(max_num_seqs=32)
    assert runner.graphs._context(32).fused_mlp == fused
    assert not runner.graphs._context(16).fused_mlp
    num_reqs = 21  # bucket 32: 11 padding rows
    lens = torch.randint(1 + 16 * shared_blocks, 48, (num_reqs,), generator=gen)
    tables = (torch.randperm(63, generator=gen)[:num_reqs * 3] + 1).view(num_reqs, 3).int()
    tables[:, :shared_blocks] = tables[0, :shared_blocks].clone()
    positions = (lens - 1).numpy()
    batch = SimpleNamespace(
        num_reqs=num_reqs, is_decode_only=True, block_tables=tables.numpy(),
        input_ids=torch.randint(0, 128, (num_reqs,), generator=gen).numpy(),
        positions=positions, seq_lens=lens.int().numpy(), shared_prefix_len=16 * shared_blocks,
        slot_mapping=tables.numpy()[np.arange(num_reqs), positions // 16].astype(np.int64) * 16
        + positions % 16)
    assert runner.graphs.can_run(batch)
    graphs = runner.graphs
    with torch.inference_mode():
        replayed = graphs.run(batch).clone()
        assert graphs.shared_prefix_len.item() == 16 * shared_blocks
        # the replay wrote this step's K/V; the eager forward writes the same values again
        ctx = graphs._context(32)
        eager_ctx = dataclasses.replace(
            ctx, query_start_loc=ctx.query_start_loc[:num_reqs + 1],
            **{name: getattr(ctx, name)[:num_reqs]
               for name in ("seq_lens", "block_tables", "slot_mapping")})
        eager = model(graphs.input_ids[:num_reqs], graphs.positions[:num_reqs], eager_ctx)
    # bf16: cuBLAS may sum 21 rows in another order than the bucket's 32
    tolerance = dict(atol=2e-2, rtol=2e-2) if fused else dict(atol=1e-4, rtol=0)
    torch.testing.assert_close(replayed, eager, **tolerance)


def _shared_prefix_run(model_dir, monkeypatch, device: str, **llm_kwargs):
    """32 prompts sharing 192 tokens (12 blocks) before 3-11 of their own, 16 greedy tokens
    each (fp32) -> (token ids per prompt, each step's shared_prefix_len)."""
    from batchgen import LLM, SamplingParams
    from batchgen.engine import model_runner

    # 31 x 192 shared keys: far below the bar a real batch needs, lowered to reach it here
    monkeypatch.setattr(input_batch, "MIN_CASCADE_SAVED_KEYS", 4096)
    shared_lens = []

    def spy(*args, **kwargs):
        batch = build_input_batch(*args, **kwargs)
        shared_lens.append(batch.shared_prefix_len)
        return batch
    monkeypatch.setattr(model_runner, "build_input_batch", spy)
    prefix = [(7 * k) % 120 + 5 for k in range(192)]
    prompts = [{"prompt_token_ids": prefix + [(11 * i + j) % 120 + 5 for j in range(3 + i % 9)]}
               for i in range(32)]
    llm = LLM(str(model_dir), device=device, dtype="float32", skip_tokenizer_init=True,
              max_model_len=256, num_kv_blocks=600, **llm_kwargs)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0,
                                                   ignore_eos=True))
    return [o.outputs[0].token_ids for o in outputs], shared_lens


@pytest.fixture
def tiny_model_dir(tmp_path):
    from test_models import perturbed_hf_model, tiny_config
    perturbed_hf_model(tiny_config("llama3-untied")).save_pretrained(tmp_path)
    return tmp_path


def test_engine_plans_cascade_decode_steps_for_a_shared_prefix(tiny_model_dir, monkeypatch):
    _, shared_lens = _shared_prefix_run(tiny_model_dir, monkeypatch, "cpu")
    assert shared_lens[0] == 0 and set(shared_lens[1:]) == {192}  # the prefill, then decodes
    _, shared_lens = _shared_prefix_run(tiny_model_dir, monkeypatch, "cpu",
                                        disable_cascade_attn=True)
    assert set(shared_lens) == {0}


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_cascade_decode_gives_the_tokens_of_plain_decode(tiny_model_dir, monkeypatch,
                                                          enforce_eager):
    """The engine with cascade decode steps (graphs, or eager) gives the tokens it gives
    without them."""
    tokens, shared_lens = _shared_prefix_run(tiny_model_dir, monkeypatch, "cuda",
                                             enforce_eager=enforce_eager)
    assert max(shared_lens) == 192
    plain, _ = _shared_prefix_run(tiny_model_dir, monkeypatch, "cuda",
                                  enforce_eager=enforce_eager, disable_cascade_attn=True)
    assert tokens == plain


def test_eager_step_segments_start_16_byte_aligned():
    # The eager path's staging: each array's device view starts on a 16-byte boundary, so a
    # kernel sees one pointer alignment whatever the batch size (one compiled variant).
    import torch

    from batchgen.engine.host_packer import send_arrays
    for num_reqs in (1, 3, 5):
        arrays = [np.arange(num_reqs + 1, dtype=np.int32), np.arange(num_reqs, dtype=np.int32),
                  np.arange(num_reqs * 3, dtype=np.int32).reshape(num_reqs, 3),
                  np.asarray([7], dtype=np.int32)]
        views = send_arrays("cpu", False, *arrays)
        for view, a in zip(views, arrays):
            assert view.data_ptr() % 16 == 0 and view.dtype == torch.int32
            assert np.array_equal(view.numpy(), a)
