"""Sampler + SamplingMetadata on CPU with toy logits: exact greedy / penalties / masks,
allowed sets of top-k / top-p / min-p, batch-independent seeding, and the distribution."""
from __future__ import annotations

import pytest
import torch

from batchgen.engine.request import Request
from batchgen.engine.sampler import Sampler, _gather_logprobs, apply_penalties
from batchgen.engine.sampling_metadata import build_sampling_metadata
from batchgen.sampling_params import SamplingParams

EOS = 2


def make_req(seed: int = 0, output: list[int] | None = None, prompt: list[int] | None = None,
             **params) -> Request:
    req = Request(request_id=f"r{seed}", prompt_token_ids=prompt or [1, 3],
                  sampling_params=SamplingParams(**params), eos_token_ids=(EOS,), seed=seed)
    req.output_token_ids = list(output or [])
    return req


def sample(logits: torch.Tensor, reqs: list[Request]):
    meta = build_sampling_metadata(reqs, logits.shape[1], "cpu", pin_memory=False)
    return Sampler()(logits, meta)


# Five likely tokens then a tail of 27 unlikely ones: probs .4 .3 .15 .1 .05, tail 1e-4 each.
HEAD = [0.4, 0.3, 0.15, 0.1, 0.05]
PROBS = torch.tensor(HEAD + [1e-4] * 27)
LOGITS = PROBS.log()


def draw_many(num: int, **params) -> torch.Tensor:
    reqs = [make_req(seed=s, **params) for s in range(num)]
    return sample(LOGITS.expand(num, -1).clone(), reqs).sampled_token_ids


# ---- greedy ------------------------------------------------------------------------------

def test_all_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(7, 50)
    out = sample(logits, [make_req(s, temperature=0.0) for s in range(7)])
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.logprobs is None


def test_greedy_rows_exact_in_a_mixed_batch():
    torch.manual_seed(1)
    logits = torch.randn(6, 40)
    reqs = [make_req(s, temperature=0.0 if s % 2 else 1.5) for s in range(6)]
    meta = build_sampling_metadata(reqs, 40, "cpu")
    assert not meta.all_greedy and not meta.all_random
    assert meta.random_rows.tolist() == [0, 2, 4]
    out = Sampler()(logits, meta).sampled_token_ids
    assert torch.equal(out[1::2], logits[1::2].argmax(-1))


def test_top_k_one_equals_greedy():
    torch.manual_seed(2)
    logits = torch.randn(16, 64)
    out = sample(logits, [make_req(s, temperature=1.0, top_k=1) for s in range(16)])
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))


def test_logits_are_not_modified():
    torch.manual_seed(3)
    logits = torch.randn(4, 20)
    before = logits.clone()
    reqs = [make_req(s, output=[5, 5], temperature=0.7, top_k=5, top_p=0.9, min_p=0.05,
                     repetition_penalty=1.3, frequency_penalty=0.5, min_tokens=4)
            for s in range(4)]
    sample(logits, reqs)
    assert torch.equal(logits, before)


# ---- truncation: allowed sets --------------------------------------------------------------

@pytest.mark.parametrize("params, allowed", [
    (dict(top_k=3), {0, 1, 2}),
    (dict(top_p=0.75), {0, 1, 2}),  # mass above token 2 is .70 < .75; above token 3, .85
    (dict(top_p=0.65), {0, 1}),
    (dict(top_p=0.01), {0}),
    (dict(min_p=0.3), {0, 1, 2}),  # keep p >= .3 * .4 = .12
    (dict(top_k=4, top_p=0.75), {0, 1, 2}),
    (dict(top_k=2, min_p=0.1), {0, 1}),
])
def test_truncation_samples_exactly_the_allowed_set(params, allowed):
    tokens = draw_many(3000, temperature=1.0, **params)
    assert set(tokens.tolist()) == allowed


def test_top_k_top_p_per_row_in_one_batch():
    reqs = [make_req(s, temperature=1.0, top_k=2 if s % 2 else 0, top_p=1.0 if s % 2 else 0.65)
            for s in range(2000)]
    tokens = sample(LOGITS.expand(2000, -1).clone(), reqs).sampled_token_ids
    assert set(tokens[1::2].tolist()) == {0, 1}
    assert set(tokens[0::2].tolist()) == {0, 1}


