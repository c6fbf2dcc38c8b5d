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
end (RESULTS.md, session 6). `decode-grown` lays the blocks out as the engine's pool hands
them to a lock-step batch (session 15). The sections beyond attention are in op_sweeps.py.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from gpu_timing import time_graph_ms
from op_sweeps import sweep_bandwidth, sweep_gemm, sweep_rowwise, sweep_sample
from paged_batches import BLOCK_SIZE, mixed_step, paged_batch, share_prefix

NUM_HEADS, NUM_KV_HEADS = 32, 8
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
