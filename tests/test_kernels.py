"""Triton kernels against their torch references (the interpreter on CPU, natively on a GPU),
and the attention references against a float64 dense-softmax oracle."""
import os

import torch

if not torch.cuda.is_available():  # must precede the first `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from batchgen.kernels._triton import has_triton  # noqa: E402
from batchgen.kernels.decode_attention import decode_attention, decode_attention_ref  # noqa: E402
from batchgen.kernels.gate_up_silu import gate_up_silu, gate_up_silu_ref  # noqa: E402
from batchgen.kernels.prefill_attention import (prefill_attention,  # noqa: E402
                                                prefill_attention_ref)
from batchgen.kernels.rms_norm import rms_norm, rms_norm_ref  # noqa: E402
from batchgen.kernels.rotary_kv_write import (rotary_kv_write, rotary_kv_write_ref,  # noqa: E402
                                              rotate_ref)
from batchgen.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from paged_batches import decode_args, mixed_step, share_prefix  # noqa: E402  (as the sweep)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 is left out: the interpreter computes NaN for it (test_kernels_gpu.py covers bf16).
DTYPES = [torch.float32, torch.float16]
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}
needs_triton = pytest.mark.skipif(not has_triton(), reason="triton is not installed")


@pytest.fixture
def poisoned_empty():
    """torch.empty fills with NaN while active, so an output element a kernel forgets to
    write fails the comparison."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(was_deterministic)


def _randn(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


def _assert_close(actual, expected):
    assert not actual.isnan().any(), "NaN in the output: an element was not written"
    torch.testing.assert_close(actual, expected, **TOLERANCES[expected.dtype])


# --- paged KV fixtures: requests with holes in their block tables ----------------------------

def _paged_batch(query_lens, prefix_lens, num_heads, num_kv_heads, head_dim, block_size, dtype,
                 seed=0):
    """Caches with every request's blocks at random (unordered) ids, block tables padded with
    0, and NaN in every cache slot no request owns (past a request's end in its last block)."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [q + p for q, p in zip(query_lens, prefix_lens)]
    blocks_per_req = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 3  # spare blocks stay NaN
    block_ids = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_req) + 2, dtype=torch.int32)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(cache_shape, float("nan"))
    value_cache = torch.full(cache_shape, float("nan"))
    used = 0
    for b, (seq_len, num_req_blocks) in enumerate(zip(seq_lens, blocks_per_req)):
        ids = block_ids[used:used + num_req_blocks]
        used += num_req_blocks
        block_tables[b, :num_req_blocks] = ids
        slots = (ids[:, None] * block_size + torch.arange(block_size)).flatten()[:seq_len]
        key_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(
            seq_len, num_kv_heads, head_dim, generator=gen)
        value_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(
            seq_len, num_kv_heads, head_dim, generator=gen)
    query_start_loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()])
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen)

    def to_device(t, dt=None):
        return t.to(device=DEVICE, dtype=dt or t.dtype)
    return dict(q=to_device(q, dtype), key_cache=to_device(key_cache, dtype),
                value_cache=to_device(value_cache, dtype), block_tables=to_device(block_tables),
                query_start_loc=to_device(query_start_loc, torch.int32),
                seq_lens=to_device(torch.tensor(seq_lens), torch.int32),
                scale=head_dim ** -0.5, max_query_len=max(query_lens), max_seq_len=max(seq_lens))