def test_untruncated_rows_reach_the_tail():
    # top_p = 1 in a batch that uses top-p elsewhere must keep the whole vocabulary.
    reqs = [make_req(s, temperature=1.0, top_p=1.0 if s % 2 else 0.35) for s in range(4000)]
    tokens = sample(LOGITS.expand(4000, -1).clone(), reqs).sampled_token_ids
    assert set(tokens[0::2].tolist()) == {0}
    assert set(tokens[1::2].tolist()) >= set(range(5))
    assert (tokens[1::2] >= 5).any()  # the tail: 2000 draws, mass .0027


# ---- penalties and min_tokens -------------------------------------------------------------

def test_penalty_formulas_exact():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.0, 3.0],
                           [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                           [0.0, 4.0, -2.0, 2.0, 1.0, -1.0]])
    reqs = [make_req(0, prompt=[0, 1], output=[2, 2, 3], repetition_penalty=2.0),
            make_req(1, prompt=[0, 1], output=[2, 2, 3, 5]),  # no penalties
            make_req(2, prompt=[4], output=[1, 1, 1, 3], presence_penalty=0.5,
                     frequency_penalty=0.25)]
    meta = build_sampling_metadata(reqs, 6, "cpu")
    assert meta.penalties.rows.tolist() == [0, 2]
    got = apply_penalties(logits, meta.penalties)
    expected = logits.clone()
    # repetition over prompt + output tokens {0, 1, 2, 3}: positive / 2, negative * 2
    expected[0, :4] = torch.tensor([1.0, -2.0, 0.25, -1.0])
    # presence and frequency over the output only (token 4 of the prompt untouched)
    expected[2, 1] = 4.0 - 0.5 - 0.25 * 3
    expected[2, 3] = 2.0 - 0.5 - 0.25 * 1
    assert torch.equal(got, expected)
    assert meta.penalties.output_counts[1].tolist() == [0, 3, 0, 1, 0, 0]


def test_penalty_changes_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    assert sample(logits, [make_req(0, output=[0], temperature=0.0)]).sampled_token_ids == 0
    out = sample(logits, [make_req(0, output=[0], temperature=0.0, frequency_penalty=0.2)])
    assert out.sampled_token_ids.item() == 1


def test_min_tokens_suppresses_eos_and_stop_tokens_until_reached():
    logits = torch.tensor([[0.0, 0.0, 9.0, 0.0, 8.0, 1.0]])  # EOS = 2, then token 4
    def greedy(num_out: int, **params) -> int:
        req = make_req(0, output=[5] * num_out, temperature=0.0, **params)
        return sample(logits, [req]).sampled_token_ids.item()
    assert greedy(0, min_tokens=2) == 4
    assert greedy(1, min_tokens=2) == 4
    assert greedy(2, min_tokens=2) == EOS
    assert greedy(0, min_tokens=2, stop_token_ids=[4]) == 5
    # ignore_eos: EOS does not stop, so it is never masked
    assert greedy(0, min_tokens=2, ignore_eos=True) == EOS
    meta = build_sampling_metadata([make_req(0, min_tokens=3, stop_token_ids=[7, 4])], 6, "cpu")
    assert meta.min_tokens_rows.tolist() == [0, 0]
    assert meta.min_tokens_token_ids.tolist() == [EOS, 4]  # 7 is outside the vocabulary


# ---- seeding --------------------------------------------------------------------------------

def test_same_seed_same_token_whatever_the_batch():
    torch.manual_seed(4)
    target = torch.randn(1000)
    seeds = [11, 12345, 2**40 + 7, -3]
    for seed in seeds:
        alone = sample(target[None].clone(), [make_req(seed, output=[1] * 9, top_p=0.95)])
        # other rows: random and greedy neighbours, other params, target at row 5
        logits = torch.randn(8, 1000)
        logits[5] = target
        reqs = [make_req(100 + i, temperature=0.0 if i % 3 == 0 else 0.8, top_k=50)
                for i in range(8)]
        reqs[5] = make_req(seed, output=[7] * 9, top_p=0.95)
        crowd = sample(logits, reqs)
        assert crowd.sampled_token_ids[5] == alone.sampled_token_ids[0]
        assert not torch.equal(crowd.sampled_token_ids[[1, 2, 4, 7]],
                               torch.full((4,), alone.sampled_token_ids[0].item()))


