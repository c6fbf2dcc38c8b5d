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

from batchgen.job.parallel import (assign_gpus, combined_exit_code, gpu_memory_shares,
                                   run_data_parallel, visible_gpus, worker_argv, worker_env)

# A stand-in for `batchgen.cli`: records what it was given, then behaves as asked by --act.
FAKE_WORKER = textwrap.dedent("""
    import json, os, signal, sys, time
    argv = sys.argv[1:]
    out = argv[argv.index("--output") + 1]
    index, num = argv[argv.index("--shard") + 1].split("/")
    act = argv[argv.index("--act") + 1] if "--act" in argv else "ok"
    def stop(signum, frame):
        print(f"worker {index} got signal {signum}", flush=True)
        sys.exit(75)
    signal.signal(signal.SIGUSR1, stop)
    signal.signal(signal.SIGTERM, stop)
    with open(os.path.join(out, f"worker-{index}.json"), "w") as f:
        json.dump({"argv": argv, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                   "omp": os.environ.get("OMP_NUM_THREADS"), "pgid": os.getpgid(0)}, f)
    print(f"worker {index} of {num} says hello", flush=True)
    if "--metrics-json" in argv:  # where a real run of shard index/num writes it
        from batchgen.job.progress import shard_metrics_path
        path = shard_metrics_path(argv[argv.index("--metrics-json") + 1], int(index), int(num))
        with open(path, "w") as f:
            json.dump({"shard": f"{index}/{num}", "num_rows": 2 + int(index),
                       "num_rows_total": 2 + int(index), "elapsed_s": 1.0 + int(index),
                       "errors_by_kind": {"blank": 1}}, f)
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
                             gpu_memory_utilization=0.9, stream=stream, poll_every=0.05,
                             launcher=launcher,
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
    assert assign_gpus(3, ["2", "5"]) == ["2", "5", "2"]
    assert assign_gpus(2, []) == [None, None]
    assert worker_env(3, "5", {})["CUDA_VISIBLE_DEVICES"] == "5"
    assert "OMP_NUM_THREADS" not in worker_env(3, "0", {})
    cpu = worker_env(2, None, {})
    assert "CUDA_VISIBLE_DEVICES" not in cpu and int(cpu["OMP_NUM_THREADS"]) >= 1
    assert worker_env(2, None, {"OMP_NUM_THREADS": "7"})["OMP_NUM_THREADS"] == "7"


def test_workers_sharing_a_gpu_split_its_memory():
    def shares(num_workers, gpus, utilization):
        return gpu_memory_shares(assign_gpus(num_workers, gpus), utilization)

    assert shares(2, ["0", "1"], 0.9) == [0.9, 0.9]  # one GPU each: all of it
    assert shares(2, [], 0.9) == [None, None]  # CPU
    assert shares(2, ["0"], 0.9) == [0.45, 0.45]
    assert shares(3, ["0", "1"], 0.9) == [0.45, 0.9, 0.45]  # two on GPU 0
    assert shares(4, ["0"], 0.3) == [0.075] * 4
    argv = worker_argv(["--input", "x.jsonl"], 1, 2, launcher=["bg"], gpu_memory_utilization=0.4)
    assert argv == ["bg", "run", "--input", "x.jsonl", "--gpu-memory-utilization", "0.4",
                    "--shard", "1/2"]


@pytest.mark.parametrize("how", [["-r", "recipe.yaml"],
                                 ["--set", "engine.gpu_memory_utilization=0.8"],
                                 ["--gpu-memory-utilization", "0.8"]])
def test_data_parallel_splits_the_jobs_gpu_memory_utilization(tmp_path, fake_launcher,
                                                              monkeypatch, how):
    """0.8 from a recipe, --set or the flag, 2 workers on one GPU: each worker is given 0.4,
    once (its command line has no other value), and no GPU is needed to see it."""
    from typer.testing import CliRunner

    from batchgen import cli
    from batchgen.job import parallel

    (tmp_path / "recipe.yaml").write_text("engine:\n  gpu_memory_utilization: 0.8\n")
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(4)))
    out = tmp_path / "out"
    launch = parallel.run_data_parallel

    def on_one_gpu(argv, num_workers, output_dir, **kwargs):
        return launch(argv, num_workers, output_dir, launcher=fake_launcher, poll_every=0.05,
                      env=dict(os.environ, CUDA_VISIBLE_DEVICES="0"), stream=io.StringIO(),
                      **kwargs)

    monkeypatch.setattr(parallel, "run_data_parallel", on_one_gpu)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.build_app(), ["run", "-i", str(data), "-o", str(out), *how,
                                                  "--data-parallel", "2"])
    assert result.exit_code == 0, result.output
    for i in range(2):
        seen = json.loads((out / f"worker-{i}.json").read_text())
        assert seen["cuda"] == "0"
        flags = [j for j, a in enumerate(seen["argv"]) if a == "--gpu-memory-utilization"]
        assert len(flags) == 1 and seen["argv"][flags[0] + 1] == "0.4"


def test_worker_argv_and_exit_codes():
    argv = worker_argv(["--input", "a b.jsonl"], 1, 4, launcher=["bg"])
    assert argv == ["bg", "run", "--input", "a b.jsonl", "--shard", "1/4"]
    with pytest.raises(ValueError, match="--shard"):
        worker_argv(["--shard=0/2"], 0, 2)
    with pytest.raises(ValueError, match="positive"):
        run_data_parallel([], 0, Path("unused"), gpu_memory_utilization=0.9)
    assert combined_exit_code([0, 0]) == 0
    assert combined_exit_code([0, 75]) == 75
    assert combined_exit_code([75, 1]) == 1
    assert combined_exit_code([0, -9]) == 1
    assert combined_exit_code([2, 2]) == 2
    assert combined_exit_code([2, 1]) == 1


# ---- the real CLI on the small model ---------------------------------------------------
# A tiny job: 18 rows, 8 tokens each, 2 rows per part (9 parts), on CPU. The reference is one
# plain single-process run, made once per session (test_slurm.py compares against it too).

NUM_ROWS = 18
NUM_PARTS = 9


def write_tiny_input(path: Path) -> Path:
    with open(path, "w") as f:
        for i in range(NUM_ROWS):
            f.write(json.dumps({"prompt": f"Name a fruit, then the number {i}.", "id": i}) + "\n")
    return path


def tiny_job_argv(model_dir: Path, input_path: Path, out: Path) -> list[str]:
    return ["--input", str(input_path), "--output", str(out), "--model", str(model_dir),
            "--max-tokens", "8", "--rows-per-part", "2", "--device", "cpu", "--format", "jsonl"]


def cli(*args: str, timeout: float = 180, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batchgen.cli", *args], capture_output=True,
                          text=True, timeout=timeout, **popen)


def output_rows(out: Path) -> list[tuple[int, str | None, str | None]]:
    from batchgen.job.writer import read_part
    rows = [(r["row"], r["text"], r["error"]) for part in sorted(out.glob("part-*.jsonl"))
            for r in read_part(part)]
    return sorted(rows)


@pytest.fixture(scope="session")
def tiny_reference(smol_model_dir, tmp_path_factory) -> list[tuple[int, str | None, str | None]]:
    cached = tmp_path_factory.getbasetemp() / "tiny-reference.json"
    if cached.exists():  # made by the other test module's copy of this fixture
        return [tuple(r) for r in json.loads(cached.read_text())]
    root = tmp_path_factory.mktemp("tiny-reference")
    data = write_tiny_input(root / "data.jsonl")
    result = cli("run", *tiny_job_argv(smol_model_dir, data, root / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = output_rows(root / "out")
    assert [r[0] for r in rows] == list(range(NUM_ROWS)) and all(r[1] for r in rows)
    cached.write_text(json.dumps(rows))
    return rows


@pytest.mark.slow
def test_data_parallel_2_equals_data_parallel_1(smol_model_dir, tiny_reference, tmp_path):
    data = write_tiny_input(tmp_path / "data.jsonl")
    out = tmp_path / "dp2"
    result = cli("run", *tiny_job_argv(smol_model_dir, data, out), "--data-parallel", "2",
                 env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "all 2 workers done" in result.stderr
    assert (out / "_shard-0-of-2.json").exists() and (out / "_shard-1-of-2.json").exists()
    for i in range(2):
        assert (out / "_logs" / f"data-parallel-{i}-of-2.log").exists()
    assert output_rows(out) == tiny_reference
    assert not list(out.glob("_lock-*"))
    verify = cli("verify", str(out))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def _lock_pid(lock: Path) -> int | None:
    try:
        return json.loads(lock.read_text())["pid"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


@pytest.mark.slow
def test_concurrent_runs_of_one_shard_and_a_killed_runs_lock(smol_model_dir, tiny_reference,
                                                            tmp_path):
    data = write_tiny_input(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "batchgen.cli", "run", *tiny_job_argv(smol_model_dir, data, out)]
    lock = out / "_lock-0-of-1.json"
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Frozen (SIGSTOP) at a moment it holds the lock: freeze, look, thaw and retry until the
        # lock names it. Polling a live run instead races its end on a fast machine.
        deadline = time.monotonic() + 120
        while True:
            first.send_signal(signal.SIGSTOP)
            assert first.poll() is None, "the first run ended before it was seen holding the lock"
            if _lock_pid(lock) == first.pid:
                break
            first.send_signal(signal.SIGCONT)
            assert time.monotonic() < deadline, "timed out waiting for the first run's lock"
            time.sleep(0.02)

        second = cli("run", *tiny_job_argv(smol_model_dir, data, out))
        assert second.returncode == 0
        assert "already running" in second.stderr and f"pid {first.pid}" in second.stderr
        assert first.poll() is None  # the second run did not disturb the first

        first.kill()  # kill -9 while holding the lock: no chance to clean up
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    committed = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.jsonl")}
    assert _lock_pid(lock) == first.pid  # left behind

    third = cli("run", *tiny_job_argv(smol_model_dir, data, out))
    assert third.returncode == 0, third.stderr[-3000:]
    assert "already running" not in third.stderr
    assert not lock.exists()
    assert output_rows(out) == tiny_reference
    for name, mtime in committed.items():  # resumed: the killed run's parts were kept
        assert (out / name).stat().st_mtime_ns == mtime

    again = cli("run", *tiny_job_argv(smol_model_dir, data, out))  # a finished job: no-op
    assert again.returncode == 0
    assert output_rows(out) == tiny_reference


def test_metrics_json_is_the_whole_jobs_not_one_workers(tmp_path, fake_launcher):
    """Each worker writes its own file (no two writers of one path); the launcher writes
    the job's total where --metrics-json said."""
    out = tmp_path / "out"
    code, _ = _run(out, "ok", 3, fake_launcher, metrics_json=tmp_path / "m.json")
    assert code == 0
    argvs = [json.loads((out / f"worker-{i}.json").read_text())["argv"] for i in range(3)]
    paths = {a[a.index("--metrics-json") + 1] for a in argvs}
    assert len(paths) == 1  # one path: each worker, as shard i of 3, writes its own file
    assert sorted(p.name for p in (out / "_logs").glob("*.json")) == [
        f"data-parallel.metrics.shard-{i}-of-3.json" for i in range(3)]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_rows"] == 2 + 3 + 4 and metrics["num_rows_total"] == 9
    assert metrics["elapsed_s"] == 3.0 and metrics["errors_by_kind"] == {"blank": 3}
    assert metrics["status"] == "done" and metrics["shard"] == "0-2/3"
    assert [w["shard"] for w in metrics["workers"]] == ["0/3", "1/3", "2/3"]


def test_a_stop_while_the_workers_start_reaches_them_all(tmp_path, fake_launcher, monkeypatch):
    """SIGTERM (scancel) that comes while the launcher starts its workers: the workers
    already started stop, the rest are not started (or hear it too), and the launch is
    interrupted, not a worker running its whole shard and the launch ending 1 or 0."""
    from batchgen.job import parallel
    spawn = parallel._spawn

    def spawn_then_signal(index, *args):
        worker = spawn(index, *args)
        if index == 0:  # the handler runs before this worker is listed as started
            os.kill(os.getpid(), signal.SIGTERM)
        return worker

    monkeypatch.setattr(parallel, "_spawn", spawn_then_signal)
    out = tmp_path / "out"
    started = time.monotonic()
    code, text = _run(out, "wait", 3, fake_launcher)
    assert code == 75, text
    assert time.monotonic() - started < 30  # nobody waited out its 60 s
    assert (out / "_logs" / "data-parallel-0-of-3.log").exists()  # stopped (maybe as it began)
    assert not (out / "_logs" / "data-parallel-2-of-3.log").exists()
