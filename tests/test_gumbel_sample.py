"""The fused sampling kernel against its torch reference (interpreter on CPU), and the
reference against a direct exponential race over the softmax."""
import os

import torch

if not torch.cuda.is_available():  # must precede the first `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from batchgen.kernels._triton import has_triton  # noqa: E402
from batchgen.kernels.gumbel_sample import (gumbel_sample, gumbel_sample_ref,  # noqa: E402
                                            token_noise_ref)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(not has_triton(), reason="triton is not installed")
@pytest.mark.parametrize("rows,vocab", [(1, 7), (3, 1000), (5, 2500)])
def test_kernel_matches_reference(rows, vocab):
    g = torch.Generator().manual_seed(rows * vocab)
    x = (torch.randn(rows, vocab, generator=g) * 3).to(DEVICE)
    x[:, ::3] = float("-inf")  # masked tokens (top-k / top-p) never win
    keys = torch.randint(0, 2**32, (rows,), generator=g).to(DEVICE)
    got = gumbel_sample(x, keys)
    assert torch.equal(got, gumbel_sample_ref(x, keys))
    assert bool((got % 3 != 0).all())
    # the model's half-precision logits and the temperature division, fused
    temperature = torch.rand(rows, generator=g).add_(0.3).to(DEVICE)
    half = x.to(torch.float16)
    want = gumbel_sample_ref(half.float() / temperature.unsqueeze(1), keys)
    assert torch.equal(gumbel_sample(half, keys, temperature), want)
    assert torch.equal(gumbel_sample_ref(half, keys, temperature), want)


@pytest.mark.skipif(not has_triton(), reason="triton is not installed")
@pytest.mark.parametrize("block,splits", [(256, 3), (128, 8), (1024, None)])
def test_vocabulary_splits_draw_the_same_tokens(block, splits):
    # 2,500 tokens cut into splits of whole blocks (the last one short); rows with every
    # token tied at +inf or -inf except a few check that the lowest winning token is taken
    # across splits, as one pass (and torch.argmax) would.
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 2500, generator=g) * 3
    x[0, [5, 900, 2400]] = float("inf")  # tied winners in three splits: token 5
    x[1, :] = float("-inf")
    x[1, [1800, 2499]] = 0.0  # the winner sits in a later split
    x = x.to(DEVICE)
    keys = torch.randint(0, 2**32, (6,), generator=g).to(DEVICE)
    temperature = torch.tensor([1.0, 1.0, 0.7, 1.0, 2.5, 1.0]).to(DEVICE)
    for temp in (None, temperature):
        got = gumbel_sample(x, keys, temp, tuning=(block, 4, splits))
        assert torch.equal(got, gumbel_sample_ref(x, keys, temp))
    assert got[0].item() == 5 and got[1].item() in (1800, 2499)


def test_reference_is_the_exponential_race():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 300, generator=g)
    keys = torch.randint(0, 2**32, (64,), generator=g)
    race = (torch.softmax(x, -1) / token_noise_ref(keys, 300)).argmax(-1)
    assert (gumbel_sample_ref(x, keys) == race).float().mean() > 0.98  # equal up to rounding


def test_frequencies_follow_the_softmax():
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    keys = torch.arange(20000, dtype=torch.int64) * 2654435761 % 2**32
    counts = torch.bincount(gumbel_sample_ref(x, keys), minlength=4).float() / 20000
    assert torch.allclose(counts, torch.softmax(x[0], -1), atol=0.015)