def _dense_attention_oracle(batch):
    """Per request and head: gather keys slot by slot, softmax(q k^T * scale) v in float64."""
    q, key_cache, value_cache = batch["q"], batch["key_cache"], batch["value_cache"]
    block_size, num_kv_heads, head_dim = key_cache.shape[1:]
    group = q.shape[1] // num_kv_heads
    starts = batch["query_start_loc"].tolist()
    out = torch.empty(q.shape, dtype=torch.float64)
    for b, seq_len in enumerate(batch["seq_lens"].tolist()):
        blocks = batch["block_tables"][b].tolist()
        slots = [blocks[p // block_size] * block_size + p % block_size for p in range(seq_len)]
        keys = key_cache.reshape(-1, num_kv_heads, head_dim)[slots].double().cpu()
        values = value_cache.reshape(-1, num_kv_heads, head_dim)[slots].double().cpu()
        num_queries = starts[b + 1] - starts[b]
        for i in range(num_queries):
            visible = seq_len - num_queries + i + 1
            for h in range(q.shape[1]):
                scores = keys[:visible, h // group] @ q[starts[b] + i, h].double().cpu()
                probs = torch.softmax(scores * batch["scale"], dim=0)
                out[starts[b] + i, h] = probs @ values[:visible, h // group]
    return out


# (num_heads, num_kv_heads, head_dim, block_size): GQA 4:1 and 1:1, SmolLM's 3:1 with dim 64
ATTENTION_SHAPES = [(8, 2, 64, 16), (4, 4, 128, 32), (9, 3, 64, 16), (4, 1, 32, 8)]
QUERY_LENS, PREFIX_LENS = [1, 7, 33, 1, 5], [0, 5, 20, 40, 0]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_prefill_attention_ref_matches_dense_oracle(shape):
    num_heads, num_kv_heads, head_dim, block_size = shape
    batch = _paged_batch(QUERY_LENS, PREFIX_LENS, num_heads, num_kv_heads, head_dim,
                         block_size, torch.float32)
    out = prefill_attention_ref(**batch)
    torch.testing.assert_close(out.double().cpu(), _dense_attention_oracle(batch),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", ATTENTION_SHAPES[:2])
def test_decode_attention_ref_matches_dense_oracle(shape):
    num_heads, num_kv_heads, head_dim, block_size = shape
    batch = _paged_batch([1, 1, 1], [0, 16, 70], num_heads, num_kv_heads, head_dim, block_size,
                         torch.float32)
    out = decode_attention_ref(batch["q"], batch["key_cache"], batch["value_cache"],
                               batch["block_tables"], batch["seq_lens"], batch["scale"],
                               batch["max_seq_len"])
    torch.testing.assert_close(out.double().cpu(), _dense_attention_oracle(batch),
                               rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_prefill_attention_matches_ref(shape, dtype, poisoned_empty):
    num_heads, num_kv_heads, head_dim, block_size = shape
    batch = _paged_batch(QUERY_LENS, PREFIX_LENS, num_heads, num_kv_heads, head_dim,
                         block_size, dtype)
    _assert_close(prefill_attention(**batch), prefill_attention_ref(**batch))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_attention_long_chunk_spans_many_tiles(dtype, poisoned_empty):
    # 70 queries * 4 heads = 280 rows: three 128-row tiles; keys run past several 64-key tiles.
    batch = _paged_batch([70, 2], [60, 130], 4, 1, 64, 16, dtype, seed=1)
    _assert_close(prefill_attention(**batch), prefill_attention_ref(**batch))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_decode_attention_matches_ref(shape, num_splits, dtype):
    num_heads, num_kv_heads, head_dim, block_size = shape
    batch = _paged_batch([1] * 4, [0, 16, 150, 299], num_heads, num_kv_heads, head_dim,
                         block_size, dtype, seed=2)
    out = torch.full_like(batch["q"], float("nan"))
    result = decode_attention(*decode_args(batch), out=out, num_splits=num_splits)
    assert result is out
    _assert_close(out, decode_attention_ref(*decode_args(batch)))


def _share_prefix(batch, num_blocks):
    """Every request's table starts with request 0's first blocks (a cached prompt prefix):
    the keys there become request 0's, for the reference as for the kernels."""
    num_keys = num_blocks * batch["key_cache"].shape[1]
    share_prefix(batch, num_keys, batch["key_cache"].shape[1])
    return torch.tensor([num_keys], dtype=torch.int32, device=DEVICE)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("shape", [ATTENTION_SHAPES[0], ATTENTION_SHAPES[2], ATTENTION_SHAPES[3]])
def test_decode_attention_cascade_matches_ref(shape, num_splits, dtype, poisoned_empty):
    # 7 requests (9 with padding-like rows of one key); 2 shared blocks, i.e. keys the
    # shared-prefix kernel's 64-key tiles end on a partial one.
    num_heads, num_kv_heads, head_dim, block_size = shape
    batch = _paged_batch([1] * 7, [40, 70, 33, 99, 48, 2 * block_size, 130], num_heads,
                         num_kv_heads, head_dim, block_size, dtype, seed=7)
    shared = _share_prefix(batch, 2)
    expected = decode_attention_ref(*decode_args(batch))
    _assert_close(decode_attention(*decode_args(batch), num_splits=num_splits,
                                   shared_prefix_len=shared), expected)
    # a length of 0 (what a captured graph gets when no prefix is shared) is plain decode
    _assert_close(decode_attention(*decode_args(batch), num_splits=num_splits,
                                   shared_prefix_len=torch.zeros_like(shared)), expected)


@needs_triton
def test_decode_attention_cascade_reads_shared_keys_once_from_request_0():
    # The kernels trust the caller: with tables that do not share, request 1's prefix keys
    # are taken from request 0's blocks, so its output changes and request 0's does not.
    batch = _paged_batch([1, 1], [64, 64], 8, 2, 64, 16, torch.float32, seed=8)
    expected = decode_attention_ref(*decode_args(batch))
    shared = torch.tensor([32], dtype=torch.int32, device=DEVICE)
    out = decode_attention(*decode_args(batch), shared_prefix_len=shared)
    _assert_close(out[0], expected[0])
    assert not torch.allclose(out[1], expected[1], atol=1e-3)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared_blocks", [0, 2])
def test_mixed_step_leading_decodes_by_the_decode_kernel_match_ref(dtype, shared_blocks,
                                                                    poisoned_empty):
    # A mixed step as the engine lays it out on CUDA: 5 leading decodes for the decode
    # kernel (their shared prefix read once when there is one), then prompt chunks and a
    # trailing single query for the prefill kernel, both writing one output.
    num_decodes = 5
    batch = _paged_batch([1] * num_decodes + [7, 33, 1], [40, 70, 33, 99, 48, 40, 37, 52],
                         8, 2, 64, 16, dtype, seed=9)
    shared = _share_prefix(batch, shared_blocks) if shared_blocks else None
    expected = prefill_attention_ref(**batch)
    # the prefill kernel alone leaves the decodes' rows unwritten (NaN here)
    out = prefill_attention(**batch, first_req=num_decodes)
    assert out[:num_decodes].isnan().all()
    _assert_close(out[num_decodes:], expected[num_decodes:])

    layer, ctx = mixed_step(batch, num_decodes, shared)
    _assert_close(layer.attend(batch["q"], batch["key_cache"], batch["value_cache"], ctx),
                  expected)
    _assert_close(layer.attend_ref(batch["q"], batch["key_cache"], batch["value_cache"], ctx),
                  expected)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_attention_skips_a_dense_run_and_attends_the_rest(dtype, poisoned_empty):
    # Two leading decodes (first_req), then a chunk on a prefix, a run of three fresh 9-token
    # prompts that dense attention takes (skip: requests 3..5, 27 tokens), and a trailing
    # fresh prompt: the run's rows stay unwritten, every other row matches the reference.
    batch = _paged_batch([1, 1, 7, 9, 9, 9, 5], [30, 12, 40, 0, 0, 0, 0], 8, 2, 64, 16, dtype,
                         seed=10)
    expected = prefill_attention_ref(**batch)
    out = prefill_attention(**batch, first_req=2, skip=(3, 3, 27))
    run = slice(2 + 7, 2 + 7 + 27)
    assert out[:2].isnan().all() and out[run].isnan().all()
    _assert_close(out[2:run.start], expected[2:run.start])
    _assert_close(out[run.stop:], expected[run.stop:])
    with pytest.raises(ValueError, match="skip"):
        prefill_attention(**batch, first_req=4, skip=(3, 3, 27))  # overlaps the decodes


@needs_triton
def test_decode_attention_agrees_with_prefill_on_single_queries(poisoned_empty):
    batch = _paged_batch([1] * 3, [9, 40, 0], 8, 2, 64, 16, torch.float32, seed=3)
    _assert_close(decode_attention(*decode_args(batch), num_splits=2),
                  prefill_attention(**batch))


@needs_triton
def test_attention_tile_overrides_match_the_reference(poisoned_empty):
    # bench/kernel_sweep.py times other tiles through `tuning`: each must stay exact.
    batch = _paged_batch([1] * 3, [9, 70, 0], 8, 2, 64, 16, torch.float32, seed=4)
    expected = decode_attention_ref(*decode_args(batch))
    for tuning in [(32, 2, 1, False), (128, 8, 3, True)]:
        _assert_close(decode_attention(*decode_args(batch), num_splits=2, tuning=tuning),
                      expected)
    batch = _paged_batch([33, 1, 5], [40, 0, 17], 8, 2, 64, 16, torch.float32, seed=5)
    expected = prefill_attention_ref(**batch)
    for tuning in [(16, 32, 4, 2, True), (128, 128, 8, 3, False)]:
        _assert_close(prefill_attention(**batch, tuning=tuning), expected)


@needs_triton
def test_attention_wrappers_reject_bad_arguments():
    batch = _paged_batch([3], [0], 8, 2, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="heads"):
        prefill_attention(**{**batch, "q": batch["q"][:, :7]})
    with pytest.raises(ValueError, match="dtype"):
        prefill_attention(**{**batch, "q": batch["q"].half()})
    with pytest.raises(ValueError, match="query_start_loc"):
        prefill_attention(**{**batch, "query_start_loc": batch["query_start_loc"][:1]})
    with pytest.raises(ValueError, match="out"):
        decode_attention(*decode_args(batch), out=torch.empty(2, 8, 64, device=DEVICE))
    with pytest.raises(ValueError, match="shared_prefix_len"):
        decode_attention(*decode_args(batch),
                         shared_prefix_len=torch.zeros(1, dtype=torch.int64, device=DEVICE))


# --- row-wise ops ---------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 333])
def test_rms_norm_matches_ref(num_tokens, dtype, poisoned_empty):
    x, weight = _randn(num_tokens, 100, dtype=dtype), _randn(100, dtype=dtype, seed=1)
    _assert_close(rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6))


def test_rms_norm_ref_matches_float64_formula():
    x, weight = _randn(7, 100, dtype=torch.float16), _randn(100, dtype=torch.float16, seed=1)
    x64 = x.double()
    expected = x64 / torch.sqrt((x64 ** 2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    torch.testing.assert_close(rms_norm_ref(x, weight, 1e-6).double(), expected,
                               rtol=4e-3, atol=4e-3)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 333])
def test_silu_and_mul_matches_ref(num_tokens, dtype, poisoned_empty):
    x = _randn(num_tokens, 2 * 77, dtype=dtype)
    _assert_close(silu_and_mul(x), silu_and_mul_ref(x))


def test_silu_and_mul_ref_is_gate_times_sigmoid_times_up():
    x = _randn(5, 8).double()
    expected = x[:, :4] * torch.sigmoid(x[:, :4]) * x[:, 4:]
    torch.testing.assert_close(silu_and_mul_ref(x), expected)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 333])
@pytest.mark.parametrize("num_programs", [1, 3, 64])
def test_gate_up_silu_matches_ref(num_tokens, num_programs, dtype, poisoned_empty):
    # I = 40 leaves a partial column tile (the descriptors clip it), H = 96 three K tiles; the
    # persistent grid is one program, fewer programs than tiles, or one program a tile.
    x = _randn(num_tokens, 96, dtype=dtype)
    weight = (_randn(2 * 40, 96, seed=1) * 96 ** -0.5).to(dtype)
    out = gate_up_silu(x, weight, config=(16, 32, 32, 2, 2, 4), num_programs=num_programs)
    _assert_close(out, gate_up_silu_ref(x, weight))


@pytest.mark.parametrize("num_tokens, intermediate, in_graph, eager", [
    (512, 14336, False, False),   # llama3-8b: 448 tiles, the fourth wave 39% full (0.95x)
    (768, 14336, False, False),   # 672 tiles, the sixth wave 9% full (1.00x)
    (832, 14336, True, False),    # 784 tiles, 99% of six waves (1.11x); eager: too small
    (1024, 14336, True, True),
    (1152, 14336, True, True),    # 1,008 tiles, 95% of eight waves
    (16384, 14336, True, True),
    (512, 8192, True, False),     # llama-1b: 256 tiles, 97% of two waves (1.06x)
    (640, 8192, False, False),    # 320 tiles, 81% of three waves
    (1152, 8192, False, False),   # 576 tiles, 87% of five waves
    (256, 8192, False, False),    # under MIN_TOKENS
])
def test_gate_up_silu_pays_off_where_its_tiles_fill_their_waves(num_tokens, intermediate,
                                                                 in_graph, eager):
    from batchgen.kernels.gate_up_silu import pays_off
    assert pays_off(num_tokens, intermediate, num_sms=132, eager=False) == in_graph
    assert pays_off(num_tokens, intermediate, num_sms=132, eager=True) == eager


def test_gate_up_silu_ref_is_silu_and_mul_of_the_projection():
    x, weight = _randn(5, 16), _randn(2 * 8, 16, seed=1)
    torch.testing.assert_close(gate_up_silu_ref(x, weight), silu_and_mul_ref(x @ weight.T))


@needs_triton
def test_gate_up_silu_refuses_bad_args():
    x, weight = _randn(4, 16), _randn(2 * 8, 16)
    with pytest.raises(ValueError, match="input features"):
        gate_up_silu(x, _randn(2 * 8, 12))
    with pytest.raises(ValueError, match="even count"):
        gate_up_silu(x, _randn(15, 16))
    with pytest.raises(ValueError, match="share a dtype"):
        gate_up_silu(x, weight.half())
    with pytest.raises(ValueError, match="16-byte aligned"):
        gate_up_silu(_randn(4, 10), _randn(2 * 8, 10))
    with pytest.raises(ValueError, match="config must be"):
        gate_up_silu(x, weight, config=(16, 32, 32))


def _cos_sin_cache(max_position, rot_dim, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq
    return torch.cat((angles.cos(), angles.sin()), dim=-1).float().to(DEVICE)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens, is_neox", [(1, True), (7, True), (333, True), (7, False)])
def test_rotary_kv_write_matches_ref(num_tokens, is_neox, dtype):
    # 9 q heads over 3 kv heads; every third token a padding one (slot -1: q rotated, no store)
    num_blocks, block_size = 30, 16
    gen = torch.Generator().manual_seed(0)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[1::3] = -1
    slots = slots.to(DEVICE)
    positions = torch.randint(0, 500, (num_tokens,), generator=gen).to(DEVICE)
    q = _randn(num_tokens, 9, 64, dtype=dtype)
    k, v = _randn(num_tokens, 3, 64, dtype=dtype, seed=1), _randn(num_tokens, 3, 64, dtype=dtype, seed=2)
    k_before = k.clone()
    cos_sin = _cos_sin_cache(500, 64)
    caches = [torch.full((num_blocks, block_size, 3, 64), float("nan"), dtype=dtype,
                         device=DEVICE) for _ in range(4)]
    expected_q = rotary_kv_write_ref(q.clone(), k, v, positions, cos_sin, caches[2], caches[3],
                                     slots, is_neox)
    out_q = rotary_kv_write(q, k, v, positions, cos_sin, caches[0], caches[1], slots, is_neox)
    assert out_q.data_ptr() == q.data_ptr() and torch.equal(k, k_before)
    _assert_close(out_q, expected_q)
    for got, want in zip(caches[:2], caches[2:]):
        assert torch.equal(got.isnan(), want.isnan())  # the same slots written, no others
        _assert_close(got.nan_to_num(), want.nan_to_num())
    is_stored = slots >= 0
    stored_k = caches[2].view(-1, 3, 64)[slots[is_stored]]
    _assert_close(stored_k, rotate_ref(k[is_stored], positions[is_stored], cos_sin, is_neox))
    assert torch.equal(caches[3].view(-1, 3, 64)[slots[is_stored]], v[is_stored])


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_kv_write_rotates_k_in_place_when_asked(dtype):
    # rotate_k (a dense run reads k from the step's own rows): k rotated in place, the cache
    # holding the same rotated keys; k's rows strided as in the fused qkv output.
    num_tokens, num_blocks, block_size = 11, 4, 16
    gen = torch.Generator().manual_seed(5)
    positions = torch.randint(0, 100, (num_tokens,), generator=gen).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(DEVICE)
    qkv = _randn(num_tokens, (4 + 2 + 2) * 32, dtype=dtype, seed=6)
    q, k, v = (x.view(num_tokens, -1, 32) for x in qkv.split([128, 64, 64], dim=-1))
    k_before = k.clone()
    cos_sin = _cos_sin_cache(100, 32)
    caches = [torch.zeros(num_blocks, block_size, 2, 32, dtype=dtype, device=DEVICE)
              for _ in range(4)]
    ref_k = k.clone()
    rotary_kv_write_ref(q.clone(), ref_k, v, positions, cos_sin, caches[2], caches[3], slots,
                        rotate_k=True)
    rotary_kv_write(q, k, v, positions, cos_sin, caches[0], caches[1], slots, rotate_k=True)
    _assert_close(ref_k, rotate_ref(k_before, positions, cos_sin))
    _assert_close(k, ref_k)
    _assert_close(caches[0].view(-1, 2, 32)[slots], k)


@needs_triton
def test_rotary_kv_write_refuses_partial_rotary():
    q, k = _randn(2, 4, 64), _randn(2, 2, 64)
    caches = [torch.zeros(4, 16, 2, 64, device=DEVICE) for _ in range(2)]
    with pytest.raises(ValueError, match="whole head"):
        rotary_kv_write(q, k, k, torch.zeros(2, dtype=torch.int64, device=DEVICE),
                        _cos_sin_cache(10, 32), *caches,
                        torch.zeros(2, dtype=torch.int64, device=DEVICE))


def test_rotate_ref_matches_complex_rotation():
    # NeoX pairs (d, d + D/2) rotate as complex numbers x1 + i x2 by e^(i * pos * freq).
    q = _randn(6, 2, 16).double()
    positions = torch.tensor([0, 1, 5, 17, 99, 3], device=DEVICE)
    out_q = rotate_ref(q, positions, _cos_sin_cache(100, 16))
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    turn = torch.polar(torch.ones(6, 8, dtype=torch.float64),
                       positions.cpu().double()[:, None] * inv_freq)[:, None]
    rotated = torch.complex(q[..., :8].cpu(), q[..., 8:].cpu()) * turn
    torch.testing.assert_close(out_q.cpu(), torch.cat((rotated.real, rotated.imag), -1),
                               rtol=1e-5, atol=1e-5)


def test_references_import_and_run_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, pytest\n"
        "from batchgen.kernels.rms_norm import rms_norm, rms_norm_ref\n"
        "from batchgen.kernels.decode_attention import decode_attention_ref\n"
        "x = torch.randn(2, 8)\n"
        "assert rms_norm_ref(x, torch.ones(8), 1e-6).shape == (2, 8)\n"
        "with pytest.raises(RuntimeError, match='needs Triton'):\n"
        "    rms_norm(x, torch.ones(8), 1e-6)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


@needs_triton
def test_decode_attention_checks_once_per_step_with_a_plan_cache(poisoned_empty):
    # Two "layers" of one step share one check; a step of another batch size checks anew.
    plans: dict = {}
    for num_reqs in (4, 4, 3):
        batch = _paged_batch([1] * num_reqs, [16, 150, 299, 7][:num_reqs], 8, 2, 64, 16,
                             torch.float32, seed=num_reqs)
        _assert_close(decode_attention(*decode_args(batch), plan_cache=plans),
                      decode_attention_ref(*decode_args(batch)))
    assert len(plans) == 2
    with pytest.raises(ValueError, match="kv heads of dim"):  # a new shape is checked
        bad = _paged_batch([1], [5], 8, 2, 64, 16, torch.float32)
        decode_attention(bad["q"][..., :48], *decode_args(bad)[1:], plan_cache=plans)


@needs_triton
def test_prefill_attention_plan_cache_is_shared_across_layers(poisoned_empty):
    # Two "layers" of one step: same layout, other q and caches; one plan, built once.
    plans: dict = {}
    for seed in range(2):
        torch.manual_seed(seed)
        batch = _paged_batch(QUERY_LENS, PREFIX_LENS, 8, 2, 64, 16, torch.float32)
        _assert_close(prefill_attention(**batch, plan_cache=plans), prefill_attention_ref(**batch))
        assert len(plans) == 1


def test_pdl_kernels_get_the_switch_at_each_launch():
    # A kernel declared @jit(pdl=True) is launched with PDL (and Triton's launch_pdl) as
    # pdl_enabled() says at that launch; a plain kernel gets neither.
    from batchgen.kernels import _triton

    calls = []

    class Launcher:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    pdl_kernel = _triton.LazyKernel(lambda: None, {"pdl": True})
    plain_kernel = _triton.LazyKernel(lambda: None, {})
    pdl_kernel._kernel = plain_kernel._kernel = Launcher()
    try:
        _triton.set_pdl(True)
        pdl_kernel[(3,)](1, BLOCK=4)
        plain_kernel[(3,)](1)
        _triton.set_pdl(False)
        pdl_kernel[(2, 5)](7)
        _triton.set_pdl(None)  # decided again: off without a CUDA GPU of sm_90+
        assert _triton.pdl_enabled() is (torch.cuda.is_available() and has_triton()
                                         and torch.cuda.get_device_capability() >= (9, 0))
    finally:
        _triton.set_pdl(None)
    assert calls == [((3,), (1,), {"BLOCK": 4, "PDL": True, "launch_pdl": True}),
                     ((3,), (1,), {}), ((2, 5), (7,), {"PDL": False})]
