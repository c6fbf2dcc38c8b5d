"""Can a decode step's attention run beside its GEMMs when the GEMMs leave SMs free? (GPU)

    python bench/overlap_probe.py --out $OUT/overlap.json

A llama3-8b-shaped stack of 32 layers (qkv, paged decode attention, o, gate_up, SiLU-and-mul,
down; no norms, rotary or residual: they do not change the question) at the decode workload's
mid-run step (500 sequences of 640 tokens), captured as CUDA graphs and timed:

- `one stream`: the whole batch in order, as the engine runs a decode step today;
- `halves, carveout k`: the batch cut into two halves, every GEMM on one stream and every
  attention kernel on another, pipelined (A0's attention under B's GEMMs, then B0's under
  A's, ...), with the BLAS told to leave k SMs to the attention
  (torch._C._set_sm_carveout_experimental: cuBLASLt honours it, cuBLAS does not). Session 4
  ran halves without a carveout and lost: both kinds of kernel fill all 132 SMs;
- `halves, carveout k, attention on green k`: the attention stream confined to a green
  context of k SMs (where torch and the driver have them).

Each piece alone is timed too (the GEMMs of one half at each carveout, the attention of one
half), so the result says why. The step's floor is max(GEMM alone, KV + weight bytes / copy
rate); today's step is the sum of the two. Session 6's outcome (no variant beat one stream)
is in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import time_ms  # noqa: E402
from paged_batches import paged_batch  # noqa: E402

from batchgen.kernels.decode_attention import decode_attention  # noqa: E402
from batchgen.kernels.silu_and_mul import silu_and_mul  # noqa: E402

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, DIM = 4096, 14336, 32, 32, 8, 128
GRAPH_MAX_SEQ_LEN = 4096  # the engine's decode graphs are captured with max_model_len


class Stack:
    """32 layers of weights and KV caches (distinct per layer, so nothing is served from L2)."""

    def __init__(self, num_seqs: int, context: int) -> None:
        gen = torch.Generator(device="cuda").manual_seed(0)

        def weight(n: int, k: int) -> torch.Tensor:
            return torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02

        self.layers = [(weight((HEADS + 2 * KV_HEADS) * DIM, HIDDEN), weight(HIDDEN, HIDDEN),
                        weight(2 * INTER, HIDDEN), weight(HIDDEN, INTER))
                       for _ in range(LAYERS)]
        batch = paged_batch([1] * num_seqs, [context - 1] * num_seqs, HEADS, KV_HEADS, DIM)
        self.block_tables, self.seq_lens = batch["block_tables"], batch["seq_lens"]
        self.caches = [(batch["key_cache"], batch["value_cache"])]
        for _ in range(LAYERS - 1):
            self.caches.append((torch.randn_like(batch["key_cache"]),
                                torch.randn_like(batch["value_cache"])))
        self.x = torch.randn(num_seqs, HIDDEN, device="cuda", generator=gen,
                             dtype=torch.bfloat16)

    def attention(self, layer: int, qkv: torch.Tensor, rows: slice) -> torch.Tensor:
        q = qkv[:, :HEADS * DIM].view(-1, HEADS, DIM)
        key_cache, value_cache = self.caches[layer]
        out = decode_attention(q, key_cache, value_cache, self.block_tables[rows],
                               self.seq_lens[rows], DIM ** -0.5, GRAPH_MAX_SEQ_LEN)
        return out.view(-1, HEADS * DIM)

    def mlp(self, layer: int, attn: torch.Tensor) -> torch.Tensor:
        _, w_o, w_gate_up, w_down = self.layers[layer]
        return F.linear(silu_and_mul(F.linear(F.linear(attn, w_o), w_gate_up)), w_down)

    def one_stream(self) -> torch.Tensor:
        x = self.x
        for layer in range(LAYERS):
            x = self.mlp(layer, self.attention(layer, F.linear(x, self.layers[layer][0]),
                                               slice(None)))
        return x

    def pipelined(self, attention_stream: torch.cuda.Stream) -> torch.Tensor:
        """Two halves, GEMMs on the current stream and attention on `attention_stream`, in
        the order that lets each half's attention run under the other half's GEMMs:
        GEMMs qkvA0 qkvB0 | mlpA0 qkvA1 | mlpB0 qkvB1 | ..., attention A0 B0 A1 B1 ..."""
        main = torch.cuda.current_stream()
        cut = self.x.shape[0] // 2
        rows = (slice(0, cut), slice(cut, None))
        pending: list = [None, None]  # per half: (attention output, its done event)

        def launch_attention(layer: int, half: int, qkv: torch.Tensor) -> None:
            ready = torch.cuda.Event()
            ready.record(main)
            attention_stream.wait_event(ready)
            with torch.cuda.stream(attention_stream):
                out = self.attention(layer, qkv, rows[half])
                done = torch.cuda.Event()
                done.record(attention_stream)
            pending[half] = (out, done)

        for half in (0, 1):
            launch_attention(0, half, F.linear(self.x[rows[half]], self.layers[0][0]))
        outs = [None, None]
        for layer in range(LAYERS):
            for half in (0, 1):
                out, done = pending[half]
                main.wait_event(done)
                outs[half] = self.mlp(layer, out)
                if layer + 1 < LAYERS:
                    launch_attention(layer + 1, half,
                                     F.linear(outs[half], self.layers[layer + 1][0]))
        main.wait_stream(attention_stream)
        return torch.cat(outs)

    def gemms_only(self, rows: slice) -> None:
        x = self.x[rows]
        for layer in range(LAYERS):
            x = self.mlp(layer, F.linear(x, self.layers[layer][0])[:, :HEADS * DIM])

    def attention_only(self, rows: slice) -> None:
        qkv = F.linear(self.x[rows], self.layers[0][0])
        for layer in range(LAYERS):
            self.attention(layer, qkv, rows)


def graph_ms(fn, reps: int = 10) -> tuple[float, str]:
    """fn captured once as a CUDA graph and replayed (or, where capture fails, launched
    eagerly: the host launches a step in ~3 ms, far ahead of the GPU): median ms a run."""
    for _ in range(2):  # compile the Triton kernels and warm cuBLAS outside the capture
        fn()
    torch.cuda.synchronize()
    graph, how = torch.cuda.CUDAGraph(), "graph"
    try:
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except Exception as e:  # noqa: BLE001
        torch.cuda.synchronize()
        run, how = fn, f"eager ({type(e).__name__}: {e})"[:200]
    ms = time_ms(run, reps)
    del graph
    return ms, how


def carveout(k: int | None) -> None:
    torch._C._set_sm_carveout_experimental(k if k else None)


def green_stream(num_sms: int):
    from torch.cuda import green_contexts

    context = green_contexts.GreenContext.create(num_sms=num_sms, device_id=0)
    return context, context.Stream()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--num-seqs", type=int, default=500)
    p.add_argument("--context", type=int, default=640)
    p.add_argument("--carveouts", default="0,16,24,32,48,64")
    p.add_argument("--green", default="32,48,56,64,80",
                   help="SM counts of the attention's green context (cuBLASLt, same carveout)")
    p.add_argument("--libs", default="cublas,cublaslt")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("overlap_probe: needs a CUDA GPU", file=sys.stderr)
        return 2
    carveouts = [int(k) for k in args.carveouts.split(",")]
    stack = Stack(args.num_seqs, args.context)
    side = torch.cuda.Stream()
    half = slice(0, args.num_seqs // 2)
    results: dict = {"num_seqs": args.num_seqs, "context": args.context,
                     "sms": torch.cuda.get_device_properties(0).multi_processor_count}

    def record(name: str, fn) -> None:
        try:
            ms, how = graph_ms(fn)
        except Exception as e:  # noqa: BLE001 - an API the image lacks is a result too
            results[name] = f"{type(e).__name__}: {e}"[:300]
            print(f"{name}: failed: {results[name]}", flush=True)
            return
        results[name] = {"ms": ms, "how": how}
        print(f"{name}: {ms:.2f} ms ({how})", flush=True)

    expected, got = stack.one_stream(), stack.pipelined(side)
    torch.cuda.synchronize()
    results["pipelined vs one stream, max abs diff"] = diff = (
        (expected.float() - got.float()).abs().max().item())
    print(f"pipelined vs one stream: max abs diff {diff:.3g} (values ~{expected.abs().mean():.3g})")
    default_lib = torch.backends.cuda.preferred_blas_library()
    for lib in args.libs.split(","):
        torch.backends.cuda.preferred_blas_library(lib)
        for k in carveouts:
            carveout(k)
            record(f"{lib}: GEMMs of all rows, carveout {k}",
                   lambda: stack.gemms_only(slice(None)))
            record(f"{lib}: GEMMs of one half, carveout {k}", lambda: stack.gemms_only(half))
            record(f"{lib}: halves, carveout {k}", lambda: stack.pipelined(side))
        carveout(0)
        record(f"{lib}: one stream", stack.one_stream)
    record("attention of all rows", lambda: stack.attention_only(slice(None)))
    record("attention of one half", lambda: stack.attention_only(half))
    # cuBLAS proper ignores the carveout (its GEMM times above do not move); cuBLASLt honours it
    torch.backends.cuda.preferred_blas_library("cublaslt")
    for k in (int(k) for k in args.green.split(",") if k):
        try:
            context, stream = green_stream(k)
        except Exception as e:  # noqa: BLE001
            results[f"green {k}"] = f"{type(e).__name__}: {e}"[:300]
            print(f"green contexts: {results[f'green {k}']}", flush=True)
            break

        def on_green(fn, stream=stream):
            def run():
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    fn()
                torch.cuda.current_stream().wait_stream(stream)
            return run

        record(f"attention of one half on green {k}", on_green(lambda: stack.attention_only(half)))
        carveout(k)
        got = stack.pipelined(stream)
        torch.cuda.synchronize()
        results[f"green {k}: max abs diff"] = (expected.float() - got.float()).abs().max().item()
        record(f"cublaslt: GEMMs of one half, carveout {k}", lambda: stack.gemms_only(half))
        record(f"cublaslt: halves, carveout {k}, attention on green {k}",
               lambda: stack.pipelined(stream))
        carveout(0)
        del context
    torch.backends.cuda.preferred_blas_library(default_lib)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
