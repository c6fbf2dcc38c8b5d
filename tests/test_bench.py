"""bench/: the workload draws, the floor arithmetic (a hand-checked example and BENCHMARKS.md's
H200 table), the numerics check, the baseline's generate_batch grouping, and a CPU smoke run of
bench.py on the tiny shape."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from batchgen.engine.admission import admission_order

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import baseline_hf  # noqa: E402
import check_numerics  # noqa: E402
import floor  # noqa: E402
import kernel_profile  # noqa: E402
import power  # noqa: E402
import schedule_sim  # noqa: E402
import shapes  # noqa: E402
import workloads  # noqa: E402


# ---- workloads -----------------------------------------------------------------------------

def test_reviews_follow_the_published_draw_order():
    # BENCHMARKS.md's snippet, transcribed literally.
    r = random.Random(0)
    tok = lambda n: [r.randrange(1000, 100000) for _ in range(n)]  # noqa: E731
    prefix = tok(256)
    expected = [(prefix + tok(r.randint(64, 768)), r.randint(32, 256)) for _ in range(5)]
    assert workloads.draw_reviews(5) == expected


def test_decode_and_prefill_follow_the_published_draw_order():
    r = random.Random(0)
    tok = lambda n: [r.randrange(1000, 100000) for _ in range(n)]  # noqa: E731
    assert workloads.draw_decode(3) == [(tok(128), 1024) for _ in range(3)]
    r = random.Random(0)
    assert workloads.draw_prefill(2) == [(tok(1024), 8) for _ in range(2)]


def test_reviews_shape_and_limit():
    full = workloads.draw_workload("reviews")
    assert full.num_requests == 2000 and full.num_shared_prefix_tokens == 256
    prefix = full.requests[0][0][:256]
    for prompt, n in full.requests:
        assert prompt[:256] == prefix
        assert 64 <= len(prompt) - 256 <= 768 and 32 <= n <= 256
        assert all(1000 <= t < 100000 for t in prompt)
    # Means of the uniform draws land where they should.
    assert 400 < full.num_prompt_tokens / 2000 - 256 < 432
    assert 136 < full.num_output_tokens / 2000 < 152
    assert workloads.draw_workload("reviews", limit=7).requests == full.requests[:7]
    small = workloads.draw_workload("small", limit=3)
    assert small.requests == full.requests[:3] and small.default_shape == "llama-1b"


def test_fewshot_shares_a_long_prefix_before_short_rows():
    w = workloads.draw_workload("fewshot", limit=50)
    assert w.num_shared_prefix_tokens == 2048 and w.default_shape == "llama3-8b"
    prefix = w.requests[0][0][:2048]
    for prompt, n in w.requests:
        assert prompt[:2048] == prefix and 32 <= len(prompt) - 2048 <= 160 and 64 <= n <= 256
    assert "fewshot" not in workloads.REFERENCES  # ours: no bar to print


def test_decode_prefill_sizes():
    d = workloads.draw_workload("decode")
    p = workloads.draw_workload("prefill")
    assert (d.num_requests, d.num_prompt_tokens, d.num_output_tokens) == (500, 64000, 512000)
    assert (p.num_requests, p.num_prompt_tokens, p.num_output_tokens) == (1000, 1024000, 8000)
    with pytest.raises(ValueError, match="unknown workload"):
        workloads.draw_workload("nope")


def test_fit_to_vocab_and_cap_outputs():
    reqs = [([1000, 1511, 7], 300), ([99999], 5)]
    assert workloads.fit_to_vocab(reqs, 512) == [([1000 % 512, 1511 % 512, 7], 300),
                                                 ([99999 % 512], 5)]
    assert workloads.fit_to_vocab(reqs, 128256) is reqs
    assert workloads.cap_outputs(reqs, 128) == [([1000, 1511, 7], 128), ([99999], 5)]


# ---- shapes --------------------------------------------------------------------------------

def test_shape_parameter_counts_match_the_table():
    s = shapes.SHAPES
    assert round(s["llama3-8b"].num_params / 1e9, 2) == 8.03
    assert round(s["llama-1b"].num_params / 1e9, 2) == 1.50
    assert round(s["qwen3-8b"].num_params / 1e9, 1) == 8.2
    assert s["llama3-8b"].kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    assert s["llama3-8b"].weight_bytes == 2 * s["llama3-8b"].num_params


def test_shape_config_builds_in_transformers(tmp_path):
    from transformers import AutoConfig

    folder = shapes.SHAPES["llama3-8b"].write_config(tmp_path)
    cfg = AutoConfig.from_pretrained(folder)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim) == \
        (4096, 32, 8, 128)
    assert cfg.tie_word_embeddings is False and cfg.max_position_embeddings == 8192
    raw = json.loads((folder / "config.json").read_text())
    assert raw["rope_theta"] == 500000.0 and raw["rope_scaling"]["rope_type"] == "llama3"


# ---- floor ---------------------------------------------------------------------------------

# 1 layer, hidden 4, inter 8, 2 heads / 1 kv of width 2, vocab 10, bf16:
#   P_layers = 4*2*2*2 (q, o) + 4*1*2*2 (k, v) + 3*4*8 (mlp) + 2*4 (norms) = 152
#   W = 2 bytes * (152 + 2*10*4 + 4) = 472; kv/token = 2 * 1 * 1 * 2 * 2 = 8
_HAND = shapes.Shape(name="hand", architecture="LlamaForCausalLM", hidden_size=4,
                     intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=2,
                     vocab_size=10, rope_theta=1e4)
# A: prompt 3, output 2; B: prompt 2, output 3. No shared blocks at block size 16.
_HAND_REQS = [([1, 2, 3], 2), ([4, 5], 3)]


def test_floor_hand_checked_compute():
    assert (_HAND.num_layer_params, _HAND.weight_bytes, _HAND.kv_bytes_per_token) == (152, 472, 8)
    f = floor.compute_floor(_HAND, _HAND_REQS, floor.Ceilings(1000.0, 100.0),
                            kv_pool_tokens=1000, max_num_seqs=8)
    # tokens: A positions 0..4 (5), B 0..4 (5); keys: 1+..+5 twice = 30; sampled: 3 + 4 = 7.
    assert (f.num_computed_tokens, f.num_keys_attended) == (10, 30)
    # 2*152*10 + 2*10*4*7 + 4*1*4*30 = 3040 + 560 + 480
    assert f.num_flops == 4080
    assert f.compute_s == pytest.approx(4.08)


def test_floor_hand_checked_memory_simulation():
    ceil = floor.Ceilings(1000.0, 100.0)
    # Both run together. Step 0: A reads 4, B 3 -> 472 + 8*7; A done. Step 1: B reads 4.
    f = floor.compute_floor(_HAND, _HAND_REQS, ceil, kv_pool_tokens=1000, max_num_seqs=8)
    assert (f.num_bytes, f.num_decode_steps, f.peak_batch) == (528 + 504, 2, 2)
    assert f.memory_s == pytest.approx(10.32) and f.bound_by == "memory"
    assert f.seconds == pytest.approx(10.32)
    # One at a time (max_num_seqs 1, or a pool of 6 tokens): A alone 504; then B 496, 504.
    for kwargs in ({"kv_pool_tokens": 1000, "max_num_seqs": 1},
                   {"kv_pool_tokens": 6, "max_num_seqs": 8}):
        f = floor.compute_floor(_HAND, _HAND_REQS, ceil, **kwargs)
        assert (f.num_bytes, f.num_decode_steps, f.peak_batch) == (1504, 3, 1)
    with pytest.raises(ValueError, match="pool holds"):
        floor.compute_floor(_HAND, _HAND_REQS, ceil, kv_pool_tokens=4)


def test_cached_prompt_tokens_by_chained_blocks():
    prompts = [[1, 2, 3, 4], [1, 2, 5, 6], [1, 2, 3, 4, 7], [5, 6, 3, 4], [9, 9], [9, 9]]
    # [5,6,3,4]: its block [3,4] follows a different parent, so no hit. A full-prompt hit
    # still computes the last token.
    assert floor.count_cached_prompt_tokens(prompts, block_size=2) == [0, 2, 4, 0, 0, 1]


@pytest.mark.parametrize("name,table_s,bound_by", [
    ("reviews", 21.0, "compute"), ("decode", 13.9, "memory"),
    ("prefill", 18.8, "compute"), ("small", 3.1, "compute")])
def test_floor_reproduces_the_h200_table(name, table_s, bound_by):
    w = workloads.draw_workload(name)
    shape = shapes.SHAPES[w.default_shape]
    f = floor.compute_floor(shape, w.requests, floor.H200_CEILINGS)
    assert f.seconds == pytest.approx(table_s, rel=0.03)
    assert f.bound_by == bound_by
    assert workloads.REFERENCES[name].floor_s == table_s
    if name == "reviews":
        # Every request but the first is served its 256-token instruction from the cache.
        assert f.num_cached_prompt_tokens == 1999 * 256


def test_measure_ceilings_on_cpu():
    ceil, details = floor.measure_ceilings("cpu", torch.float32, matmul_size=64,
                                           copy_bytes=2**20, num_iters=3)
    assert ceil.matmul_flops_per_s > 0 and ceil.copy_bytes_per_s > 0
    assert details["matmul_size"] == 64 and details["sustained_matmul_tflops"] is None


def test_sustained_rate_times_calls_after_a_warm_up_of_the_same_length(monkeypatch):
    clock = {"t": 0.0}

    def fake_matmul():  # 1 ms of "device" time a call for the first 0.1 s, 2 ms after
        clock["t"] += 0.001 if clock["t"] < 0.1 else 0.002
    monkeypatch.setattr(time, "perf_counter", lambda: clock["t"])
    per_call = floor._sustained_seconds_per_call(fake_matmul, 0.1, is_cuda=False)
    assert per_call == pytest.approx(0.002)  # the warm-up's fast calls are not counted


# ---- numerics check ------------------------------------------------------------------------

def test_numerics_check_tiny_cpu():
    result = check_numerics.check_numerics(shapes.SHAPES["tiny"], torch.device("cpu"),
                                           num_layers=None, prompt_lens=(5, 17, 33))
    assert result.is_close, result
    assert result.prefill.argmax_agreement == 1.0 and result.decode.argmax_agreement == 1.0


def test_compare_logits_sees_a_difference():
    ref = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    diff = check_numerics.compare_logits(ref + 0.1 * torch.randn_like(ref), ref)
    assert not check_numerics.NumericsResult(diff, diff, "float32").is_close
    same = check_numerics.compare_logits(ref.clone(), ref)
    assert check_numerics.NumericsResult(same, same, "float32").is_close


@pytest.mark.gpu
def test_numerics_check_llama_1b_shape_gpu():
    result = check_numerics.check_numerics(shapes.SHAPES["llama-1b"], torch.device("cuda"),
                                           num_layers=2)
    assert result.is_close, result


# ---- baseline ------------------------------------------------------------------------------

class _FakeOutput:
    def __init__(self, tokens):
        self.generated_tokens = tokens


class _FakeHFModel:
    """Stands in for a transformers model: records generate_batch calls."""

    def __init__(self):
        self.calls = []

    def generate_batch(self, inputs, generation_config=None, continuous_batching_config=None,
                       progress_bar=True, **kwargs):
        n = generation_config.max_new_tokens
        self.calls.append((len(inputs), n, progress_bar))
        assert generation_config.eos_token_id == -1 and generation_config.do_sample
        return {f"req_{i}": _FakeOutput([len(ids)] * n) for i, ids in enumerate(inputs)}


def test_baseline_generate_batch_one_call_per_output_length():
    model = _FakeHFModel()
    reqs = [([1, 2], 3), ([1, 2, 3], 5), ([4], 3)]
    got = baseline_hf.generate_batch(model, reqs)
    assert sorted(model.calls) == [(1, 5, False), (2, 3, False)]
    # Each request gets its own output back (the fake echoes the prompt length).
    assert got == {0: [2, 2, 2], 1: [3] * 5, 2: [1, 1, 1]}


# ---- bench.py end to end -------------------------------------------------------------------

@pytest.mark.timeout(180)
def test_schedule_sim_counts_steps_of_the_real_scheduler():
    requests = workloads.draw_workload("reviews", limit=200).requests
    kw = dict(max_num_seqs=64, max_num_batched_tokens=4096, kv_pool_tokens=200_000)
    fifo = schedule_sim.simulate(requests, list(range(200)), **kw)
    ordered = schedule_sim.simulate(requests, admission_order(*zip(*requests)), **kw)
    for s in (fifo, ordered):
        assert s.num_steps == s.num_mixed_steps + s.num_decode_steps
        assert s.num_preemptions == 0 and 0 < s.peak_kv_tokens <= 200_000
        # a request's output tokens come one a step: the longest bounds the step count
        assert s.num_steps >= max(n for _, n in requests)
    assert ordered.num_steps < fifo.num_steps
    assert ordered.mean_decode_batch > fifo.mean_decode_batch


def test_kernel_profile_busy_time_is_the_union_of_intervals():
    iv = kernel_profile.Interval
    assert kernel_profile.busy_seconds([iv(0, 2e6), iv(1e6, 3e6), iv(5e6, 6e6), iv(5.5e6, 5.6e6)]) == 4
    assert kernel_profile.busy_seconds([]) == 0


def test_kernel_profile_categories():
    cat, iv = kernel_profile.categorize, kernel_profile.Interval
    assert cat("_prefill_attention_kernel") == "attention_prefill"
    assert cat("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128"
               "_4x1x1_cga1x1x1_kernel0_0") == "attention_dense"
    assert cat("_combine_splits_kernel") == "attention_decode"
    assert cat("nvjet_sm90_tst_256x128_64x4_2x1_v_bz_coopA_NNT") == "gemm"
    assert cat("_gate_up_silu_kernel") == "gemm_swiglu"
    assert cat("_silu_and_mul_kernel") == "activation"
    assert cat("aten::addmm") == "gemm" and cat("aten::addmm_backward") != "gemm"
    assert cat("Memcpy HtoD (Pinned -> Device)") == "copy"
    assert cat("_split_mass_kernel") == "sampling" and cat("_pick_token_kernel") == "sampling"
    assert cat("_rotary_kv_write_kernel") == "rotary_kv_write"
    assert cat("void at::native::vectorized_elementwise_kernel<4, add>") == "other"
    prof = kernel_profile.summarize(
        [("nvjet_a", iv(0, 1e6)), ("_rms_norm_kernel", iv(1e6, 1.5e6)), ("nvjet_a", iv(2e6, 3e6))],
        device="cuda", num_requests=1, num_steps=2, wall_s=4.0, is_cuda=True)
    assert prof.device_busy_s == 2.5 and prof.device_idle_fraction == 0.375
    assert prof.by_category["gemm"] == {"seconds": 2.0, "count": 2, "share": 0.8}
    assert prof.top_kernels[0] == ("nvjet_a", 2.0, 2)
    assert "gemm" in prof.summary()
    # idle: 0.5 s after the norm (a long gap), nothing between the overlapping first two
    assert prof.gaps_by_length[">=2000us"] == [0.5, 1]
    assert sum(n for _, n in prof.gaps_by_length.values()) == 1
    assert prof.gaps_by_transition == [("norm>gemm", 0.5, 1)]
    assert "norm>gemm" in prof.summary()


def test_kernel_profile_gaps_follow_the_kernel_that_ends_last():
    iv = kernel_profile.Interval
    # a long GEMM overlaps a short norm; the idle after both belongs to the GEMM
    by_length, by_transition = kernel_profile.idle_gaps(
        [("nvjet", iv(0, 100)), ("_rms_norm_kernel", iv(10, 20)), ("_pick_token_kernel", iv(110, 115)),
         ("nvjet", iv(130, 140))])
    assert by_transition == [("sampling>gemm", 15e-6, 1), ("gemm>sampling", 10e-6, 1)]
    assert by_length["<20us"] == [25e-6, 2]


def test_power_samples_parse_and_summarize():
    text = ("1515, 693.20, 0x0000000000000004\n1980, 410.5, 0x0000000000000000\n"
            "[N/A], [N/A], [N/A]\nsome warning\n1320, 704.0, 0x0000000000000005\n")
    samples = power.parse_samples(text)
    assert samples == [(1515.0, 693.2, 4), (1980.0, 410.5, 0), (1320.0, 704.0, 5)]
    summary = power.summarize(samples)
    assert summary == {"num_samples": 3, "sm_clock_mhz_median": 1515.0,
                       "sm_clock_mhz_max": 1980.0, "power_w_median": 693.2,
                       "power_capped_share": 2 / 3}
    assert "SM median 1,515 MHz" in power.describe(summary)
    assert "at the power cap in 67% of 3 samples" in power.describe(summary)
    assert power.summarize([]) is None and "not sampled" in power.describe(None)


def test_clock_sampler_runs_nvidia_smi_through_the_block(tmp_path, monkeypatch):
    # A stand-in nvidia-smi on PATH prints a power-capped sample every 20 ms until stopped.
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nwhile true; do echo '1500, 690.5, 0x4'; sleep 0.02; done\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with power.ClockSampler() as clocks:
        time.sleep(0.3)
    assert clocks.summary["num_samples"] >= 3
    assert clocks.summary["power_capped_share"] == 1.0
    assert clocks.summary["sm_clock_mhz_median"] == 1500.0
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with power.ClockSampler() as clocks:
        pass
    assert clocks.summary is None


def test_bench_smoke_tiny_cpu(tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(BENCH / "bench.py"), "--shape", "tiny", "--workloads",
           "reviews,decode", "--limit", "3", "--max-output-tokens", "12", "--profile", "decode",
           "--profile-requests", "2", "--repeat", "2", "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["errors"] == {}
    assert results["numerics"]["is_close"]
    assert results["startup_s"] > 0
    for name in ("reviews", "decode"):
        f = results["workloads"][name]
        assert f["num_requests"] == 3 and f["num_wrong_lengths"] == 0
        assert f["num_output_tokens"] == 36
        assert f["floor"]["floor_s"] > 0 and f["floor_fraction"] > 0
        assert f["floor_fraction_at_page_ceilings"] > 0
        # the same floor at the matmul rate held for 0.2 s (on the CPU: no power limit)
        assert f["floor_fraction_at_sustained_matmul"] > 0
        # the fastest of two runs, both kept
        assert len(f["runs_wall_s"]) == 2 and f["wall_s"] == min(f["runs_wall_s"])
        assert f["kv_pool_tokens"] > 0 and 1 <= f["peak_num_running"] <= 3
        assert "vllm_s" not in f  # a cut workload is not the published one
        assert "gpu_clocks" in f  # None without nvidia-smi
    prof = results["workloads"]["decode"]["profile"]
    assert prof["num_requests"] == 2 and prof["num_steps"] >= 12 and prof["num_kernels"] > 0
    assert prof["by_category"]["gemm"]["seconds"] > 0
    assert 0 < prof["device_busy_s"] and abs(sum(
        c["share"] for c in prof["by_category"].values()) - 1) < 1e-6
    # The shared 256-token instruction is served from the cache for requests 2 and 3.
    assert results["workloads"]["reviews"]["prefix_cache_hit_rate"] > 0
    # The table comes last, so the device tool's tail shows it.
    tail = proc.stdout.strip().splitlines()
    assert tail[-1].startswith("wrote ") and any(line.startswith("reviews ") for line in tail[-8:])
    assert any(line.startswith("  (the fastest of 2 runs: ") for line in tail[-8:])


def test_ab_probe_runs_every_variant_each_round_tiny_cpu(tmp_path):
    out = tmp_path / "ab.json"
    cmd = [sys.executable, str(BENCH / "ab_probe.py"), "--shape", "tiny", "--workload",
           "prefill", "--limit", "3", "--max-output-tokens", "2", "--variants",
           "default,no-mixed-split,no-dense,no-fused-mlp,no-pdl,tiles=128/32/4/2/1,"
           "dtiles=64/4/3/0",
           "--rounds", "2", "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BATCHGEN_GIT_SHA": "abc1234"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["environment"]["git_sha"] == "abc1234"
    # interleaved: A B C, A B C
    assert [(r["round"], r["variant"]) for r in results["runs"]] == [
        (i, v) for i in range(2)
        for v in ("default", "no-mixed-split", "no-dense", "no-fused-mlp", "no-pdl",
                  "tiles=128/32/4/2/1", "dtiles=64/4/3/0")]
    assert all(r["wall_s"] > 0 for r in results["runs"])
    assert results["summary"]["default"]["vs_first"] == 1.0


def test_host_probe_times_steps_by_kind_and_profiles_tiny_cpu(tmp_path):
    out = tmp_path / "host.json"
    cmd = [sys.executable, str(BENCH / "host_probe.py"), "--shape", "tiny", "--workload",
           "reviews", "--limit", "6", "--max-output-tokens", "4", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for run in ("first", "second"):
        # 6 prompts in one mixed step, then 3 decode steps (4 tokens each), all timed
        assert results[run]["mixed"]["steps"] >= 1 and results[run]["decode"]["steps"] == 3
        assert 0 < results[run]["mixed"]["total_s"] + results[run]["decode"]["total_s"] \
            <= results[run]["wall_s"] * 1.01
    assert "launch" in results["profile"] and "Ordered by: cumulative time" in results["profile"]


def test_ab_probe_refuses_an_unknown_variant_before_building_a_model(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "ab_probe.py"), "--variants", "fast",
                           "--out", str(tmp_path / "x.json")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "unknown variant 'fast'" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_ab_probe_variants_swap_their_setting_for_the_block_only():
    # A decode-tile variant (and no-pdl) holds while its block runs, the decode graphs
    # captured again on the way in and out; afterwards the defaults are back.
    import types

    import ab_probe
    from batchgen.kernels import _triton, decode_attention

    captures = []
    graphs = types.SimpleNamespace(capture=lambda: captures.append(
        (decode_attention._TUNING[128], _triton.pdl_enabled())))
    llm = types.SimpleNamespace(engine=types.SimpleNamespace(
        runner=types.SimpleNamespace(graphs=graphs)))
    default_tiles, default_pdl = decode_attention._TUNING[128], _triton.pdl_enabled()
    with ab_probe.variant("dtiles=32/4/3/1", llm):
        assert decode_attention._TUNING[128] == decode_attention._TUNING[64] == (32, 4, 3, True)
    with ab_probe.variant("no-pdl", llm):
        assert _triton.pdl_enabled() is False
    assert decode_attention._TUNING[128] == default_tiles
    assert _triton.pdl_enabled() is default_pdl
    assert captures == [((32, 4, 3, True), default_pdl), (default_tiles, default_pdl),
                        (default_tiles, False), (default_tiles, default_pdl)]
