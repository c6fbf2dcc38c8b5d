"""--data-parallel K: K engine processes on one machine, each a shard of its own.

Worker i runs `python -m batchgen.cli run <run_argv> --shard i/K`. With GPUs, worker i sees
one GPU through CUDA_VISIBLE_DEVICES: the i-th visible one, or, with fewer GPUs than workers,
GPU i mod num_gpus (workers share a GPU round-robin: slower, but it lets a one-GPU box test a
K-way job), and each is given --gpu-memory-utilization: the job's value divided by the workers
on its GPU. On CPU the cores are split between workers (OMP_NUM_THREADS) unless it is set.
No NCCL: shards share nothing but the output folder, where each writes its own parts.

The launcher shows one progress display for the whole job, polled from the output folder,
forwards SIGINT/SIGTERM/SIGUSR1 to every worker (each commits what it has and exits 75; one that
comes while the workers start leaves the rest unstarted, their shards to a re-run), and
returns 0 when every worker returned 0, 1 (or 2 for configuration errors) when one failed,
naming it and its log, else 75 when one was interrupted. A worker that dies leaves its
committed parts; re-running the same command resumes its shard where it stopped.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Mapping, TextIO

from batchgen.job.exit_codes import EXIT_CONFIG, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK
from batchgen.job.parallel_progress import DataParallelProgress
from batchgen.job.progress import merge_metrics_files, shard_metrics_path
from batchgen.job.slurm import LOG_DIR_NAME

_FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


@dataclass
class Worker:
    index: int
    log_path: Path
    process: subprocess.Popen
    returncode: int | None = None
    signalled: set[int] = field(default_factory=set)  # the stop signals passed on to it

    @property
    def is_running(self) -> bool:
        return self.returncode is None


def visible_gpus(env: Mapping[str, str]) -> list[str]:
    """The GPU ids this process may hand out: CUDA_VISIBLE_DEVICES if set, else all torch sees."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch
        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def assign_gpus(num_workers: int, gpus: list[str]) -> list[str | None]:
    """Worker i's GPU: the i-th visible one, round-robin when GPUs are fewer than workers;
    None for every worker on CPU."""
    return [gpus[i % len(gpus)] if gpus else None for i in range(num_workers)]