def test_draws_depend_only_on_seed_and_position():
    sampler = Sampler()
    a = sampler.uniforms(torch.tensor([5, 9, 5]), torch.tensor([0, 0, 1]))
    b = sampler.uniforms(torch.tensor([7, 5]), torch.tensor([3, 1]))
    assert a[2] == b[1]
    assert a[0] != a[2] and a[0] != a[1]
    assert bool(((a > 0) & (a < 1)).all())


def test_different_positions_give_independent_draws():
    num = 400
    reqs = [make_req(77, output=[0] * pos) for pos in range(num)]
    tokens = sample(torch.zeros(num, 1000), reqs).sampled_token_ids
    # 400 uniform draws over 1000 tokens: about 330 distinct
    assert len(set(tokens.tolist())) > 300
    sampler = Sampler()
    for seeds, positions in ((torch.full((20000,), 3), torch.arange(20000)),
                             (torch.arange(20000) * 7919, torch.full((20000,), 5))):
        u = sampler.uniforms(seeds, positions).double()
        corr = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]
        assert abs(corr.item()) < 0.03
        assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.003
        # uniform over ten equal cells: chi-square with 9 degrees of freedom
        counts = torch.bincount((u * 10).long(), minlength=10).double()
        assert ((counts - 2000) ** 2 / 2000).sum().item() < 30.0


def test_frequencies_match_the_softmax():
    torch.manual_seed(5)
    logits = torch.randn(8) * 1.5
    temperature = 0.7
    num = 40000
    tokens = draw_many_from(logits, num, temperature=temperature)
    counts = torch.bincount(tokens, minlength=8).double()
    expected = torch.softmax(logits.double() / temperature, dim=0) * num
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 30.0  # 7 degrees of freedom: P(chi2 > 30) ~ 1e-4
    # a wrong temperature would be far off
    wrong = torch.softmax(logits.double(), dim=0) * num
    assert ((counts - wrong) ** 2 / wrong).sum().item() > 100


def draw_many_from(logits: torch.Tensor, num: int, **params) -> torch.Tensor:
    reqs = [make_req(s, **params) for s in range(num)]
    return sample(logits.expand(num, -1).clone(), reqs).sampled_token_ids


# ---- logprobs -------------------------------------------------------------------------------

def test_logprobs_are_raw_log_softmax_sorted():
    torch.manual_seed(6)
    logits = torch.randn(3, 30)
    reqs = [make_req(0, temperature=0.0, logprobs=4, output=[1], repetition_penalty=1.5),
            make_req(1, temperature=0.5, logprobs=2),
            make_req(2, temperature=1.0)]
    out = sample(logits, reqs)
    sampled_lp, sampled_rank, top_ids, top_lps = out.logprobs
    ref = torch.log_softmax(logits, dim=-1)
    assert top_ids.shape == (3, 4)
    assert (top_lps[:, :-1] >= top_lps[:, 1:]).all()
    assert torch.allclose(top_lps, ref.gather(1, top_ids))
    assert torch.equal(top_ids, ref.topk(4, dim=-1).indices)
    assert torch.allclose(sampled_lp, ref.gather(1, out.sampled_token_ids[:, None])[:, 0])
    # the sampled token's rank in the whole vocabulary, past the top-k too
    want_rank = [1 + int((ref[i] > ref[i, t]).sum()) for i, t in enumerate(out.sampled_token_ids)]
    assert sampled_rank.tolist() == want_rank


def test_sampled_rank_past_the_top_k():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    _, rank, top_ids, _ = _gather_logprobs(torch.log_softmax(logits, -1), torch.tensor([4]), 1)
    assert rank.tolist() == [5] and top_ids.tolist() == [[0]]


