"""Times torch's own attention backends beside batchgen's paged prefill kernel on fresh prompts
(no cached keys: the prefill workload's steps), GPU only.

    python bench/attention_backends.py --out $OUT/attention-backends.json

Fresh prompts need no paged reads: their keys and values are the step's own, contiguous in
token order. So torch's varlen kernels (flash: `_flash_attention_forward`; cuDNN:
`_cudnn_attention_forward`, ragged) could take them straight from the projections. Each
backend is timed with eager calls between events (as the engine calls it), and its first call
alone (a new shape's plan or compile); its output is checked
against the paged kernel's, and reported as causal attention TFLOP/s; a backend that this torch
lacks or refuses reports its error instead.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import time_ms  # noqa: E402
from kernel_sweep import NUM_HEADS, NUM_KV_HEADS  # noqa: E402
from paged_batches import paged_batch  # noqa: E402

# name -> (head_dim, query lengths of the step's fresh prompts)
CASES = {
    "prefill workload: 15 x 1024 fresh": (128, [1024] * 15),
    "16 x 1024 fresh": (128, [1024] * 16),
    "reviews-like lengths, fresh: 24 x 64..768": (128, [64 + 32 * i for i in range(24)]),
    "llama-1b dim 64: 15 x 1024 fresh": (64, [1024] * 15),
}


def contiguous_kv(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The paged caches' keys and values of every request, in token order: [T, KVH, D]."""
    from batchgen.kernels.prefill_attention import gather_kv_ref

    lens = (batch["query_start_loc"][1:] - batch["query_start_loc"][:-1]).tolist()
    return tuple(torch.cat([per_req[req, :n] for req, n in enumerate(lens)]) for per_req in (
        gather_kv_ref(batch[cache], batch["block_tables"], batch["max_seq_len"])
        for cache in ("key_cache", "value_cache")))


def backends(batch: dict) -> dict:
    """name -> fn() returning [T, H, D] or [T, H * D], each on the same queries, keys and
    values."""
    from batchgen.kernels.prefill_attention import prefill_attention
    from batchgen.layers.dense_attention import dense_causal_attention

    q, scale, max_len = batch["q"], batch["scale"], batch["max_query_len"]
    cu = batch["query_start_loc"]
    lens = set((cu[1:] - cu[:-1]).tolist())
    k, v = contiguous_kv(batch)
    group = q.shape[1] // k.shape[1]
    k_wide, v_wide = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    # the engine's layout: q, k and v as strided views of one fused qkv row per token
    fused = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
    views = [x.view(q.shape[0], -1, q.shape[2]) for x in fused.split(
        [q[0].numel(), k[0].numel(), v[0].numel()], dim=1)]
    plans: dict = {}

    def flash(keys, values):
        return lambda: torch.ops.aten._flash_attention_forward(
            q, keys, values, cu, cu, max_len, max_len, 0.0, True, False, scale=scale)[0]

    def cudnn_ragged(keys, values):
        return lambda: torch.ops.aten._cudnn_attention_forward(
            q, keys, values, None, cu, cu, max_len, max_len, False, 0.0, True, False,
            scale=scale)[0]

    def dense(backend, keys, values):  # equal lengths only: [B, H, L, D] views
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def view(x):
            return x.view(-1, max_len, x.shape[1], x.shape[2]).transpose(1, 2)

        def run():
            if len(lens) != 1:
                raise ValueError("dense SDPA needs prompts of one length")
            with sdpa_kernel(getattr(SDPBackend, backend)):
                out = torch.nn.functional.scaled_dot_product_attention(
                    view(q), view(keys), view(values), is_causal=True, scale=scale,
                    enable_gqa=keys.shape[1] != q.shape[1])
            return out.transpose(1, 2).reshape(q.shape)
        return run

    def engine_dense():
        if len(lens) != 1:
            raise ValueError("dense attention needs prompts of one length")
        return dense_causal_attention(*views, 0, len(cu) - 1, max_len, scale)

    return {
        "batchgen paged kernel": lambda: prefill_attention(**batch, plan_cache=plans),
        "batchgen dense (cuDNN on strided qkv views)": engine_dense,
        "sdpa dense cudnn, GQA": dense("CUDNN_ATTENTION", k, v),
        "sdpa dense cudnn, kv pre-expanded": dense("CUDNN_ATTENTION", k_wide, v_wide),
        "sdpa dense flash, GQA": dense("FLASH_ATTENTION", k, v),
        "flash varlen, GQA": flash(k, v),
        "flash varlen, kv pre-expanded": flash(k_wide, v_wide),
        "cudnn ragged, GQA": cudnn_ragged(k, v),
        "cudnn ragged, kv pre-expanded": cudnn_ragged(k_wide, v_wide),
    }


def causal_flops(head_dim: int, lens: list[int]) -> int:
    return 4 * NUM_HEADS * head_dim * sum(n * (n + 1) // 2 for n in lens)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_backends needs a GPU")
        return 1
    results = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}
    for name, (head_dim, lens) in CASES.items():
        batch = paged_batch(lens, [0] * len(lens), NUM_HEADS, NUM_KV_HEADS, head_dim)
        fns = backends(batch)
        reference = fns["batchgen paged kernel"]().float()
        rows = {}
        for backend, fn in fns.items():
            try:
                torch.cuda.synchronize()
                start = time.perf_counter()
                first = fn()  # with any plan a new shape needs (cuDNN's), or a compile
                torch.cuda.synchronize()
                first_ms = (time.perf_counter() - start) * 1e3
                err = (first.float().view(reference.shape) - reference).abs().max().item()
                ms = time_ms(fn, reps=20)
            except Exception as exc:  # a backend this torch lacks or refuses
                rows[backend] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            else:
                rows[backend] = {"ms": round(ms, 4), "first_call_ms": round(first_ms, 1),
                                 "max_abs_err": err,
                                 "tflops": round(causal_flops(head_dim, lens) / ms / 1e9, 1)}
            print(f"{name} | {backend} | {rows[backend]}", flush=True)
        results[name] = rows
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
