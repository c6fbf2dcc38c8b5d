"""Fresh prompts (no cached prefix) at the end of a step go to FlashAttention on CUDA: which
requests qualify (CPU), and that the split step matches the paged kernel alone (GPU)."""
import pytest
import torch

from batchgen.layers.attention import Attention
from batchgen.layers.context import ForwardContext, plan_fresh_prompts


def test_plan_takes_the_trailing_run_of_fresh_requests():
    # a decode (context 99), a later chunk (cached 300), then two fresh prompts
    plan = plan_fresh_prompts([0, 1, 51, 751, 1351], [100, 350, 700, 600])
    assert (plan.req_start, plan.token_start, plan.max_len) == (2, 51, 700)
    assert (plan.head_max_query_len, plan.head_max_seq_len) == (50, 350)


def test_plan_stops_at_the_last_request_with_a_cached_prefix():
    # fresh, cached, fresh: only the last one trails the batch
    plan = plan_fresh_prompts([0, 600, 700, 1400], [600, 356, 700])
    assert (plan.req_start, plan.token_start, plan.max_len) == (2, 700, 700)


def test_plan_all_fresh_has_no_head():
    plan = plan_fresh_prompts([0, 300, 900], [300, 600])
    assert (plan.req_start, plan.token_start, plan.head_max_query_len) == (0, 0, 0)


def test_no_plan_below_the_threshold_or_without_fresh_requests():
    assert plan_fresh_prompts([0, 300, 700], [400, 400]) is None  # 400 fresh tokens < 512
    assert plan_fresh_prompts([0, 1, 2], [50, 60]) is None  # decodes only
    assert plan_fresh_prompts([0, 100], [100], min_tokens=512) is None
    assert plan_fresh_prompts([0, 100], [100], min_tokens=1) is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(32, 8, 128), (9, 3, 64)])
def test_fresh_prompts_by_flash_match_the_paged_kernel(shape):
    from test_kernels_gpu import BF16, _paged_batch

    num_heads, num_kv_heads, head_dim = shape
    # a decode, a later chunk, then three fresh prompts (one of a single token)
    query_lens, prefix_lens = [1, 50, 700, 600, 1], [99, 300, 0, 0, 0]
    batch = _paged_batch(query_lens, prefix_lens, num_heads, num_kv_heads, head_dim, seed=3)
    gen = torch.Generator(device="cuda").manual_seed(4)
    num_tokens = sum(query_lens)
    k, v = (torch.randn(num_tokens, num_kv_heads, head_dim, device="cuda", generator=gen,
                        dtype=torch.bfloat16) for _ in range(2))
    tables, qsl, seq_lens = batch["block_tables"], batch["query_start_loc"], batch["seq_lens"]
    owner = torch.repeat_interleave(torch.arange(len(query_lens), device="cuda"),
                                    torch.tensor(query_lens, device="cuda"))
    positions = (torch.arange(num_tokens, device="cuda") - qsl.long()[owner]
                 + (seq_lens.long() - torch.tensor(query_lens, device="cuda"))[owner])
    slots = tables[owner, positions // 16].long() * 16 + positions % 16
    attn = Attention(num_heads, num_kv_heads, head_dim, head_dim ** -0.5, layer_idx=0)

    def run(fresh):
        ctx = ForwardContext(
            query_start_loc=qsl, seq_lens=seq_lens, block_tables=tables, slot_mapping=slots,
            kv_caches=[(batch["key_cache"], batch["value_cache"])],
            max_query_len=max(query_lens), max_seq_len=int(seq_lens.max()), fresh=fresh)
        return attn(batch["q"], k, v, ctx)

    plan = plan_fresh_prompts(qsl.tolist(), seq_lens.tolist())
    assert plan is not None and plan.req_start == 2
    torch.testing.assert_close(run(plan), run(None), **BF16)