def test_logprobs_zero_gives_only_the_sampled_token():
    out = sample(torch.randn(2, 10), [make_req(0, logprobs=0), make_req(1)])
    assert out.logprobs[2].shape == (2, 0)
    assert out.logprobs[0].shape == out.logprobs[1].shape == (2,)


# ---- metadata -------------------------------------------------------------------------------

def test_metadata_fast_paths_and_fields():
    reqs = [make_req(0, temperature=0.8), make_req(2**63 + 5, output=[4, 4, 4], temperature=1.0)]
    meta = build_sampling_metadata(reqs, 100, "cpu")
    assert meta.all_random and not meta.all_greedy and meta.random_rows is None
    assert meta.top_k is None and meta.top_p is None and meta.min_p is None
    assert meta.penalties is None and meta.min_tokens_rows is None
    assert meta.max_num_logprobs is None
    assert meta.positions.tolist() == [0, 3]
    assert meta.seeds.dtype == torch.int64 and meta.seeds[1].item() == -(2**63) + 5
    assert meta.temperature.tolist() == pytest.approx([0.8, 1.0])

    reqs = [make_req(0, temperature=0.0, top_k=5), make_req(1, top_k=500, logprobs=3),
            make_req(2, temperature=1e-7, presence_penalty=0.1)]
    meta = build_sampling_metadata(reqs, 100, "cpu")
    assert meta.temperature.tolist() == [0.0, 1.0, 0.0]
    assert meta.top_k is None  # 500 >= V is off, and greedy rows never truncate
    assert meta.random_rows.tolist() == [1]
    assert meta.penalties.prompt_mask is None  # no repetition penalty in the batch
    assert meta.max_num_logprobs == 3


def _metadata_fields(meta) -> dict:
    out = {}
    for name, value in vars(meta).items():
        if name == "penalties" and value is not None:
            value = {k: v for k, v in vars(value).items()}
        out[name] = value
    return out


def _assert_same_metadata(a, b) -> None:
    fa, fb = _metadata_fields(a), _metadata_fields(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        x, y = fa[name], fb[name]
        if isinstance(x, dict):
            _assert_same_metadata_dict(x, y, name)
        elif isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype, name
            assert torch.equal(x, y), name
        else:
            assert x == y, name


def _assert_same_metadata_dict(x: dict, y: dict, where: str) -> None:
    assert y is not None and x.keys() == y.keys(), where
    for k in x:
        if x[k] is None or y[k] is None:
            assert x[k] is None and y[k] is None, (where, k)
        else:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), (where, k)


def test_shared_params_object_gives_the_same_metadata_as_copies():
    # Rows sharing one SamplingParams object (the job layer, LLM.generate) take the per-params
    # fast path; the metadata must equal that of rows with equal but distinct objects.
    kinds = [dict(temperature=0.7, top_p=0.9, seed=3),
             dict(temperature=0.0, min_tokens=4, stop_token_ids=[7, 5000]),
             dict(temperature=1.0, top_k=20, min_p=0.05, logprobs=2),
             dict(temperature=0.9, repetition_penalty=1.3, frequency_penalty=0.2, min_tokens=2),
             dict(temperature=1e-7, presence_penalty=0.5)]
    seeds = [0, 2**63 + 5, -3, 2**64 - 1, 12345, 2**70 + 9]
    vocab = 64
    for pattern in ([0] * 9, [1] * 9, [3] * 9, [0, 0, 1, 1, 2, 3, 3, 4, 0], [4, 2, 1, 0, 3, 2]):
        shared = [SamplingParams(max_tokens=16, **kind) for kind in kinds]
        reqs_shared, reqs_copies = [], []
        for row, k in enumerate(pattern):
            common = dict(request_id=f"r{row}", prompt_token_ids=[1, 3, row % vocab],
                          eos_token_ids=(EOS,), seed=seeds[row % len(seeds)])
            output = [row % 5] * (row % 4)
            a = Request(sampling_params=shared[k], **common)
            b = Request(sampling_params=SamplingParams(max_tokens=16, **kinds[k]), **common)
            a.output_token_ids, b.output_token_ids = list(output), list(output)
            reqs_shared.append(a)
            reqs_copies.append(b)
        _assert_same_metadata(build_sampling_metadata(reqs_shared, vocab, "cpu"),
                              build_sampling_metadata(reqs_copies, vocab, "cpu"))
    # The min_tokens rows and seeds wrap are the per-request values.
    sp = SamplingParams(max_tokens=16, min_tokens=2, stop_token_ids=[9])
    reqs = [Request(request_id=str(i), prompt_token_ids=[1], sampling_params=sp,
                    eos_token_ids=(EOS,), seed=s) for i, s in enumerate([-1, 2**64 + 7, 5])]
    reqs[1].output_token_ids = [4, 4]
    meta = build_sampling_metadata(reqs, vocab, "cpu")
    assert meta.seeds.tolist() == [-1, 7, 5]
    assert meta.min_tokens_rows.tolist() == [0, 0, 2, 2]
    assert meta.min_tokens_token_ids.tolist() == [EOS, 9, EOS, 9]


