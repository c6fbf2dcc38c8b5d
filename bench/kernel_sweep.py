"""Times the attention kernels' tile choices on the shapes the workloads run, the projections
under each BLAS library, the row-wise kernels' launch configs, and the copy and read bandwidth
(GPU only).

    python bench/kernel_sweep.py --out $OUT/sweep.json \
        [--only gemm,prefill,decode,decode-grown,cascade,mixed,sample,rowwise,bandwidth]

Each attention case is a paged batch at llama3-8b's attention shape (32 heads, 8 kv heads,
dim 128; llama-1b's has dim 64) with 16-token blocks at shuffled ids, sized like a step of a
workload, optionally with a prompt prefix's blocks shared by every request; each config is
captured in a CUDA graph and timed over 20 replays (the engine replays decode steps from
graphs; an eager call's host launch work, 0.03-0.1 ms, would count otherwise) and checked
against the default config's output. Decode is reported as KV bytes read per second, prefill
as attention TFLOP/s (causal: the keys each query sees). `cascade` times decode steps whose
requests share a prompt prefix's blocks, the shared keys read per request and once. The
shuffled blocks make the timings pessimistic next to the engine, whose fresh prompts get
mostly consecutive blocks: compare configs with each other here, and confirm a winner end to
end (RESULTS.md, session 6).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

NUM_HEADS, NUM_KV_HEADS, BLOCK_SIZE = 32, 8, 16
GRAPH_MAX_SEQ_LEN = 4096  # decode graphs are captured with max_model_len: splits follow it

# name -> (head_dim, [(query length, prefix length)] of the step's requests, keys at the
# start of every request held in the same blocks: a prompt prefix from the prefix cache)
DECODE_CASES = {
    "decode 500 x 640 (decode workload, mid-run)": (128, [(1, 639)] * 500, 0),
    "decode 933 x (256 shared + 344) (reviews)": (128, [(1, 599)] * 933, 256),
    "decode 64 x (256 shared + 484) (baseline set)": (128, [(1, 739)] * 64, 256),
    "decode 1024 x (256 shared + 344), llama-1b (small)": (64, [(1, 599)] * 1024, 256),
    "decode 8 x 4096 (few long)": (128, [(1, 4095)] * 8, 0),
}
# The decode workload's steps with their blocks laid out as the engine's pool hands them out
# (paged_batch's grown_from: 8 prompt blocks per request, then one per request in turn)
GROWN_DECODE_CASES = {
    "decode 500 x 640 (decode workload, mid-run), grown blocks": (128, [(1, 639)] * 500, 0, 8),
    "decode 500 x 1,000 (decode workload, late), grown blocks": (128, [(1, 999)] * 500, 0, 8),
}
PREFILL_CASES = {
    "prefill 16 x 1024 (prefill workload)": (128, [(1024, 0)] * 16, 0),
    "mixed 12 x 416+256 and 900 decodes (reviews)":
        (128, [(416, 256)] * 12 + [(1, 499)] * 900, 0),
    "mixed, llama-1b (small)": (64, [(416, 256)] * 12 + [(1, 499)] * 900, 0),
}
# Mixed steps as the engine lays them out: (head_dim, leading decodes' (1, prefix), then the
# chunks' (query, prefix), keys every request holds in the same blocks)
MIXED_CASES = {
    "reviews: 900 decodes x (256 shared + 344) + 12 x 416 after 256 cached":
        (128, [(1, 599)] * 900 + [(416, 256)] * 12, 256),
    "prefill workload: 112 decodes x 1,030 + 15 x 1,024 fresh":
        (128, [(1, 1029)] * 112 + [(1024, 0)] * 15, 0),
    "small (llama-1b): 900 decodes x (256 shared + 344) + 12 x 416":
        (64, [(1, 599)] * 900 + [(416, 256)] * 12, 256),
}
# name -> (batch size, shared prefix keys, each request's own keys after it)
CASCADE_CASES = {
    "reviews decode step: 933 x (256 shared + 344)": (933, 256, 344),
    "baseline set: 64 x (256 shared + 484)": (64, 256, 484),
    "long shared prompt: 256 x (2048 shared + 128)": (256, 2048, 128),
}
# (BLOCK_N, num_warps, num_stages, K_ROWS) and (BLOCK_M, BLOCK_N, num_warps, num_stages, K_ROWS)
DECODE_CONFIGS = list(itertools.product((64, 128), (2, 4), (2, 3, 4), (False, True)))
# Short contexts: smaller tiles, fewer warps and stages (less shared memory, more programs
# resident per SM to hide the latency of each program's first loads)
SHORT_DECODE_CONFIGS = list(itertools.product((16, 32, 64), (1, 2, 4), (1, 2, 3), (False,)))
# Batches too small to fill the SMs one program per (request, kv head): the split count too
SPLIT_DECODE_CONFIGS = list(itertools.product((16, 32, 64), (1, 2, 4), (2,), (False,),
                                              (1, 2, 4, 8, 16)))
PREFILL_CONFIGS = (list(itertools.product((64, 128), (32, 64), (4, 8), (2, 3), (False,)))
                   + list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3), (True,))))
# llama3-8b's projections (out, in) and the tokens per step the workloads run
GEMM_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
               "down": (4096, 14336), "lm_head": (128256, 4096)}
GEMM_TOKENS = (64, 512, 1024, 8192, 16384)


def paged_batch(query_lens, prefix_lens, num_heads, num_kv_heads, head_dim, block_size=16,
                 dtype=torch.bfloat16, seed=0, grown_from=None):
    """Random caches, each request's blocks at random ids (holes), tables padded with 0; the
    keyword arguments of both attention kernels (GPU; also tests/test_kernels_gpu.py's).
    grown_from=k: the blocks as a fresh pool hands them out to a batch decoding in lock-step
    (the engine's `decode` workload): each request's first k blocks in a row, request after
    request (its prompt), then one block per request in turn (one per 16 decode steps)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    seq_lens = torch.tensor([q + p for q, p in zip(query_lens, prefix_lens)], device="cuda")
    blocks_per_req = (seq_lens + block_size - 1) // block_size
    num_blocks = int(blocks_per_req.sum()) + 5
    max_blocks = int(blocks_per_req.max()) + 1
    columns = torch.arange(max_blocks, device="cuda")
    is_used = columns[None, :] < blocks_per_req[:, None]
    if grown_from is None:
        block_ids = torch.randperm(num_blocks, device="cuda", generator=gen)
        first = torch.cumsum(blocks_per_req, 0) - blocks_per_req
        index = (first[:, None] + columns[None, :]).clamp(max=num_blocks - 1)
        block_tables = torch.where(is_used, block_ids[index], 0).to(torch.int32)
    else:  # (equal lengths: the ids are dense)
        num_reqs = len(query_lens)
        reqs = torch.arange(num_reqs, device="cuda")[:, None]
        prompt = reqs * grown_from + columns[None, :]
        grown = num_reqs * grown_from + (columns[None, :] - grown_from) * num_reqs + reqs
        block_tables = torch.where(is_used, torch.where(columns[None, :] < grown_from, prompt,
                                                        grown), 0).to(torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    query_start_loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()],
                                   dtype=torch.int32, device="cuda")
    return dict(
        q=torch.randn(sum(query_lens), num_heads, head_dim, device="cuda", generator=gen,
                      dtype=dtype),
        key_cache=torch.randn(shape, device="cuda", generator=gen, dtype=dtype),
        value_cache=torch.randn(shape, device="cuda", generator=gen, dtype=dtype),
        block_tables=block_tables, query_start_loc=query_start_loc,
        seq_lens=seq_lens.to(torch.int32), scale=head_dim ** -0.5,
        max_query_len=max(query_lens), max_seq_len=int(seq_lens.max()))


def decode_args(batch: dict) -> tuple:
    """A batch of one-query requests as decode_attention's (and its reference's) positional
    arguments."""
    return (batch["q"], batch["key_cache"], batch["value_cache"], batch["block_tables"],
            batch["seq_lens"], batch["scale"], batch["max_seq_len"])


def mixed_step(batch: dict, num_decodes: int, shared_prefix_len: torch.Tensor | None = None):
    """-> (Attention layer, ForwardContext): the batch as a step the engine attends with
    `Attention.attend`, its leading num_decodes requests by the decode kernel (cascade over
    shared_prefix_len keys, a [1] int32 tensor, or None) and the rest by the prefill kernel."""
    from batchgen.layers.attention import Attention
    from batchgen.layers.context import ForwardContext

    q, key_cache = batch["q"], batch["key_cache"]
    ctx = ForwardContext(
        query_start_loc=batch["query_start_loc"], seq_lens=batch["seq_lens"],
        block_tables=batch["block_tables"], slot_mapping=None,
        kv_caches=[(key_cache, batch["value_cache"])], max_query_len=batch["max_query_len"],
        max_seq_len=batch["max_seq_len"], num_decodes=num_decodes,
        shared_prefix_len=shared_prefix_len)
    layer = Attention(q.shape[1], key_cache.shape[2], q.shape[2], batch["scale"], layer_idx=0,
                      rotary_emb=None)
    return layer, ctx


def share_prefix(batch: dict, num_keys: int, block_size: int = BLOCK_SIZE) -> None:
    """Every request's first num_keys keys (whole blocks) become request 0's: its table's
    first blocks in every row, as a prompt prefix from the prefix cache."""
    num_blocks = num_keys // block_size
    batch["block_tables"][:, :num_blocks] = batch["block_tables"][0, :num_blocks].clone()


def time_ms(fn, reps: int = 15) -> float:
    """Median of single eager calls between two events: host launch time included (for the
    4 GiB bandwidth passes, whose launch is short next to the work)."""
    for _ in range(3):  # compile, and bring the clocks up (the first timing ran ~20% slow)
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_graph_ms(fn, reps: int = 20) -> float:
    """fn captured in a CUDA graph (as the engine replays decode steps), then `reps` replays
    back to back between two events: no host launch time in the figure."""
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def sweep(cases: dict, configs: list, run, work, unit: str) -> dict:
    """run(batch, config or None, plans) -> output (plans: a dict for the step's plans, which
    the engine builds once per step: filled by the call before the capture); work(head_dim,
    lens) -> work per launch. Timed replayed from a CUDA graph: GPU time only, as in the
    engine, whose decode steps replay graphs and whose eager steps launch ahead of the GPU."""
    results = {}
    for name, (head_dim, lens, shared, *grown_from) in cases.items():
        batch = paged_batch([q for q, _ in lens], [p for _, p in lens], NUM_HEADS,
                            NUM_KV_HEADS, head_dim, BLOCK_SIZE,
                            grown_from=(grown_from or [None])[0])
        share_prefix(batch, shared)
        expected = run(batch, None, {})
        rows = []
        for config in [None, *configs]:
            plans = {}
            try:
                out = run(batch, config, plans)
                err = (out.float() - expected.float()).abs().max().item()
                ms = time_graph_ms(lambda: run(batch, config, plans))
            except Exception as e:  # noqa: BLE001 - a config may not compile (shared memory)
                rows.append({"config": config, "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            rows.append({"config": config, "ms": ms, "rate": work(head_dim, lens) / ms / 1e9,
                         "max_abs_diff": err})
        ok = sorted((r for r in rows if "ms" in r and r["max_abs_diff"] < 5e-2),
                    key=lambda r: r["ms"])
        default = rows[0]
        print(f"{name}: default {default.get('ms', float('nan')):.3f} ms "
              f"({default.get('rate', 0):.3g} {unit})")
        for r in ok[:5]:
            print(f"    {r['config']}: {r['ms']:.3f} ms ({r['rate']:.3g} {unit}, "
                  f"x{default['ms'] / r['ms']:.2f} of default)")
        results[name] = rows
        del batch
        torch.cuda.empty_cache()
    return results


def sweep_cascade(run_decode) -> dict:
    """Decode over requests sharing their first blocks, ms: the shared keys read per request
    (plain) and once for the batch (cascade, with the decode kernel's tile variants for the
    keys after the prefix), and the parts: the requests' own keys alone (plain, no prefix),
    the same lengths with no block shared, and the prefix alone (cascade over contexts of the
    prefix and one key)."""
    results = {}
    for name, (num_reqs, shared, own) in CASCADE_CASES.items():
        length = torch.tensor([shared], dtype=torch.int32, device="cuda")
        row = {}
        for part, prefix_lens in (("own keys only", own - 1), ("unshared", shared + own - 1),
                                  ("prefix only", shared), ("whole", shared + own - 1)):
            batch = paged_batch([1] * num_reqs, [prefix_lens] * num_reqs, NUM_HEADS,
                                NUM_KV_HEADS, 128, BLOCK_SIZE)
            if part in ("own keys only", "unshared"):  # every request its own blocks
                row[part] = time_graph_ms(lambda: run_decode(batch, None))
                continue
            share_prefix(batch, shared)
            if part == "prefix only":
                row[part] = time_graph_ms(lambda: run_decode(batch, None, length))
                continue
            plain = run_decode(batch, None)
            row["max_abs_diff"] = 0.0
            for config in [None, *SHORT_DECODE_CONFIGS]:
                for kind, shared_len in (("plain", None), ("cascade", length)):
                    try:
                        out = run_decode(batch, config, shared_len)
                        ms = time_graph_ms(lambda: run_decode(batch, config, shared_len))
                    except Exception:  # noqa: BLE001 - a config may not compile
                        continue
                    row["max_abs_diff"] = max(row["max_abs_diff"],
                                              (out.float() - plain.float()).abs().max().item())
                    row[f"{kind} {config}"] = ms
            del batch
            torch.cuda.empty_cache()
        best = {kind: min((k for k in row if k.startswith(kind)), key=row.get)
                for kind in ("plain", "cascade")}
        print(f"{name}: plain {row['plain None']:.3f} ms (best {best['plain']}: "
              f"{row[best['plain']]:.3f}), cascade {row['cascade None']:.3f} ms (best "
              f"{best['cascade']}: {row[best['cascade']]:.3f}); own keys only "
              f"{row['own keys only']:.3f}, unshared {row['unshared']:.3f}, prefix only "
              f"{row['prefix only']:.3f}; max diff {row['max_abs_diff']:.2e}")
        results[name] = row
    return results


def sweep_mixed() -> dict:
    """Mixed steps, ms: every request by the prefill kernel (64-row tiles: a decode's GROUP
    rows padded), against the leading decodes by the decode kernel (one split; plain, and
    cascade over the shared keys) and the chunks by the prefill kernel, as the engine does
    (`Attention.attend` itself)."""
    results = {}
    for name, (head_dim, lens, shared) in MIXED_CASES.items():
        batch = paged_batch([q for q, _ in lens], [p for _, p in lens], NUM_HEADS,
                            NUM_KV_HEADS, head_dim, BLOCK_SIZE)
        share_prefix(batch, shared)
        nd = sum(1 for q, _ in lens if q == 1)
        length = torch.tensor([shared], dtype=torch.int32, device="cuda")
        variants = [("one kernel", 0, None), ("split", nd, None)]
        if shared:
            variants.append(("split, cascade", nd, length))
        row, expected = {}, None
        for kind, num_decodes, shared_len in variants:
            layer, ctx = mixed_step(batch, num_decodes, shared_len)

            def attend():  # ctx's plans are filled by the first call, before the capture
                return layer.attend(batch["q"], batch["key_cache"], batch["value_cache"], ctx)
            out = attend()
            expected = out if expected is None else expected
            row[f"{kind} max_abs_diff"] = (out.float() - expected.float()).abs().max().item()
            row[kind] = time_graph_ms(attend)
        print(f"{name}: one kernel {row['one kernel']:.3f} ms; " + "; ".join(
            f"{kind} {row[kind]:.3f} ms (x{row['one kernel'] / row[kind]:.2f}, max diff "
            f"{row[kind + ' max_abs_diff']:.1e})" for kind, _, _ in variants[1:]))
        results[name] = row
        del batch
        torch.cuda.empty_cache()
    return results


def sweep_sample() -> dict:
    """The fused sampler on a step's bf16 logits (llama3-8b's vocabulary), ms by (BLOCK,
    num_warps, splits): one program per row, or the vocabulary split across several."""
    from batchgen.kernels.gumbel_sample import gumbel_sample

    configs = [(1024, 4, 1), (1024, 8, 1), (2048, 8, 1), (1024, 4, 2), (1024, 4, 4),
               (1024, 4, 8), (2048, 8, 2), (2048, 8, 4), (1024, 4, None), (2048, 8, None)]
    results = {}
    for rows in (64, 500, 1024):
        x = torch.randn(rows, 128256, device="cuda", dtype=torch.bfloat16)
        keys = torch.randint(0, 2**32, (rows,), device="cuda")
        for label, temperature in (("t=1", torch.ones(rows, device="cuda")),
                                   ("t=0.7", torch.full((rows,), 0.7, device="cuda"))):
            expected = gumbel_sample(x, keys, temperature)
            row = {}
            for config in configs:
                out = gumbel_sample(x, keys, temperature, tuning=config)
                assert torch.equal(out, expected), config
                row[str(config)] = time_graph_ms(
                    lambda: gumbel_sample(x, keys, temperature, tuning=config))
            best = min(row, key=row.get)
            print(f"sample {rows} x 128256 {label}: (1024, 4, 1) {row['(1024, 4, 1)']:.3f} ms, "
                  f"chosen {row['(1024, 4, None)']:.3f} ms, best {best} {row[best]:.3f} ms")
            results[f"{rows} {label}"] = row
    return results


def sweep_rowwise() -> dict:
    """The step's row-wise kernels at llama3-8b's widths, ms by launch config, graph-timed:
    RMSNorm by num_warps, SiLU-and-mul by (BLOCK, num_warps), rotary + KV write by num_warps
    (the first config of each is the engine's)."""
    from batchgen.kernels import rms_norm as norm_mod
    from batchgen.kernels import rotary_kv_write as rotary_mod
    from batchgen.kernels import silu_and_mul as silu_mod

    hidden, intermediate, heads, kv_heads, dim = 4096, 14336, 32, 8, 128
    results = {}
    for rows in (64, 500, 1024):
        x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(x)
        gate_up = torch.randn(rows, 2 * intermediate, device="cuda", dtype=torch.bfloat16)
        act = torch.empty(rows, intermediate, device="cuda", dtype=torch.bfloat16)
        qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, device="cuda",
                          dtype=torch.bfloat16)
        q = qkv[:, :heads * dim].view(rows, heads, dim)
        k = qkv[:, heads * dim:(heads + kv_heads) * dim].view(rows, kv_heads, dim)
        v = qkv[:, (heads + kv_heads) * dim:].view(rows, kv_heads, dim)
        cache = [torch.zeros(rows, 16, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
                 for _ in range(2)]
        positions = torch.randint(0, 4096, (rows,), device="cuda")
        cos_sin = torch.randn(4096, dim, device="cuda")
        slots = torch.randperm(rows * 16, device="cuda")[:rows]
        rotary_warps = 8 if rows <= rotary_mod._MAX_TOKENS_FOR_8_WARPS else 4

        def norm(warps):
            norm_mod._rms_norm_kernel[(rows,)](x, w, out, hidden, x.stride(0), out.stride(0),
                                               1e-5, BLOCK=hidden, num_warps=warps)

        def silu(config):
            block, warps = config
            silu_mod._silu_and_mul_kernel[(rows, -(-intermediate // block))](
                gate_up, act, intermediate, gate_up.stride(0), act.stride(0), BLOCK=block,
                num_warps=warps)

        def rotary(warps):
            rotary_mod._rotary_kv_write_kernel[(rows,)](
                q, k, v, positions, cos_sin, *cache, slots, heads, kv_heads, q.stride(0),
                q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                cos_sin.stride(0), HEAD_DIM=dim, IS_NEOX=True, BLOCK_H=heads,
                BLOCK_KVH=kv_heads, ROTATE_K=False, num_warps=warps)

        for name, run, configs in (
                ("rms_norm", norm, (8, 16, 4, 2, 1)),
                ("silu_and_mul", silu, ((4096, 8), (4096, 4), (4096, 16), (2048, 4), (2048, 8),
                                        (1024, 4), (1024, 2), (8192, 8), (8192, 16))),
                ("rotary_kv_write", rotary, (rotary_warps, *(
                    w for w in (1, 2, 4, 8) if w != rotary_warps)))):
            row = {str(c): time_graph_ms(lambda: run(c), reps=100) * 1000 for c in configs}
            best = min(row, key=row.get)
            print(f"{name} {rows} rows: engine's {configs[0]} {row[str(configs[0])]:.2f} us, "
                  f"best {best} {row[best]:.2f} us; " + ", ".join(
                      f"{c} {t:.2f}" for c, t in row.items()))
            results[f"{name} {rows} (us)"] = row
    return results


def sweep_bandwidth() -> dict:
    """Read-only and copy bandwidth over 4 GiB, TB/s: the decode kernel's ceilings. Read by
    torch's sum and by a plain Triton streaming read at several (BLOCK, ITERS, num_warps):
    whether the sum leaves read bandwidth that a kernel could still take."""
    import triton
    import triton.language as tl

    @triton.jit
    def read_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
        # each program sums ITERS consecutive blocks of BLOCK elements
        start = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
        acc = tl.zeros((BLOCK,), tl.float32)
        for i in range(ITERS):
            acc += tl.load(x_ptr + start + i * BLOCK + tl.arange(0, BLOCK)).to(tl.float32)
        tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))

    x = torch.empty(2 * 1024**3, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    read_ms = time_ms(lambda: x.sum(dtype=torch.float32))
    copy_ms = time_ms(lambda: y.copy_(x))
    out = {"read TB/s": x.numel() * 2 / read_ms / 1e9,
           "copy TB/s": 2 * x.numel() * 2 / copy_ms / 1e9}
    sums = torch.empty(x.numel() // 1024, device="cuda")
    for block, iters, warps in itertools.product((1024, 4096, 8192), (1, 8, 64), (4, 8)):
        grid = (x.numel() // (block * iters),)
        ms = time_ms(lambda: read_kernel[grid](x, sums, BLOCK=block, ITERS=iters,
                                               num_warps=warps))
        out[f"triton read {block}/{iters}/{warps} TB/s"] = x.numel() * 2 / ms / 1e9
    best = max((k for k in out if k.startswith("triton")), key=out.get)
    print(f"bandwidth: read {out['read TB/s']:.3f} TB/s, copy {out['copy TB/s']:.3f} TB/s, "
          f"best Triton read ({best[12:-5]}) {out[best]:.3f} TB/s")
    del x, y, sums
    torch.cuda.empty_cache()
    return out


def sweep_gemm() -> dict:
    """F.linear at the model's shapes under each BLAS library torch can call: TFLOP/s, graph
    timed. Replays reuse one weight, which L2 (50 MB) may hold where it is small (o_proj's
    34 MB): the engine reads every layer's from HBM, so take these as upper bounds."""
    import torch.nn.functional as F

    results = {}
    default = torch.backends.cuda.preferred_blas_library()
    try:
        for name, (n, k) in GEMM_SHAPES.items():
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            for m in GEMM_TOKENS:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                row = {}
                for lib in ("cublas", "cublaslt"):
                    torch.backends.cuda.preferred_blas_library(lib)
                    ms = time_graph_ms(lambda: F.linear(x, w))
                    row[lib] = 2 * m * n * k / ms / 1e9
                results[f"{name} M={m}"] = row
                print(f"gemm {name} [{m} x {k}] x [{k} x {n}]: " + ", ".join(
                    f"{lib} {tf:.0f} TFLOP/s" for lib, tf in row.items()))
    finally:
        torch.backends.cuda.preferred_blas_library(default)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--only", default="decode,prefill,gemm,cascade,mixed,sample,rowwise,bandwidth",
                   help="comma list of sections")
    args = p.parse_args(argv)
    sections = set(args.only.split(","))
    if not torch.cuda.is_available():
        print("kernel_sweep needs a GPU")
        return 1
    from batchgen.kernels.decode_attention import choose_num_splits, decode_attention
    from batchgen.kernels.prefill_attention import prefill_attention

    def run_decode(b, config, shared_prefix_len=None):
        # config: (BLOCK_N, num_warps, num_stages, K_ROWS[, splits]); splits None = chosen
        splits = choose_num_splits(b["q"].shape[0], NUM_KV_HEADS, GRAPH_MAX_SEQ_LEN,
                                   b["q"].device)
        if config is not None and len(config) == 5:
            config, splits = config[:4], config[4] or splits
        return decode_attention(b["q"], b["key_cache"], b["value_cache"], b["block_tables"],
                                b["seq_lens"], b["scale"], GRAPH_MAX_SEQ_LEN,
                                num_splits=splits, tuning=config,
                                shared_prefix_len=shared_prefix_len)

    def run_prefill(b, config, plans):
        return prefill_attention(**b, tuning=config, plan_cache=plans)

    def decode_bytes(head_dim, lens):  # K and V read, bf16; bytes / ms / 1e9 = TB/s
        return sum(q + p for q, p in lens) * 2 * NUM_KV_HEADS * head_dim * 2

    def prefill_flops(head_dim, lens):  # 4 * H * D per (query, visible key) pair
        pairs = sum(sum(p + i + 1 for i in range(q)) for q, p in lens)
        return 4 * NUM_HEADS * head_dim * pairs

    results = {}
    if "gemm" in sections:
        results["gemm (TFLOP/s)"] = sweep_gemm()
    if "prefill" in sections:
        results["prefill (TFLOP/s)"] = sweep(PREFILL_CASES, PREFILL_CONFIGS, run_prefill,
                                             prefill_flops, "TFLOP/s")
    if "decode" in sections:
        results["decode (TB/s)"] = sweep(DECODE_CASES, DECODE_CONFIGS + SHORT_DECODE_CONFIGS
                                         + SPLIT_DECODE_CONFIGS,
                                         lambda b, config, _: run_decode(b, config),
                                         decode_bytes, "TB/s")
    if "decode-grown" in sections:
        results["decode, grown blocks (TB/s)"] = sweep(
            GROWN_DECODE_CASES, DECODE_CONFIGS, lambda b, config, _: run_decode(b, config),
            decode_bytes, "TB/s")
    if "cascade" in sections:
        results["cascade"] = sweep_cascade(run_decode)
    if "sample" in sections:
        results["sample (ms)"] = sweep_sample()
    if "mixed" in sections:
        results["mixed (ms)"] = sweep_mixed()
    if "rowwise" in sections:
        results["rowwise (us)"] = sweep_rowwise()
    if "bandwidth" in sections:
        results["bandwidth"] = sweep_bandwidth()
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
