"""Dense attention of a run of fresh prompts: which requests a step gives it (host side), and
its output against the paged reference (CPU: torch's reference math; cuDNN on the GPU is in
test_kernels_gpu.py)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from batchgen.engine import model_runner
from batchgen.engine.input_batch import build_input_batch, find_dense_run
from batchgen.engine.model_runner import ModelRunner
from batchgen.engine.request import Request
from batchgen.kernels.prefill_attention import prefill_attention_ref
from batchgen.layers.dense_attention import cudnn_attention_works, dense_causal_attention
from batchgen.sampling_params import SamplingParams


def test_find_dense_run_takes_the_most_tokens_of_two_or_more_fresh_equal_prompts():
    q_lens = np.array([1, 1, 300, 64, 64, 64, 500, 100, 100, 100, 100, 5])
    starts = np.array([9, 9, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    # 64 x 3 (192 tokens) loses to 100 x 4 (400); the 300 on a prefix and the lone 500 never
    assert find_dense_run(q_lens, starts, 2, 1) == (7, 4)
    assert find_dense_run(q_lens, starts, 2, 401) is None  # too few tokens
    assert find_dense_run(q_lens[:6], starts[:6], 2, 1) == (3, 3)
    # a cached prefix breaks a run, and so do decodes before `first`
    assert find_dense_run(np.array([8, 8, 8]), np.array([0, 4, 0]), 0, 1) is None
    assert find_dense_run(np.array([1, 1]), np.array([0, 0]), 0, 1) == (0, 2)
    assert find_dense_run(np.array([1, 1]), np.array([0, 0]), 1, 1) is None
    assert find_dense_run(np.zeros(0, np.int64), np.zeros(0, np.int64), 0, 1) is None


def _sched(query_lens, computed):
    reqs = []
    for i, (q_len, before) in enumerate(zip(query_lens, computed)):
        r = Request(str(i), list(range(1, before + q_len + 1)), SamplingParams())
        r.num_computed_tokens = before
        reqs.append(r)
    tables = [list(range(10 * i, 10 * i + -(-(b + q) // 16))) for i, (q, b)
              in enumerate(zip(query_lens, computed))]
    return SimpleNamespace(requests=reqs, num_scheduled_tokens=list(query_lens),
                           num_computed_before=list(computed), block_ids=tables,
                           needs_sample=[True] * len(reqs))


def test_input_batch_marks_a_dense_run_only_when_asked_and_past_the_decodes():
    sched = _sched([5, 64, 64, 64, 30], [40, 0, 0, 0, 0])
    assert build_input_batch(sched, 16).dense_run is None  # off by default (CPU)
    batch = build_input_batch(sched, 16, dense_min_tokens=128)
    assert batch.dense_run == (1, 3)
    assert batch.dense_layout == (1, 3, 5, 64)  # + first token, query length
    assert build_input_batch(sched, 16, dense_min_tokens=193).dense_run is None
    # a pure decode step never looks
    decode = _sched([1, 1], [0, 0])
    assert build_input_batch(decode, 16, dense_min_tokens=1).dense_run is None


def test_runner_admits_at_most_max_dense_shapes_new_shapes(monkeypatch):
    monkeypatch.setattr(model_runner, "MAX_DENSE_SHAPES", 2)
    runner = SimpleNamespace(dense_shapes=set())

    def admitted(num_reqs, query_len):
        batch = SimpleNamespace(dense_run=(1, num_reqs),
                                dense_layout=(1, num_reqs, query_len, query_len))
        ModelRunner._admit_dense_shape(runner, batch)
        return batch.dense_run is not None

    assert admitted(3, 64) and admitted(4, 64) and admitted(3, 64)
    assert not admitted(5, 64)  # a third shape: the paged kernel takes it
    assert runner.dense_shapes == {(3, 64), (4, 64)}


@pytest.mark.parametrize("num_heads, num_kv_heads", [(8, 2), (4, 4)])
def test_dense_causal_attention_matches_the_paged_reference(num_heads, num_kv_heads):
    # q, k, v as strided views of one fused [T, (H + 2 KVH) * D] row each (the qkv output);
    # tokens 5.. hold three 7-token prompts; the reference reads them from a paged cache.
    head_dim, block_size, first, n, length = 16, 4, 5, 3, 7
    num_tokens = first + n * length + 2
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    q, k, v = (x.view(num_tokens, -1, head_dim) for x in qkv.split(
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1))
    out = dense_causal_attention(q, k, v, first, n, length, 0.3)
    assert out.shape == (n * length, num_heads * head_dim)

    blocks_per_req = -(-length // block_size)
    shape = (n * blocks_per_req, block_size, num_kv_heads, head_dim)
    key_cache, value_cache = torch.zeros(shape), torch.zeros(shape)
    run = slice(first, first + n * length)
    for name, src, cache in (("k", k, key_cache), ("v", v, value_cache)):
        padded = torch.zeros(n, blocks_per_req * block_size, num_kv_heads, head_dim)
        padded[:, :length] = src[run].view(n, length, num_kv_heads, head_dim)
        cache.copy_(padded.view(shape))
    tables = torch.arange(n * blocks_per_req, dtype=torch.int32).view(n, blocks_per_req)
    expected = prefill_attention_ref(
        q[run].contiguous(), key_cache, value_cache, tables,
        torch.arange(n + 1, dtype=torch.int32) * length,
        torch.full((n,), length, dtype=torch.int32), 0.3, length, length)
    torch.testing.assert_close(out, expected.reshape(n * length, -1), atol=1e-5, rtol=1e-5)


def test_cudnn_attention_is_never_used_off_cuda():
    assert not cudnn_attention_works(torch.device("cpu"))
