"""The sampling kernels against their torch reference (interpreter on CPU), and the reference
against the softmax it inverts."""
import os

import torch

if not torch.cuda.is_available():  # must precede the first `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from batchgen.kernels._triton import has_triton  # noqa: E402
from batchgen.kernels.cdf_sample import (cdf_sample, cdf_sample_ref, row_keys,  # noqa: E402
                                         row_uniforms)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not has_triton(), reason="triton is not installed")


@needs_triton
@pytest.mark.parametrize("rows,vocab,split_blocks", [(1, 7, 4), (3, 1000, 4), (5, 2500, 1),
                                                     (4, 9000, 2)])
def test_kernel_matches_reference(rows, vocab, split_blocks):
    g = torch.Generator().manual_seed(rows * vocab)
    x = (torch.randn(rows, vocab, generator=g) * 3).to(DEVICE)
    x[:, ::3] = float("-inf")  # masked tokens (top-k / top-p) are never drawn
    keys = torch.randint(0, 2**32, (rows,), generator=g).to(DEVICE)
    got = cdf_sample(x, keys, split_blocks=split_blocks)
    assert torch.equal(got, cdf_sample_ref(x, keys))
    assert bool((got % 3 != 0).all())
    # the model's half-precision logits and the temperature division, in the kernels
    temperature = torch.rand(rows, generator=g).add_(0.3).to(DEVICE)
    half = x.to(torch.float16)
    want = cdf_sample_ref(half.float() / temperature.unsqueeze(1), keys)
    assert torch.equal(cdf_sample(half, keys, temperature, split_blocks), want)
    assert torch.equal(cdf_sample_ref(half, keys, temperature), want)


@needs_triton
def test_edges_of_the_cdf():
    # 5,000 tokens in five 1,024-token splits: the draw lands in the split the CDF passes u.
    vocab = 5000
    x = torch.full((6, vocab), float("-inf"))
    x[0, [1800, 4999]] = 0.0  # two tokens of mass, in two splits
    x[1, 4321] = 3.0  # one token of mass, in the last split
    x[2, 0] = 1.0  # the first token only
    x[3] = 0.0  # uniform over all
    x[4, :] = torch.linspace(-5, 5, vocab)
    # row 5: no token of mass at all: token 0, never out of range
    keys = torch.tensor([0, 2**32 - 1, 2**32 - 1, 2**32 - 1, 2**31, 2**32 - 1])
    want = cdf_sample_ref(x, keys)
    got = cdf_sample(x.to(DEVICE), keys.to(DEVICE), split_blocks=1).cpu()
    assert torch.equal(got, want)
    assert got[0].item() == 1800  # u near 0: the first token of mass
    assert got[1].item() == 4321 and got[2].item() == 0
    assert got[3].item() == vocab - 1  # u near 1 over uniform mass: the last token
    assert got[5].item() == 0
    u = row_uniforms(keys[4:5])
    cdf = torch.softmax(x[4].double(), 0).cumsum(0)
    assert cdf[got[4] - 1] <= u.double() < cdf[got[4]]


def test_reference_draws_the_softmax():
    x = torch.tensor([[2.0, 1.0, float("-inf"), 0.0, -1.0]]).repeat(40000, 1)
    keys = row_keys(torch.arange(40000), torch.zeros(40000, dtype=torch.int64))
    counts = torch.bincount(cdf_sample_ref(x, keys), minlength=5).double()
    expected = torch.softmax(x[0].double(), -1) * 40000
    assert counts[2] == 0
    keep = expected > 0
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    assert chi2 < 25.0  # 3 degrees of freedom: P(chi2 > 25) ~ 2e-5
    # the temperature flattens the draws as the softmax of x / t
    t = torch.full((40000,), 3.0)
    counts = torch.bincount(cdf_sample_ref(x, keys, t), minlength=5).double()
    expected = torch.softmax(x[0].double() / 3, -1) * 40000
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    assert chi2 < 25.0


def test_kernel_refuses_bad_shapes():
    if not has_triton():
        pytest.skip("triton is not installed")
    x = torch.zeros(2, 10, device=DEVICE)
    with pytest.raises(ValueError, match="keys"):
        cdf_sample(x, torch.zeros(3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        cdf_sample(x, torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="temperature"):
        cdf_sample(x, torch.zeros(2, dtype=torch.int64, device=DEVICE),
                   torch.ones(3, device=DEVICE))
