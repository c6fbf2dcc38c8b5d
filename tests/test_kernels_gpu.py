"""The Triton kernels compiled for a real GPU, in bf16, at serving sizes (skipped without CUDA)."""
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
from paged_batches import (decode_args, mixed_step, paged_batch,  # noqa: E402
                           share_prefix)  # (the sweep times the same batches)

from batchgen.kernels import gate_up_silu as gus
from batchgen.kernels.decode_attention import decode_attention, decode_attention_ref
from batchgen.kernels.prefill_attention import (padded_attention_ref, prefill_attention,
                                                prefill_attention_ref)
from batchgen.kernels.rms_norm import rms_norm, rms_norm_ref
from batchgen.kernels.rotary_kv_write import rotary_kv_write, rotary_kv_write_ref
from batchgen.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref

pytestmark = pytest.mark.gpu
BF16 = dict(rtol=2e-2, atol=2e-2)


# (num_heads, num_kv_heads, head_dim): Llama-8B-like, SmolLM2-135M, MHA with dim 256
SHAPES = [(32, 8, 128), (9, 3, 64), (4, 4, 256)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("query_lens, prefix_lens", [
    ([4099], [0]), ([1, 1000, 2000, 1, 7], [300, 0, 517, 4000, 33])])
def test_prefill_attention_bf16(shape, query_lens, prefix_lens):
    batch = paged_batch(query_lens, prefix_lens, *shape)
    torch.testing.assert_close(prefill_attention(**batch), prefill_attention_ref(**batch), **BF16)


@pytest.mark.parametrize("block_size", [8, 64, 128])
def test_prefill_attention_bf16_block_sizes(block_size):
    batch = paged_batch([300, 1, 77], [100, 900, 0], 16, 4, 128, block_size=block_size)
    torch.testing.assert_close(prefill_attention(**batch), prefill_attention_ref(**batch), **BF16)


@pytest.mark.parametrize("shape", SHAPES)
def test_decode_attention_bf16_long_context(shape):
    batch = paged_batch([1] * 5, [32767, 0, 4999, 100000, 250], *shape, seed=1)
    expected = decode_attention_ref(*decode_args(batch))
    torch.testing.assert_close(decode_attention(*decode_args(batch)), expected, **BF16)
    torch.testing.assert_close(decode_attention(*decode_args(batch), num_splits=1), expected,
                               **BF16)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_splits", [1, None])
def test_decode_attention_bf16_cascade(shape, num_splits):
    # 48 requests whose first 4,096 keys (256 blocks) are request 0's, contexts to 4,099+
    batch = paged_batch([1] * 48, [4096 + 37 * i for i in range(48)], *shape, seed=3)
    share_prefix(batch, 4096)
    shared = torch.tensor([4096], dtype=torch.int32, device="cuda")
    torch.testing.assert_close(
        decode_attention(*decode_args(batch), num_splits=num_splits, shared_prefix_len=shared),
        decode_attention_ref(*decode_args(batch)), **BF16)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shared", [0, 256])
def test_mixed_step_split_between_the_kernels_bf16(shape, shared):
    # 64 leading decodes by the decode kernel (cascade over a shared prefix), then chunks up
    # to 4,099 tokens and a trailing single query by the prefill kernel (layers/attention.py)
    lens = [(1, 300 + 7 * i) for i in range(64)] + [(4099, 0), (416, 256), (1, 33)]
    batch = paged_batch([q for q, _ in lens], [p for _, p in lens], *shape, seed=4)
    share_prefix(batch, shared)
    layer, ctx = mixed_step(batch, 64, torch.tensor([shared], dtype=torch.int32, device="cuda"))
    torch.testing.assert_close(
        layer.attend(batch["q"], batch["key_cache"], batch["value_cache"], ctx),
        prefill_attention_ref(**batch), **BF16)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_reqs, length", [(3, 1024), (2, 4099)])
def test_dense_causal_attention_bf16(shape, num_reqs, length):
    # cuDNN on a run of fresh prompts read from strided views of the fused qkv output, as the
    # engine calls it (layers/attention.py), against the padded fp32 reference.
    from batchgen.layers.dense_attention import cudnn_attention_works, dense_causal_attention
    if not cudnn_attention_works(torch.device("cuda")):
        pytest.skip("cuDNN's fused attention does not run on this GPU")
    num_heads, num_kv_heads, head_dim = shape
    first, num_tokens = 5, 5 + num_reqs * length + 3
    sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    qkv = torch.randn(num_tokens, sum(sizes), device="cuda", dtype=torch.bfloat16,
                      generator=torch.Generator(device="cuda").manual_seed(6))
    q, k, v = (x.view(num_tokens, -1, head_dim) for x in qkv.split(sizes, dim=1))
    out = dense_causal_attention(q, k, v, first, num_reqs, length, head_dim ** -0.5)
    run = slice(first, first + num_reqs * length)

    def per_request(x):
        return x[run].reshape(num_reqs, length, -1, head_dim)
    positions = torch.arange(length, device="cuda").expand(num_reqs, length)
    expected = padded_attention_ref(per_request(q), positions, per_request(k), per_request(v),
                                    head_dim ** -0.5)
    torch.testing.assert_close(out, expected.reshape(num_reqs * length, -1), **BF16)


def test_decode_attention_replays_in_a_cuda_graph():
    # Tables hold 1,000 tokens per request; the replay runs shorter contexts than the capture.
    batch = paged_batch([1] * 64, [999] * 64, 32, 8, 128, seed=2)
    args = list(decode_args(batch))
    args[-1] = 1024  # the graph's max_seq_len bucket
    out = torch.empty_like(batch["q"])
    decode_attention(*args, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(*args, out=out)
    batch["seq_lens"].copy_(torch.randint(1, 1001, (64,), device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, decode_attention_ref(*decode_args(batch)), **BF16)


def test_programmatic_dependent_launch_changes_no_output():
    # A decode step's chain of our kernels (norm, rotary + KV write, attention, SiLU, sampling)
    # replayed from a CUDA graph with each kernel launched by PDL, then plainly: same bits.
    from batchgen.kernels import _triton
    from batchgen.kernels.cdf_sample import cdf_sample

    if not _triton.pdl_enabled():
        pytest.skip("programmatic dependent launch needs sm_90+")
    gen = torch.Generator(device="cuda").manual_seed(4)
    batch = paged_batch([1] * 48, [700] * 48, 32, 8, 128, seed=4)
    args = list(decode_args(batch))
    hidden = torch.randn(48, 4096, device="cuda", generator=gen, dtype=torch.bfloat16)
    weight = torch.randn(4096, device="cuda", generator=gen, dtype=torch.bfloat16)
    keys = torch.randint(0, 2**32, (48,), device="cuda", generator=gen)
    positions = torch.full((48,), 700, device="cuda")
    cos_sin = torch.randn(1024, 128, device="cuda", generator=gen)
    slots = batch["block_tables"][:, 700 // 16].long() * 16 + 700 % 16

    def step():
        normed = rms_norm(hidden, weight, 1e-5)
        q = normed[:, :4096].reshape(48, 32, 128) * 0.05
        kv = normed[:, :2048].reshape(48, 16, 128)
        rotary_kv_write(q, kv[:, :8], kv[:, 8:], positions, cos_sin, args[1], args[2], slots,
                        is_neox=True)
        attended = decode_attention(q, *args[1:])
        act = silu_and_mul(torch.cat((attended.reshape(48, -1),) * 2, dim=1))
        return normed, attended, act, cdf_sample(act, keys)

    outputs = []
    try:
        for enabled in (True, False):
            _triton.set_pdl(enabled)
            caches = [args[1].clone(), args[2].clone()]
            step()  # compile outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                result = step()
            args[1].copy_(caches[0])
            args[2].copy_(caches[1])
            graph.replay()
            torch.cuda.synchronize()
            outputs.append([t.clone() for t in (*result, args[1], args[2])])
            args[1].copy_(caches[0])
            args[2].copy_(caches[1])
    finally:
        _triton.set_pdl(None)
    for with_pdl, without in zip(*outputs):
        assert torch.equal(with_pdl, without)


@pytest.mark.parametrize("num_tokens", [1, 4099])
def test_rowwise_ops_bf16(num_tokens):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen, dtype=torch.bfloat16)
    x, weight = randn(num_tokens, 4096), randn(4096)
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5), **BF16)
    gate_up = randn(num_tokens, 2 * 14336)
    torch.testing.assert_close(silu_and_mul(gate_up), silu_and_mul_ref(gate_up), **BF16)
    positions = torch.randint(0, 8192, (num_tokens,), device="cuda", generator=gen)
    cos_sin = torch.randn(8192, 128, device="cuda", generator=gen)
    caches = [torch.zeros(300, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
              for _ in range(4)]
    slots = torch.randperm(300 * 16, device="cuda", generator=gen)[:num_tokens]
    # q, k, v as the engine has them: views into one qkv projection; padding slots skipped
    q, k, v = (t.view(num_tokens, -1, 128)
               for t in randn(num_tokens, 6144).split([4096, 1024, 1024], dim=1))
    slots[::5] = -1
    want_q = rotary_kv_write_ref(q.clone(), k, v, positions, cos_sin, caches[2], caches[3],
                                 slots)
    rotary_kv_write(q, k, v, positions, cos_sin, caches[0], caches[1], slots)
    torch.testing.assert_close(q, want_q, **BF16)
    torch.testing.assert_close(caches[0], caches[2], **BF16)
    assert torch.equal(caches[1], caches[3])
    # rotate_k: k rotated in place as well (dense attention reads it there)
    want_k = k.clone()
    rotary_kv_write_ref(q.clone(), want_k, v, positions, cos_sin, caches[2], caches[3], slots,
                        rotate_k=True)
    rotary_kv_write(q, k, v, positions, cos_sin, caches[0], caches[1], slots, rotate_k=True)
    torch.testing.assert_close(k, want_k, **BF16)


@pytest.mark.parametrize("num_tokens", [1, 333, 1024, 4099])
@pytest.mark.parametrize("hidden, intermediate", [(4096, 14336), (576, 1536), (2048, 200)])
def test_gate_up_silu_bf16(num_tokens, hidden, intermediate):
    # Llama-8B's MLP, SmolLM2-135M's, and a partial column tile.
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(num_tokens, hidden, device="cuda", generator=gen, dtype=torch.bfloat16)
    weight = (torch.randn(2 * intermediate, hidden, device="cuda", generator=gen)
              * hidden ** -0.5).to(torch.bfloat16)
    assert gus.supports(weight)
    torch.testing.assert_close(gus.gate_up_silu(x, weight), gus.gate_up_silu_ref(x, weight),
                               **BF16)
    # The engine's path: the kernel against cuBLAS's projection rounded to bf16, then SwiGLU.
    torch.testing.assert_close(gus.gate_up_silu(x, weight), silu_and_mul(x @ weight.T), **BF16)


def test_gate_up_silu_compiles_once_for_any_token_count():
    # The token count changes every step: a kernel variant per count would stall a run.
    weight = torch.randn(2 * 256, 128, device="cuda", dtype=torch.bfloat16)

    def run(num_tokens):
        gus.gate_up_silu(torch.randn(num_tokens, 128, device="cuda", dtype=torch.bfloat16),
                         weight)
    run(1024)
    compiled = gus._gate_up_silu_kernel._kernel.device_caches[torch.cuda.current_device()][0]
    variants = len(compiled)
    for num_tokens in (1025, 1040, 2000, 4099):
        run(num_tokens)
    assert len(compiled) == variants
