"""Engine variants A/B'd in one process, on one model and one workload: each variant is run in
turn, round after round (A B C A B C ...), so machine drift and the power cap's warm-up fall on
every variant alike. Kernel sweeps time a kernel alone at burst clocks; under the H200's 700 W
cap what counts is the whole step's energy, so a choice is confirmed here, end to end.

    python bench/ab_probe.py --shape llama3-8b --workload prefill --limit 400 \
        --variants default,tiles=128/32/4/2/1 --rounds 2 --out $OUT/ab.json
    python bench/ab_probe.py --shape llama3-8b --workload reviews --limit 64 \
        --max-output-tokens 128 --variants default,no-pdl --rounds 5 --out $OUT/ab-set.json
    python bench/ab_probe.py --shape tiny --workload reviews --limit 8 --variants \
        default,no-mixed-split --rounds 1 --out /tmp/ab.json  # CPU: the harness itself

Variants: `default` (the code as it is); `tiles=M/N/W/S/K` (the prefill kernel's BLOCK_M,
BLOCK_N, num_warps, num_stages and K-by-rows 0/1 for head dims up to 128); `dtiles=N/W/S/K`
(the decode kernel's BLOCK_N, num_warps, num_stages and K-by-rows at head dims 64 and 128, the
graphs captured again); `no-mixed-split` (a mixed step's decodes stay in the prefill kernel);
`no-dense` (runs of fresh prompts stay in the paged kernel, not cuDNN's); `no-fused-mlp` (every
MLP on cuBLAS and silu_and_mul, the decode graphs captured again that way for its runs);
`no-pdl` (our kernels launched plainly, not by programmatic dependent launch; the graphs
captured again). Each variant is warmed up (compiled) before the first round. A variant that
needs code the engine no longer has (session 11's in-kernel q rotation) is kept in git history
with its results, not here.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_llm, generate, parse_args as bench_args  # noqa: E402
from run_info import describe_environment  # noqa: E402
from power import ClockSampler  # noqa: E402
from shapes import get_shape  # noqa: E402
from workloads import cap_outputs, draw_workload, fit_to_vocab  # noqa: E402

from batchgen.kernels import _triton, decode_attention, prefill_attention  # noqa: E402


# variant -> the model runner's attribute it sets to None (turning that path off)
SWITCHES = {"no-mixed-split": "min_mixed_decodes", "no-dense": "dense_min_tokens",
            "no-fused-mlp": "fused_mlp_shape"}
# the attributes the decode graphs are captured with: switched, they are captured again
CAPTURED = {"fused_mlp_shape"}


def check_variant(name: str) -> tuple[int, ...] | None:
    """Raises on a name no variant has; -> the tiles of a `tiles=` or `dtiles=` variant,
    else None."""
    if name in SWITCHES or name in ("default", "no-pdl"):
        return None
    for prefix, count in (("tiles=", 5), ("dtiles=", 4)):
        if name.startswith(prefix):
            parts = name[len(prefix):].split("/")
            if len(parts) == count and all(x.isdigit() for x in parts):
                return tuple(int(x) for x in parts)
    raise ValueError(f"unknown variant {name!r}: default, tiles=M/N/W/S/K, dtiles=N/W/S/K, "
                     f"no-pdl or one of {', '.join(SWITCHES)}")


@contextlib.contextmanager
def _swapped(apply, undo, graphs=None):
    """apply() while the block runs, undo() after it; `graphs` (the decode graphs, or None)
    captured again after each, so they replay the variant's kernels and then the default's."""
    apply()
    if graphs is not None:
        graphs.capture()
    try:
        yield
    finally:
        undo()
        if graphs is not None:
            graphs.capture()


def variant(name: str, llm):
    """llm's engine as variant `name` while the returned context's block runs."""
    tiles = check_variant(name)
    runner = llm.engine.runner
    if name == "no-pdl":
        saved = _triton.pdl_enabled()
        return _swapped(lambda: _triton.set_pdl(False), lambda: _triton.set_pdl(saved),
                        runner.graphs)
    if name in SWITCHES:
        attribute = SWITCHES[name]
        saved = getattr(runner, attribute)
        return _swapped(lambda: setattr(runner, attribute, None),
                        lambda: setattr(runner, attribute, saved),
                        runner.graphs if attribute in CAPTURED else None)
    if name.startswith("dtiles="):  # the decode kernel's, at head dims 64 and 128
        block_n, warps, stages, k_rows = tiles
        original = dict(decode_attention._TUNING)
        tuned = {**original, 64: (block_n, warps, stages, bool(k_rows)),
                 128: (block_n, warps, stages, bool(k_rows))}
        return _swapped(lambda: decode_attention._TUNING.update(tuned),
                        lambda: decode_attention._TUNING.update(original), runner.graphs)
    if tiles is not None:
        block_m, block_n, warps, stages, k_rows = tiles
        original = prefill_attention._tile_sizes

        def tile_sizes(head_dim: int, num_rows: int):
            if head_dim > 128:
                return original(head_dim, num_rows)
            return (min(block_m, max(16, prefill_attention.next_power_of_2(num_rows))),
                    block_n, warps, stages, bool(k_rows))
        return _swapped(lambda: setattr(prefill_attention, "_tile_sizes", tile_sizes),
                        lambda: setattr(prefill_attention, "_tile_sizes", original))
    return contextlib.nullcontext()  # default


def build_probe(args) -> tuple:
    """-> (the engine of args.shape with the bench's default settings, the requests of
    args.workload: its first args.limit, outputs capped at args.max_output_tokens)."""
    shape = get_shape(args.shape)
    requests = cap_outputs(fit_to_vocab(draw_workload(args.workload, limit=args.limit).requests,
                                        shape.vocab_size), args.max_output_tokens)
    with tempfile.TemporaryDirectory() as folder:
        shape.write_config(folder)
        return build_llm(shape, Path(folder), bench_args(["--shape", shape.name])), requests


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--workload", default="prefill")
    p.add_argument("--limit", type=int, default=None, help="the workload's first N requests")
    p.add_argument("--max-output-tokens", type=int, default=None,
                   help="outputs capped: reviews --limit 64 --max-output-tokens 128 is the "
                        "baseline set")
    p.add_argument("--variants", default="default,no-mixed-split")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    names = args.variants.split(",")
    for name in names:  # a typo fails here, before the model is built
        check_variant(name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()},
                     "environment": describe_environment(device), "runs": []}
    llm, requests = build_probe(args)
    for name in names:  # compile each variant's kernels outside the timed runs
        with variant(name, llm):
            generate(llm, cap_outputs(requests[:16], 4))
    for round_ in range(args.rounds):
        for name in names:
            llm.reset_prefix_cache()
            with variant(name, llm), ClockSampler() as clocks:
                wall, _ = generate(llm, requests)
            results["runs"].append({"variant": name, "round": round_, "wall_s": wall,
                                    "gpu_clocks": clocks.summary})
            print(f"round {round_} {name:<24} {wall:8.3f} s", flush=True)
    summary = {}
    walls = {name: [r["wall_s"] for r in results["runs"] if r["variant"] == name]
             for name in names}
    first_median = statistics.median(walls[names[0]])
    for name in names:
        median = statistics.median(walls[name])
        summary[name] = {"walls_s": walls[name], "median_s": median,
                         "vs_first": median / first_median}
        print(f"{name:<24} median {median:8.3f} s  ({median / first_median:.4f} of {names[0]})")
    results["summary"] = summary
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