def worker_env(num_workers: int, gpu: str | None, env: Mapping[str, str]) -> dict[str, str]:
    """A worker's environment: its GPU, or (gpu None) its share of the CPU cores."""
    child = dict(env)
    child["PYTHONUNBUFFERED"] = "1"
    if gpu is not None:
        child["CUDA_VISIBLE_DEVICES"] = gpu
    elif "OMP_NUM_THREADS" not in env:
        child["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // num_workers))
    return child


def gpu_memory_shares(assigned: list[str | None], utilization: float) -> list[float | None]:
    """Each worker's --gpu-memory-utilization (`assigned`: assign_gpus'): the job's resolved
    value (from whatever set it: flag, recipe, --set, default) divided by the number of workers
    on that worker's GPU, so the workers sharing a GPU together ask for what one engine would.
    None on CPU."""
    sharing = Counter(assigned)
    return [None if gpu is None else utilization / sharing[gpu] for gpu in assigned]


def worker_argv(run_argv: list[str], index: int, num_workers: int,
                launcher: list[str] | None = None,
                gpu_memory_utilization: float | None = None) -> list[str]:
    for arg in run_argv:
        if arg in ("--shard", "--data-parallel") or arg.startswith(("--shard=",
                                                                    "--data-parallel=")):
            raise ValueError(f"{arg.split('=')[0]} is set per worker by --data-parallel: "
                             "leave it out")
    launcher = launcher or [sys.executable, "-m", "batchgen.cli"]
    # Appended after run_argv: a flag beats the recipe and --set, and the last flag wins.
    memory = [] if gpu_memory_utilization is None else [
        "--gpu-memory-utilization", repr(gpu_memory_utilization)]
    return [*launcher, "run", *run_argv, *memory, "--shard", f"{index}/{num_workers}"]


def run_data_parallel(run_argv: list[str], num_workers: int, output_dir: Path, *,
                      gpu_memory_utilization: float, stream: TextIO | None = None,
                      poll_every: float = 1.0,
                      launcher: list[str] | None = None,
                      env: Mapping[str, str] | None = None,
                      metrics_json: Path | None = None) -> int:
    """Run the job as `num_workers` shard processes; see the module docstring.
    gpu_memory_utilization: the job's resolved value, split among workers sharing a GPU.
    launcher: how a worker starts batchgen (default: this Python, `-m batchgen.cli`).
    metrics_json: each worker writes its own metrics beside its log (as shard i of K:
    progress.shard_metrics_path); this launcher writes their sum here (one file for the job,
    not whichever worker finished last)."""
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"--data-parallel must be a positive number of workers, "
                         f"got {num_workers!r}")
    env = os.environ if env is None else env
    output_dir = Path(output_dir)
    log_dir = output_dir / LOG_DIR_NAME
    log_dir.mkdir(parents=True, exist_ok=True)
    assigned = assign_gpus(num_workers, visible_gpus(env))
    shares = gpu_memory_shares(assigned, gpu_memory_utilization)
    argvs = [worker_argv(run_argv, i, num_workers, launcher, shares[i])
             for i in range(num_workers)]
    # Every worker is given one path and, as shard i of K, writes its own file from it.
    worker_base = log_dir / "data-parallel.metrics.json"
    worker_metrics = [shard_metrics_path(worker_base, i, num_workers) for i in range(num_workers)]
    if metrics_json is not None:
        for i, path in enumerate(worker_metrics):
            path.unlink(missing_ok=True)  # an earlier launch's: not this run's counters
            argvs[i] += ["--metrics-json", str(worker_base)]
    progress = DataParallelProgress(output_dir, stream or sys.stderr)

    workers: list[Worker] = []
    forwarded: set[int] = set()
    previous = _forward_signals(workers, forwarded)
    try:
        for i, argv in enumerate(argvs):
            if forwarded:  # a stop came while the workers started: the rest wait for a re-run
                break
            log_path = log_dir / f"data-parallel-{i}-of-{num_workers}.log"
            worker = _spawn(i, argv, worker_env(num_workers, assigned[i], env), log_path)
            workers.append(worker)
            for signum in forwarded - worker.signalled:  # came before it was in `workers`
                _send(worker, signum)
        if workers:
            progress.start(len(workers), assigned[:len(workers)])
        while any(w.is_running for w in workers):
            for worker in workers:
                if worker.is_running and worker.process.poll() is not None:
                    worker.returncode = worker.process.returncode
                    if -worker.returncode in forwarded:
                        # it died of a stop signal we passed on (e.g. while exiting, with
                        # its handlers gone): its parts are committed, so: interrupted
                        worker.returncode = EXIT_INTERRUPTED
                    progress.worker_exited(worker.index, worker.returncode, worker.log_path)
            progress.update()
            if any(w.is_running for w in workers):
                time.sleep(poll_every)
    finally:
        _restore_signals(previous)
        for worker in workers:  # only reached with live workers if we ourselves failed
            if worker.process.poll() is None:
                worker.process.terminate()
                worker.process.wait()
        progress.stop()
    not_started = [EXIT_INTERRUPTED] * (num_workers - len(workers))
    code = combined_exit_code([w.returncode for w in workers] + not_started)
    progress.summary(code, [(w.index, w.returncode, w.log_path) for w in workers])
    if metrics_json is not None:
        merge_metrics_files(worker_metrics, metrics_json, output_dir=output_dir, exit_code=code)
    return code


def combined_exit_code(returncodes: list[int | None]) -> int:
    """0 all done; 1 a worker failed (2 if every failure was a configuration error);
    75 none failed but one was interrupted (re-run to resume)."""
    failures = {c for c in returncodes if c not in (EXIT_OK, EXIT_INTERRUPTED)}
    if failures:
        return EXIT_CONFIG if failures == {EXIT_CONFIG} else EXIT_INTERNAL
    if EXIT_INTERRUPTED in returncodes:
        return EXIT_INTERRUPTED
    return EXIT_OK


def _spawn(index: int, argv: list[str], env: dict[str, str], log_path: Path) -> Worker:
    log: IO[bytes] = open(log_path, "ab")
    try:
        log.write(f"==> worker {index} started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  f"{' '.join(argv)}\n".encode())
        log.flush()
        # Own process group: a Ctrl-C at the terminal reaches the workers once, through us.
        process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=_die_with_parent)
    finally:
        log.close()
    return Worker(index, log_path, process)


def _die_with_parent() -> None:
    """In the child: SIGTERM it if the launcher dies (Linux), so no orphan holds a shard."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except Exception:
            pass


def _forward_signals(workers: list[Worker], forwarded: set[int]) -> dict[int, object]:
    """Install handlers that pass SIGINT/SIGTERM/SIGUSR1 on to the live workers, noting each
    in `forwarded` (main thread only; elsewhere nothing is installed)."""
    def forward(signum: int, _frame: object) -> None:
        forwarded.add(signum)
        for worker in workers:
            _send(worker, signum)

    previous: dict[int, object] = {}
    for signum in _FORWARDED_SIGNALS:
        try:
            previous[signum] = signal.signal(signum, forward)
        except ValueError:  # not the main thread
            break
    return previous


def _send(worker: Worker, signum: int) -> None:
    worker.signalled.add(signum)
    if worker.process.poll() is None:
        try:
            os.kill(worker.process.pid, signum)
        except ProcessLookupError:
            pass


def _restore_signals(previous: dict[int, object]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
