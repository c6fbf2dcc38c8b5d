"""End to end with the real small model on CPU, through the `batchgen` command: kill -9 at
random moments and re-run until done -> the same output as an uninterrupted run."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchgen.job.verification import verify_job
from batchgen.job.writer import list_parts, read_part

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
NUM_ROWS = 40  # 20 parts of 2 rows: work left for every kill


def job_argv(src, out, model) -> list[str]:
    return [sys.executable, "-m", "batchgen.cli", "run", "--input", str(src), "--output", str(out),
            "--model", str(model), "--prompt-column", "review", "--max-tokens", "4",
            "--temperature", "0", "--rows-per-part", "2", "--format", "jsonl",
            "--max-num-seqs", "2", "--max-model-len", "256", "--device", "cpu", "--quiet"]


def rows_of(out: Path) -> list[dict]:
    parts = list_parts(out)
    return [{k: r[k] for k in ("row", "text", "finish_reason", "output_tokens", "error")}
            for p in sorted(parts) for r in read_part(parts[p])]


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("e2e") / "reviews.jsonl"
    lines = (ROOT / "samples" / "reviews.jsonl").read_text().splitlines()[:NUM_ROWS - 2]
    lines.insert(3, "{broken json")
    lines.insert(6, json.dumps({"id": "x", "review": None}))
    src.write_text("\n".join(lines) + "\n")
    return src


def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(
        tmp_path, sample, smol_model_dir):
    env = dict(os.environ, BATCHGEN_CACHE=str(ROOT / ".cache"))
    reference = tmp_path / "reference"
    done = subprocess.run(job_argv(sample, reference, smol_model_dir), env=env, timeout=600,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = rows_of(reference)
    assert [r["row"] for r in expected] == list(range(NUM_ROWS))
    assert expected[3]["error"] and expected[6]["error"]
    assert all(r["text"] for r in expected if r["row"] not in (3, 6))

    out = tmp_path / "killed"
    rng = random.Random(0)
    num_kills = 0
    for _ in range(10):
        # A random moment: after 0-2 more parts commit (0: during start-up or the first
        # part), plus a random fraction of a part's time; measured by progress, not seconds,
        # so a fast machine still gets killed mid-job.
        num_before = len(list_parts(out))
        target = num_before + rng.randint(0, 2)
        proc = subprocess.Popen(job_argv(sample, out, smol_model_dir), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while len(list_parts(out)) < target and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            num_kills += 1
        proc.wait()
        if num_kills == 5:
            break
    print(f"killed {num_kills} times; parts before the last run: {sorted(list_parts(out))}")
    for _ in range(3):
        if subprocess.run(job_argv(sample, out, smol_model_dir), env=env, timeout=600,
                          capture_output=True).returncode == 0:
            break
    assert num_kills >= 5
    assert rows_of(out) == expected
    assert verify_job(out).is_ok
    assert not [n for n in os.listdir(out) if n.startswith("_tmp")]


def test_sigterm_commits_and_exits_75_then_resumes(tmp_path, sample, smol_model_dir):
    env = dict(os.environ, BATCHGEN_CACHE=str(ROOT / ".cache"))
    out = tmp_path / "out"
    proc = subprocess.Popen(job_argv(sample, out, smol_model_dir), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list_parts(out) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    code = proc.wait(timeout=60)
    assert time.monotonic() - start < 30
    assert code in (75, 0)
    again = subprocess.run(job_argv(sample, out, smol_model_dir), env=env, timeout=600,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["row"] for r in rows_of(out)] == list(range(NUM_ROWS))
    final = subprocess.run(job_argv(sample, out, smol_model_dir), env=env, timeout=600,
                           capture_output=True, text=True)
    assert final.returncode == 0
