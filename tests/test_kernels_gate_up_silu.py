"""The fused gate/up projection + SwiGLU kernel against its torch reference (the interpreter on
CPU, natively on a GPU), and in bf16 at Llama-8B's MLP shape on a GPU."""
import os

import torch

if not torch.cuda.is_available():  # must precede the first `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from batchgen.kernels._triton import has_triton  # noqa: E402
from batchgen.kernels.gate_up_silu import (default_config, gate_up_silu,  # noqa: E402
                                           gate_up_silu_ref)
from batchgen.kernels.silu_and_mul import silu_and_mul_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 is left out here: the interpreter computes NaN for it (the gpu test covers bf16).
TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=1e-4),
              torch.float16: dict(rtol=2e-2, atol=2e-2)}
needs_triton = pytest.mark.skipif(not has_triton(), reason="triton is not installed")
# Interpreter-sized tiles: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
SMALL_CONFIG = (16, 16, 16, 2, 4, 1)


@pytest.fixture
def poisoned_empty():
    """torch.empty fills with NaN while active, so an output element the kernel forgets to
    write fails the comparison."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(was_deterministic)


def _inputs(num_tokens, hidden, intermediate, dtype, seed=0, device=DEVICE):
    """x [T, H] and weight [2I, H] scaled so gate and up are about unit size."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)
    weight = torch.randn(2 * intermediate, hidden, generator=gen) * hidden ** -0.5
    return x.to(device=device, dtype=dtype), weight.to(device=device, dtype=dtype)


def _assert_close(actual, expected):
    assert not actual.isnan().any(), "NaN in the output: an element was not written"
    torch.testing.assert_close(actual, expected, **TOLERANCES[expected.dtype])


def test_ref_is_silu_and_mul_of_the_projection():
    x, weight = _inputs(5, 32, 24, torch.float32, device="cpu")
    torch.testing.assert_close(gate_up_silu_ref(x, weight), silu_and_mul_ref(x @ weight.T),
                               rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("intermediate", [48, 80])  # not a multiple of BLOCK_N: N tail masked
@pytest.mark.parametrize("num_tokens", [1, 7, 33, 70])  # 70: the large-batch tiles
def test_matches_ref_default_config(num_tokens, intermediate, dtype, poisoned_empty):
    x, weight = _inputs(num_tokens, 64, intermediate, dtype)
    _assert_close(gate_up_silu(x, weight), gate_up_silu_ref(x, weight))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 33, 70])  # 70: five row tiles, a short last group
def test_matches_ref_small_tiles(num_tokens, dtype, poisoned_empty):
    x, weight = _inputs(num_tokens, 64, 80, dtype)
    _assert_close(gate_up_silu(x, weight, config=SMALL_CONFIG), gate_up_silu_ref(x, weight))


@needs_triton
def test_hidden_tail_and_strided_x(poisoned_empty):
    # H = 80 is not a multiple of BLOCK_K = 32 (the masked K loop); x is a column slice.
    wide, weight = _inputs(9, 96, 48, torch.float32)
    x = wide[:, :80]
    weight = weight[:, :80].contiguous()
    _assert_close(gate_up_silu(x, weight, config=(16, 32, 32, 4, 4, 2)),
                  gate_up_silu_ref(x, weight))


@needs_triton
def test_empty_batch():
    x, weight = _inputs(0, 64, 48, torch.float32)
    assert gate_up_silu(x, weight).shape == (0, 48)


def test_default_config_covers_a_small_batch_with_one_row_tile():
    for num_tokens in (1, 7, 16, 33, 64):
        assert default_config(num_tokens)[0] >= max(16, num_tokens)
    for num_tokens in (1, 65, 4099):
        assert min(default_config(num_tokens)[:3]) >= 16  # tl.dot's smallest tile


@needs_triton
def test_rejects_bad_arguments():
    x, weight = _inputs(3, 64, 48, torch.float32)
    with pytest.raises(ValueError, match="gate_up_silu: weight has 32 input features"):
        gate_up_silu(x, weight[:, :32])
    with pytest.raises(ValueError, match="gate_up_silu: .*even"):
        gate_up_silu(x, weight[:95])
    with pytest.raises(ValueError, match="gate_up_silu: x must have dtype"):
        gate_up_silu(x.to(torch.int32), weight.to(torch.int32))
    with pytest.raises(ValueError, match="gate_up_silu: .*share a dtype"):
        gate_up_silu(x, weight.half())
    with pytest.raises(ValueError, match="gate_up_silu: want x"):
        gate_up_silu(x[0], weight)
    with pytest.raises(ValueError, match="gate_up_silu: weight must be contiguous"):
        gate_up_silu(x, weight.T.contiguous().T)
    with pytest.raises(ValueError, match="gate_up_silu: config"):
        gate_up_silu(x, weight, config=(16, 16, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 333, 4099])
def test_bf16_llama8b_shape(num_tokens):
    x, weight = _inputs(num_tokens, 4096, 14336, torch.bfloat16, device="cuda")
    torch.testing.assert_close(gate_up_silu(x, weight), gate_up_silu_ref(x, weight),
                               rtol=2e-2, atol=2e-2)
