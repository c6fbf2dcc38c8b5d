"""`--data-parallel` on whatever GPUs this machine has (two workers may share one GPU): the same
text job through `batchgen run` with 1 and with K workers; rows/s from the moment every worker
is ready, and the row ids both runs wrote. Random weights of a real shape (--load-format dummy)
and a real tokenizer folder.

    python bench/dp_check.py --tokenizer TOKENIZER_DIR --workers 2 --rows 4000 --out $OUT/dp.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import get_shape  # noqa: E402

from batchgen.job.status import job_status  # noqa: E402
from batchgen.job.verification import verify_job  # noqa: E402
from batchgen.job.writer import list_parts, read_part  # noqa: E402


def write_rows(path: Path, num_rows: int) -> None:
    samples = Path(__file__).resolve().parent.parent / "samples" / "reviews.jsonl"
    base = [json.loads(line) for line in samples.read_text().splitlines()]
    with open(path, "w") as f:
        for i in range(num_rows):
            row = base[i % len(base)]
            f.write(json.dumps({"id": i, "review": f"{row['review']} (order {i})"}) + "\n")


def run(argv: list[str], workers: int, out: Path) -> dict:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "batchgen.cli", "run", *argv, "--output", str(out), "--quiet"]
    if workers > 1:
        cmd += ["--data-parallel", str(workers)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rows = sorted(r["row"] for p in list_parts(out).values() for r in read_part(p))
    status = job_status(out)
    return {"workers": workers, "exit": done.returncode, "wall_s": wall,
            "num_rows": len(rows), "rows_unique": len(set(rows)) == len(rows),
            "verify_ok": verify_job(out).is_ok, "parts": status.num_parts_committed,
            "row_ids": rows, "stderr_tail": done.stderr[-1500:]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    model = get_shape(args.shape).write_config(tmp / "model")
    data = tmp / "rows.jsonl"
    write_rows(data, args.rows)
    argv = ["--input", str(data), "--model", str(model), "--load-format", "dummy",
            "--tokenizer", args.tokenizer, "--prompt-column", "review", "--no-chat",
            "--max-tokens", str(args.max_tokens), "--ignore-eos", "--temperature", "0",
            "--rows-per-part", "250", "--format", "jsonl", "--max-model-len", "1024"]
    results = [run(argv, 1, tmp / "dp1"), run(argv, args.workers, tmp / f"dp{args.workers}")]
    same_ids = results[0]["row_ids"] == results[1]["row_ids"] == list(range(args.rows))
    for r in results:
        r.pop("row_ids")
        print(json.dumps(r))
    print(f"same row ids in both runs: {same_ids}; wall dp1 {results[0]['wall_s']:.1f} s, "
          f"dp{args.workers} {results[1]['wall_s']:.1f} s (start-up included)")
    if args.out:
        args.out.write_text(json.dumps({"results": results, "same_row_ids": same_ids}, indent=1))
    return 0 if same_ids and all(r["exit"] == 0 and r["verify_ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