# ---- GPU --------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_matches_cpu_without_host_sync():
    torch.manual_seed(7)
    num, vocab = 64, 49152
    logits = torch.randn(num, vocab) * 3
    reqs = [make_req(s, output=[s % 7] * (s % 5), prompt=[1, 2, s],
                     temperature=0.0 if s % 4 == 0 else 0.9, top_k=40 if s % 3 else 0,
                     top_p=0.9 if s % 2 else 1.0, min_p=0.02 if s % 5 == 1 else 0.0,
                     repetition_penalty=1.2 if s % 6 == 1 else 1.0, min_tokens=3, logprobs=2)
            for s in range(num)]
    cpu = sample(logits, reqs)
    sampler = Sampler()
    logits_gpu = logits.cuda()
    sampler(logits_gpu, build_sampling_metadata(reqs, vocab, "cuda", pin_memory=True))  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        meta = build_sampling_metadata(reqs, vocab, "cuda", pin_memory=True)
        gpu = sampler(logits_gpu, meta)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    same = (gpu.sampled_token_ids.cpu() == cpu.sampled_token_ids).float().mean().item()
    assert same > 0.95  # the hash is exact; sums of exp may differ in the last bits
    assert torch.allclose(gpu.logprobs[3].cpu(), cpu.logprobs[3], atol=1e-4)
    seeds, positions = torch.tensor([1, 2**40]), torch.tensor([0, 5])
    assert torch.equal(sampler.uniforms(seeds.cuda(), positions.cuda()).cpu(),
                       sampler.uniforms(seeds, positions))


@pytest.mark.gpu
def test_cuda_plain_random_rows_sample_bf16_logits():
    """Temperature alone: the kernels read the model's bf16 logits (no fp32 copy) and draw
    what the CPU path draws from the same values."""
    torch.manual_seed(8)
    num, vocab = 48, 32000
    logits = (torch.randn(num, vocab) * 3).to(torch.bfloat16)
    reqs = [make_req(s, output=[5] * (s % 4), prompt=[1, s], temperature=0.5 + s / 40)
            for s in range(num)]
    cpu = sample(logits.float(), reqs)
    meta = build_sampling_metadata(reqs, vocab, "cuda", pin_memory=True)
    gpu = Sampler()(logits.cuda(), meta)
    same = (gpu.sampled_token_ids.cpu() == cpu.sampled_token_ids).float().mean().item()
    assert same > 0.95  # the hash and the division are exact; sums may differ in the last bits


@pytest.mark.gpu
def test_step_tokens_reach_the_host_without_waiting_for_later_work():
    """Overlapped steps: collecting step n must wait for step n alone, not for step n+1,
    which is already queued behind it (a .tolist() of the device tensor would)."""
    import time

    from batchgen.engine.model_runner import _to_host

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    tokens = torch.arange(8, device="cuda")
    (host,), ready = _to_host((tokens,))
    torch.cuda._sleep(4_000_000_000)  # the next step: seconds of GPU work queued behind
    t0 = time.perf_counter()
    ready.synchronize()
    waited = time.perf_counter() - t0
    assert host.tolist() == list(range(8))
    t0 = time.perf_counter()
    torch.cuda.synchronize()
    later = time.perf_counter() - t0
    assert later > 0.5 and waited < later / 4, (waited, later)  # the sleep ran after
