"""--data-parallel: the launcher (with stand-in workers) and, through the real CLI on the small
model, identical output for 1 and 2 workers; the shard lock between concurrent runs."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from batchgen.job.parallel import (combined_exit_code, run_data_parallel, visible_gpus,
                                   worker_argv, worker_env)

# A stand-in for `batchgen.cli`: records what it was given, then behaves as asked by --act.
FAKE_WORKER = textwrap.dedent("""
    import json, os, signal, sys, time
    argv = sys.argv[1:]
    out = argv[argv.index("--output") + 1]
    index, num = argv[argv.index("--shard") + 1].split("/")
    act = argv[argv.index("--act") + 1]
    def stop(signum, frame):
        print(f"worker {index} got signal {signum}", flush=True)
        sys.exit(75)
    signal.signal(signal.SIGUSR1, stop)
    signal.signal(signal.SIGTERM, stop)
    with open(os.path.join(out, f"worker-{index}.json"), "w") as f:
        json.dump({"argv": argv, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                   "omp": os.environ.get("OMP_NUM_THREADS"), "pgid": os.getpgid(0)}, f)
    print(f"worker {index} of {num} says hello", flush=True)
    if act == "fail" and index == "1":
        sys.exit(3)
    if act == "wait":
        time.sleep(60)
        sys.exit(9)
""")


@pytest.fixture
def fake_launcher(tmp_path) -> list[str]:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    return [sys.executable, str(script)]


def _run(out: Path, act: str, num_workers: int, launcher: list[str], **kwargs) -> tuple[int, str]:
    out.mkdir(parents=True, exist_ok=True)
    stream = io.StringIO()
    code = run_data_parallel(["--output", str(out), "--act", act], num_workers, out,
                             stream=stream, poll_every=0.05, launcher=launcher,
                             env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), **kwargs)
    return code, stream.getvalue()


def test_each_worker_gets_its_shard_and_its_log(tmp_path, fake_launcher):
    out = tmp_path / "out"
    code, text = _run(out, "ok", 3, fake_launcher)
    assert code == 0, text
    assert "all 3 workers done" in text
    for i in range(3):
        seen = json.loads((out / f"worker-{i}.json").read_text())
        assert seen["argv"][0] == "run" and seen["argv"][-2:] == ["--shard", f"{i}/3"]
        assert seen["cuda"] is None or seen["cuda"] == ""  # no GPUs: nothing assigned
        assert int(seen["omp"]) >= 1
        assert seen["pgid"] != os.getpgid(0)  # own process group: signals come through us
        log = (out / "_logs" / f"data-parallel-{i}-of-3.log").read_text()
        assert f"worker {i} of 3 says hello" in log


def test_a_failed_worker_is_named_with_its_log(tmp_path, fake_launcher):
    out = tmp_path / "out"
    code, text = _run(out, "fail", 3, fake_launcher)
    assert code == 1
    assert "worker 1 FAILED (exit code 3)" in text
    assert str(out / "_logs" / "data-parallel-1-of-3.log") in text
    assert "worker 0 FAILED" not in text and "worker 2 FAILED" not in text


def test_signals_are_forwarded_and_give_75(tmp_path, fake_launcher):
    out = tmp_path / "out"
    out.mkdir()

    def interrupt_when_started() -> None:
        deadline = time.time() + 30
        while time.time() < deadline and not all(
                (out / f"worker-{i}.json").exists() for i in range(2)):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)

    previous = signal.getsignal(signal.SIGUSR1)
    threading.Thread(target=interrupt_when_started, daemon=True).start()
    started = time.monotonic()
    code, text = _run(out, "wait", 2, fake_launcher)
    assert code == 75, text
    assert time.monotonic() - started < 30  # the workers stopped on the signal, not at 60 s
    assert "resume" in text
    for i in range(2):
        assert f"worker {i} got signal {int(signal.SIGUSR1)}" in \
            (out / "_logs" / f"data-parallel-{i}-of-2.log").read_text()
    assert signal.getsignal(signal.SIGUSR1) == previous  # our handler is gone again


def test_gpus_are_assigned_one_per_worker_round_robin():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,5"}) == ["2", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assigned = [worker_env(i, 3, ["2", "5"], {})["CUDA_VISIBLE_DEVICES"] for i in range(3)]
    assert assigned == ["2", "5", "2"]
    assert "OMP_NUM_THREADS" not in worker_env(0, 3, ["0"], {})
    cpu = worker_env(1, 2, [], {})
    assert "CUDA_VISIBLE_DEVICES" not in cpu and int(cpu["OMP_NUM_THREADS"]) >= 1
    assert worker_env(0, 2, [], {"OMP_NUM_THREADS": "7"})["OMP_NUM_THREADS"] == "7"


def test_worker_argv_and_exit_codes():
    argv = worker_argv(["--input", "a b.jsonl"], 1, 4, launcher=["bg"])
    assert argv == ["bg", "run", "--input", "a b.jsonl", "--shard", "1/4"]
    with pytest.raises(ValueError, match="--shard"):
        worker_argv(["--shard=0/2"], 0, 2)
    with pytest.raises(ValueError, match="positive"):
        run_data_parallel([], 0, Path("unused"))
    assert combined_exit_code([0, 0]) == 0
    assert combined_exit_code([0, 75]) == 75
    assert combined_exit_code([75, 1]) == 1
    assert combined_exit_code([0, -9]) == 1
    assert combined_exit_code([2, 2]) == 2
    assert combined_exit_code([2, 1]) == 1
