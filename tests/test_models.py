"""Our Llama-family models against transformers, logits compared in fp32 on the CPU.

Tiny random models (every weight, norm and bias perturbed so nothing is left at its
identity init) run through our paged forward: several prefills of different lengths in one
flat step, a mixed step (a chunk on top of a cached prefix beside a decode), and pure decode
steps, each compared with transformers' logits of the whole sequence at those positions."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from batchgen.layers.context import ForwardContext
from batchgen.layers.rotary import compute_inv_freq, rope_parameters
from batchgen.models.registry import create_model

ATOL = 1e-4
BLOCK_SIZE = 4
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)


def tiny_config(kind: str) -> transformers.PretrainedConfig:
    if kind == "llama3-untied":
        return transformers.LlamaConfig(**TINY, rope_parameters=LLAMA3_ROPE,
                                        tie_word_embeddings=False)
    if kind == "llama-tied":
        return transformers.LlamaConfig(**TINY, tie_word_embeddings=True)
    if kind == "mistral":
        return transformers.MistralConfig(**TINY, head_dim=16, sliding_window=None,
                                          tie_word_embeddings=False)
    if kind == "qwen2":
        return transformers.Qwen2Config(**TINY, tie_word_embeddings=True)
    if kind == "qwen3":  # head_dim on its own, not hidden / heads
        return transformers.Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=False)
    raise AssertionError(kind)


KINDS = ["llama3-untied", "llama-tied", "mistral", "qwen2", "qwen3"]


def perturbed_hf_model(config: transformers.PretrainedConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def ours_from(hf_model: torch.nn.Module) -> torch.nn.Module:
    model = create_model(hf_model.config)
    model.load_weights(hf_model.state_dict().items())
    return model.eval()


class PagedKV:
    """Caches for a few requests: block ids handed out in a shuffled order, so the test
    reads through real block tables rather than one contiguous range."""

    def __init__(self, model: torch.nn.Module, num_blocks: int = 48) -> None:
        shape = (num_blocks, BLOCK_SIZE, model.num_kv_heads, model.head_dim)
        weight = model.model.embed_tokens.weight
        self.device = weight.device
        self.kv_caches = [(weight.new_zeros(shape), weight.new_zeros(shape))
                          for _ in range(model.num_layers)]
        self.free_blocks = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1))
        self.free_blocks = self.free_blocks.tolist()
        self.blocks: dict[int, list[int]] = {}
        self.num_cached: dict[int, int] = {}

    def step(self, chunks: dict[int, list[int]]) -> tuple[torch.Tensor, torch.Tensor, ForwardContext]:
        """chunks: request id -> its new tokens this step. Returns input_ids, positions, ctx."""
        input_ids, positions, slots, starts, seq_lens = [], [], [], [0], []
        for req, tokens in chunks.items():
            cached = self.num_cached.get(req, 0)
            blocks = self.blocks.setdefault(req, [])
            seq_len = cached + len(tokens)
            while len(blocks) * BLOCK_SIZE < seq_len:
                blocks.append(self.free_blocks.pop())
            for pos in range(cached, seq_len):
                positions.append(pos)
                slots.append(blocks[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
            input_ids += tokens
            starts.append(starts[-1] + len(tokens))
            seq_lens.append(seq_len)
            self.num_cached[req] = seq_len
        max_blocks = max(len(self.blocks[r]) for r in chunks)
        table = [self.blocks[r] + [0] * (max_blocks - len(self.blocks[r])) for r in chunks]
        query_lens = [len(t) for t in chunks.values()]
        on_device = dict(device=self.device)
        ctx = ForwardContext(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, **on_device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, **on_device),
            block_tables=torch.tensor(table, dtype=torch.int32, **on_device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, **on_device),
            kv_caches=self.kv_caches, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            is_decode_only=all(n == 1 for n in query_lens))
        return (torch.tensor(input_ids, dtype=torch.int64, **on_device),
                torch.tensor(positions, dtype=torch.int64, **on_device), ctx)


def hf_logits(hf_model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0]  # [len, vocab]


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers_prefill_mixed_and_decode(kind):
    check_steps_against_transformers(kind, torch.device("cpu"), ATOL)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers_on_gpu(kind):
    # The Triton kernels may use TF32 in their dots: a looser bound than on the CPU.
    check_steps_against_transformers(kind, torch.device("cuda"), 5e-3)


def check_steps_against_transformers(kind: str, device: torch.device, atol: float) -> None:
    hf_model = perturbed_hf_model(tiny_config(kind))
    model = ours_from(hf_model).to(device)
    gen = torch.Generator().manual_seed(2)
    # Full token sequences of three requests; the steps below feed them piece by piece.
    seqs = {r: torch.randint(0, 128, (n,), generator=gen).tolist() for r, n in
            {0: 13, 1: 5, 2: 18}.items()}
    expected = {r: hf_logits(hf_model, s) for r, s in seqs.items()}
    kv = PagedKV(model)

    def run(chunks: dict[int, tuple[int, int]]) -> None:
        # chunks: request -> (start, end) of its tokens fed this step
        input_ids, positions, ctx = kv.step({r: seqs[r][a:b] for r, (a, b) in chunks.items()})
        with torch.no_grad():
            logits = model.compute_logits(model(input_ids, positions, ctx)).cpu()
        want = torch.cat([expected[r][a:b] for r, (a, b) in chunks.items()])
        torch.testing.assert_close(logits, want, atol=atol, rtol=0)

    run({0: (0, 10), 1: (0, 1), 2: (0, 7)})          # prefills of lengths 10, 1, 7
    run({0: (10, 11), 1: (1, 2), 2: (7, 15)})         # decodes beside a chunk on a prefix
    for pos in range(11, 13):                         # pure decode steps
        run({0: (pos, pos + 1), 1: (pos - 9, pos - 8), 2: (pos + 4, pos + 5)})


@pytest.mark.parametrize("kind", ["llama3-untied", "qwen3"])
def test_dense_run_of_fresh_prompts_matches_transformers(kind):
    # A step whose three fresh 6-token prompts are attended densely (torch's reference math
    # on the CPU) beside a 3-token prompt and a chunk on a cached prefix attended paged; the
    # next step's decodes then read the run's keys back from the cache.
    hf_model = perturbed_hf_model(tiny_config(kind))
    model = ours_from(hf_model)
    gen = torch.Generator().manual_seed(3)
    seqs = {r: torch.randint(0, 128, (n,), generator=gen).tolist()
            for r, n in {0: 12, 1: 4, 2: 8, 3: 8, 4: 8, 5: 6}.items()}
    expected = {r: hf_logits(hf_model, s) for r, s in seqs.items()}
    kv = PagedKV(model)

    def run(chunks: dict[int, tuple[int, int]], dense_run=None) -> None:
        input_ids, positions, ctx = kv.step({r: seqs[r][a:b] for r, (a, b) in chunks.items()})
        ctx.dense_layout = dense_run
        with torch.no_grad():
            logits = model.compute_logits(model(input_ids, positions, ctx))
        want = torch.cat([expected[r][a:b] for r, (a, b) in chunks.items()])
        torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)

    run({0: (0, 5)})
    # requests 2..4 (tokens 8..25) are the run: pieces before (0's chunk, 1's prompt) and after
    # requests 2..4 (tokens 6..23) are the run; pieces before it (0's chunk, 1's prompt) and
    # after it (5's prompt)
    run({0: (5, 8), 1: (0, 3), 2: (0, 6), 3: (0, 6), 4: (0, 6), 5: (0, 4)},
        dense_run=(2, 3, 6, 6))
    run({0: (8, 9), 1: (3, 4), 2: (6, 7), 3: (6, 8), 4: (6, 7), 5: (4, 5)})


def test_fused_mlp_step_matches_transformers():
    # ForwardContext.fused_mlp through every layer (the kernel's torch reference on the CPU):
    # the gate and up halves of the loaded weight in the right order.
    hf_model = perturbed_hf_model(tiny_config("llama3-untied"))
    model = ours_from(hf_model)
    tokens = torch.randint(0, 128, (9,), generator=torch.Generator().manual_seed(5)).tolist()
    input_ids, positions, ctx = PagedKV(model).step({0: tokens})
    ctx.fused_mlp = True
    with torch.no_grad():
        logits = model.compute_logits(model(input_ids, positions, ctx))
    torch.testing.assert_close(logits, hf_logits(hf_model, tokens), atol=ATOL, rtol=0)


@pytest.mark.gpu
def test_fused_mlp_on_gpu_in_bf16_matches_cublas_and_silu_and_mul():
    model = ours_from(perturbed_hf_model(tiny_config("qwen3"))).to("cuda", torch.bfloat16)
    model.reset_buffers()  # the rotary table back in fp32
    assert model.can_fuse_mlp()
    tokens = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(6)).tolist()
    input_ids, positions, ctx = PagedKV(model, num_blocks=300).step({0: tokens})
    logits = {}
    with torch.no_grad():
        for fused in (False, True):
            ctx.fused_mlp, ctx.attn_plans = fused, {}
            logits[fused] = model.compute_logits(model(input_ids, positions, ctx)).float()
    torch.testing.assert_close(logits[True], logits[False], atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
def test_dense_run_on_gpu_in_bf16_matches_the_paged_kernels():
    # cuDNN's fused attention on a run of four fresh 200-token prompts beside a decode and a
    # chunk, against the same step through the Triton kernels alone.
    from batchgen.layers.dense_attention import cudnn_attention_works
    if not cudnn_attention_works(torch.device("cuda")):
        pytest.skip("cuDNN's fused attention does not run on this GPU")
    model = ours_from(perturbed_hf_model(tiny_config("qwen3"))).to("cuda", torch.bfloat16)
    model.reset_buffers()  # the rotary table back in fp32
    gen = torch.Generator().manual_seed(4)
    seqs = {r: torch.randint(0, 128, (n,), generator=gen).tolist()
            for r, n in {0: 40, 1: 200, 2: 200, 3: 200, 4: 200, 5: 50}.items()}
    kv = PagedKV(model, num_blocks=512)
    kv.step({0: seqs[0][:39]})
    chunks = {0: seqs[0][39:], **{r: seqs[r] for r in range(1, 5)}, 5: seqs[5][:20]}
    input_ids, positions, ctx = kv.step(chunks)
    logits = {}
    with torch.no_grad():
        for dense_run in (None, (1, 4, 1, 200)):
            ctx.dense_layout, ctx.attn_plans = dense_run, {}
            logits[dense_run] = model.compute_logits(model(input_ids, positions, ctx)).float()
    torch.testing.assert_close(logits[(1, 4, 1, 200)], logits[None], atol=3e-2, rtol=3e-2)


def test_tied_model_shares_the_embedding_and_untied_has_its_own_head():
    tied = ours_from(perturbed_hf_model(tiny_config("qwen2")))
    assert tied.lm_head is None
    assert "lm_head.weight" not in dict(tied.named_parameters())
    untied_hf = perturbed_hf_model(tiny_config("qwen3"))
    untied = ours_from(untied_hf)
    torch.testing.assert_close(untied.lm_head.weight, untied_hf.lm_head.weight, rtol=0, atol=0)
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_add_to_adds_the_projection_in_place(bias):
    # The residual stream's adds (o_proj, down_proj): out += x W^T (+ b), no new tensor.
    from batchgen.layers.linear import Linear
    layer = Linear(6, 5, bias)
    gen = torch.Generator().manual_seed(0)
    for param in layer.parameters():
        param.data = torch.randn(param.shape, generator=gen)
    x, residual = torch.randn(3, 6, generator=gen), torch.randn(3, 5, generator=gen)
    expected = residual + layer(x)
    out = layer.add_to(x, residual)
    assert out.data_ptr() == residual.data_ptr()
    torch.testing.assert_close(out, expected)


def test_qwen2_has_qkv_bias_and_qwen3_has_qk_norm():
    qwen2 = create_model(tiny_config("qwen2"))
    attn2 = qwen2.model.layers[0].self_attn
    assert attn2.qkv_proj.bias is not None and attn2.o_proj.bias is None
    assert not attn2.has_qk_norm
    qwen3 = create_model(tiny_config("qwen3"))
    attn3 = qwen3.model.layers[0].self_attn
    assert attn3.has_qk_norm and attn3.q_norm.weight.shape == (32,)
    assert qwen3.head_dim == 32 and attn3.qkv_proj.weight.shape == ((4 + 2 * 2) * 32, 64)


@pytest.mark.parametrize("rope", [
    LLAMA3_ROPE,
    dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
    dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64),
    dict(rope_type="yarn", rope_theta=500000.0, factor=8.0, original_max_position_embeddings=32,
         beta_fast=16, beta_slow=2, mscale=1.0, mscale_all_dim=0.5),
])
def test_rope_frequencies_match_transformers(rope):
    config = transformers.LlamaConfig(**TINY, rope_parameters=dict(rope))
    want_inv_freq, want_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")
    inv_freq, scale = compute_inv_freq(rope_parameters(config), 16)
    torch.testing.assert_close(inv_freq, want_inv_freq.float(), rtol=1e-6, atol=0)
    assert math.isclose(scale, want_scale, rel_tol=1e-6)


def test_rope_parameters_read_legacy_fields():
    legacy = SimpleNamespace(rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE, rope_theta=None))
    params = rope_parameters(legacy)
    assert params["rope_theta"] == 500000.0 and params["rope_type"] == "llama3"
    assert rope_parameters(SimpleNamespace(rope_theta=1e6, rope_scaling=None)) == {
        "rope_theta": 1e6, "rope_type": "default"}
    old_style = rope_parameters(SimpleNamespace(rope_theta=1e4, rope_scaling={"type": "linear",
                                                                              "factor": 2.0}))
    assert old_style["rope_type"] == "linear"


def test_unsupported_rope_type_is_a_clear_error():
    with pytest.raises(ValueError, match="dynamic.*supported: default, linear, llama3, yarn"):
        compute_inv_freq({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, 16)


def _smollm2_prefill_decode(model_dir, dtype: torch.dtype, device: str):
    """SmolLM2 through batchgen (a 14-token prefill, then one decode step) and transformers'
    fp32 logits of the same 15 tokens -> (model, prefill, decode, want), logits as fp32 on CPU."""
    from batchgen.models.loader import load_hf_config, load_model

    config = load_hf_config(model_dir)
    model = load_model(model_dir, config, dtype=dtype, device=torch.device(device))
    hf_model = transformers.LlamaForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    tokens = [1, 504, 3458, 282, 4649, 314, 2, 28, 1073, 421, 9, 260, 3624, 30, 216]
    want = hf_logits(hf_model, tokens)
    kv = PagedKV(model, num_blocks=8)
    input_ids, positions, ctx = kv.step({0: tokens[:-1]})
    with torch.no_grad():
        prefill = model.compute_logits(model(input_ids, positions, ctx)).float().cpu()
        input_ids, positions, ctx = kv.step({0: tokens[-1:]})
        decode = model.compute_logits(model(input_ids, positions, ctx)).float().cpu()
    return model, prefill, decode, want


def test_smollm2_matches_transformers(smol_model_dir):
    model, prefill, decode, want = _smollm2_prefill_decode(smol_model_dir, torch.float32, "cpu")
    torch.testing.assert_close(prefill, want[:-1], atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(decode, want[-1:], atol=2e-4, rtol=1e-5)
    assert (model.num_layers, model.num_kv_heads, model.head_dim, model.vocab_size) == (
        30, 3, 64, 49152)


@pytest.mark.gpu
def test_smollm2_on_gpu_in_bf16_tracks_transformers(smol_model_dir):
    _, prefill, decode, want = _smollm2_prefill_decode(smol_model_dir, torch.bfloat16, "cuda")
    got = torch.cat([prefill, decode])
    # bf16 through 30 layers: compare shapes of the distributions, not exact values.
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() > 0.99


@pytest.mark.gpu
def test_dummy_load_of_an_8b_config_stays_on_device(tmp_path):
    from batchgen.models.loader import load_model

    config = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rope_parameters=dict(LLAMA3_ROPE, rope_theta=500000.0, factor=8.0,
                             original_max_position_embeddings=8192),
        architectures=["LlamaForCausalLM"])
    model = load_model(tmp_path, config, dtype=torch.bfloat16, device=torch.device("cuda"),
                       load_format="dummy", seed=0)
    weight = model.model.layers[31].mlp.down_proj.weight
    assert weight.is_cuda and weight.dtype == torch.bfloat16
    assert 0.015 < weight.float().std().item() < 0.025
    del model
    torch.cuda.empty_cache()
