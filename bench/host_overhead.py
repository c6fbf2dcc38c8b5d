"""Host work per engine step, measured on the CPU with a 1-layer toy model so the Python side
dominates: scheduling, input preparation, sampling metadata, output update. The GPU's `small`
workload is bound by exactly this work; use it to measure host-side changes between GPU runs.

    python bench/host_overhead.py [--requests 1024] [--output-tokens 64]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import Shape  # noqa: E402

from batchgen import LLM, SamplingParams  # noqa: E402

TOY = Shape(name="toy", architecture="LlamaForCausalLM", hidden_size=32, intermediate_size=64,
            num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, vocab_size=256,
            rope_theta=10000.0, dtype="float32", max_position_embeddings=2048)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1024)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    folder = TOY.write_config(Path(tempfile.mkdtemp()) / "toy")
    llm = LLM(str(folder), load_format="dummy", skip_tokenizer_init=True, device="cpu",
              dtype="float32", max_num_seqs=1024, max_num_batched_tokens=16384,
              max_model_len=1024, num_kv_blocks=8192)
    r = random.Random(0)
    prompts = [{"prompt_token_ids": [r.randrange(1, 256) for _ in range(r.randint(32, 160))]}
               for _ in range(args.requests)]
    params = SamplingParams(max_tokens=args.output_tokens, ignore_eos=True, temperature=1.0)
    llm.generate(prompts[:16], params, use_tqdm=False)
    best = None
    for _ in range(args.repeats):
        llm.engine.reset_peak_stats()
        before = llm.engine.stats().num_steps
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        stats = llm.engine.stats()
        steps = stats.num_steps - before
        phases = {k: v / steps * 1e3 for k, v in stats.step_seconds.items()}
        host = sum(v for k, v in phases.items() if k not in ("launch_forward", "wait_gpu"))
        run = {"steps": steps, "wall_ms_per_step": wall / steps * 1e3,
               "host_ms_per_step_excl_forward": host,
               "phases_ms_per_step": {k: round(v, 3) for k, v in phases.items()}}
        if best is None or host < best["host_ms_per_step_excl_forward"]:
            best = run
    print(json.dumps(best, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
