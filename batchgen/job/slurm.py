"""Slurm: which shard an array task is, and the sbatch script for a whole job array.

The script we print runs batchgen in the background under a bash that forwards signals:
`#SBATCH --signal=B:USR1@120` sends the time-limit warning to the batch shell only, so the
shell passes it on to batchgen, which stops admitting rows, commits its complete parts and
exits 75 ("resume me"); the shell then requeues its own task (`scontrol requeue`), and the
requeued task resumes from the committed parts. `scancel` (SIGTERM to every process of the
task) is not forwarded twice: batchgen gets it from Slurm directly, commits, and the task
ends cancelled, not requeued. Every task passes `--shard $SLURM_ARRAY_TASK_ID/N` with N
written in, so `sbatch --array=1 job.sh` re-runs exactly shard 1 of N.

`job_has_ended` asks the controller (`squeue`) whether a job is over, for ShardLock: a lock
left by a job whose node died is taken over at once instead of after its heartbeat ages.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping

from batchgen.job.exit_codes import EXIT_INTERRUPTED

WARNING_SECONDS = 120
LOG_DIR_NAME = "_logs"

_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$|^\d+-\d+$")
_MEM_RE = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
_JOB_ID_RE = re.compile(r"^\d+(_\d+)?$")

# States in which a job's processes are gone for good. Every other state counts as alive:
# COMPLETING (its processes are still being killed and may be committing), SUSPENDED
# (stopped, not dead), PENDING and REQUEUED (a requeued job resumes its shard itself).
ENDED_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED",
                          "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT"})
# Read at call time (tests shorten it). A loaded controller answers within a second or two;
# past this we would rather wait for the heartbeat rule than stall the start of a task.
SQUEUE_TIMEOUT = 5.0


def default_launcher() -> list[str]:
    """How a compute node starts batchgen: this interpreter (a shared venv on the cluster)."""
    return [sys.executable, "-m", "batchgen.cli"]


def render_sbatch_script(run_argv: list[str], *, array: int, gpus_per_task: int,
                         time: str | None, partition: str | None, account: str | None,
                         cpus_per_task: int | None, mem: str | None, job_name: str,
                         output_dir: Path, launcher: list[str] | None = None,
                         workdir: Path | None = None) -> str:
    """A ready `sbatch` script running `batchgen run <run_argv> --shard $TASK/array` per task.

    run_argv: the `run` options, without any --shard (every argument is shlex-quoted).
    gpus_per_task: 0 = a CPU job (no GPU requested); batchgen runs one engine per GPU, so
    more than 1 is refused (use a bigger --array instead).
    Logs go to `<output_dir>/_logs/<job_name>-<array job id>_<task>.out` (appended to on
    requeue). sbatch opens the log before the script runs, so that folder must exist at
    submit time: the caller creates it when printing the script.
    launcher: the command that starts batchgen (default: this Python, `-m batchgen.cli`).
    workdir: where tasks start (default: the current directory), so relative paths in
    run_argv mean what they meant when the script was made.
    """
    _validate(run_argv, array=array, gpus_per_task=gpus_per_task, time=time,
              cpus_per_task=cpus_per_task, mem=mem, job_name=job_name)
    output_dir = Path(output_dir).absolute()
    workdir = Path.cwd() if workdir is None else Path(workdir).absolute()
    log_dir = output_dir / LOG_DIR_NAME
    directives = [
        f"--job-name={job_name}",
        f"--array=0-{array - 1}",
        f"--output={log_dir}/%x-%A_%a.out",
        "--open-mode=append",
        f"--chdir={workdir}",
        "--ntasks=1",
        f"--signal=B:USR1@{WARNING_SECONDS}",
        "--requeue",
    ]
    if gpus_per_task:
        directives.append(f"--gres=gpu:{gpus_per_task}")
    for name, value in (("time", time), ("partition", partition), ("account", account),
                        ("cpus-per-task", cpus_per_task), ("mem", mem)):
        if value is not None:
            directives.append(f"--{name}={value}")

    command = " ".join(shlex.quote(arg) for arg in [*(launcher or default_launcher()), "run",
                                                    *run_argv])
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH {shlex.quote(d) if ' ' in d else d}" for d in directives]
    lines += [
        "#",
        f"# batchgen job array: {array} shard(s), one per task; made by `batchgen slurm`.",
        "# Submit: sbatch THIS_FILE     Re-run one shard: sbatch --array=I THIS_FILE",
        "set -u",
        f"mkdir -p {shlex.quote(str(log_dir))}",
        "export PYTHONUNBUFFERED=1",
        f'echo "batchgen: task $SLURM_ARRAY_TASK_ID of {array} (job $SLURM_JOB_ID) '
        'on $(hostname) at $(date -Is)"',
        "",
        "# Slurm sends the time-limit warning (USR1) to this shell only: pass it on.",
        "child=",
        "trap '[ -n \"$child\" ] && kill -USR1 \"$child\" 2>/dev/null' USR1",
        f"{command} --shard \"$SLURM_ARRAY_TASK_ID/{array}\" &",
        "child=$!",
        "# `wait` returns early when a trapped signal arrives: wait until batchgen is gone,",
        "# then once more for its own exit status.",
        'while kill -0 "$child" 2>/dev/null; do wait "$child"; done',
        'wait "$child"; status=$?',
        f"if [ \"$status\" -eq {EXIT_INTERRUPTED} ]; then",
        "    # this task only: the last task's SLURM_JOB_ID is also the array's id, and",
        "    # requeueing that id would requeue every task of the array",
        '    task="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
        '    echo "batchgen: interrupted with parts committed; requeueing task $task"',
        '    scontrol requeue "$task"',
        "fi",
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def job_has_ended(job_id: str) -> bool | None:
    """Whether Slurm says job `job_id` (`123`, or `123_4` for an array task) is over.

    True: the controller no longer knows it (squeue's "Invalid job id specified", once
    MinJobAge has passed since it ended) or it is in one of ENDED_STATES. False: it is in
    another state. None: Slurm could not be asked or gave no clear answer (no squeue on
    PATH, controller unreachable, SQUEUE_TIMEOUT passed, the job hidden from us, odd id).
    Ask only about your own user's jobs on your own cluster: with PrivateData=jobs another
    user's running job also reads as an invalid id, and ids repeat across clusters.
    """
    squeue = shutil.which("squeue")
    if squeue is None or not _JOB_ID_RE.match(str(job_id)):
        return None
    # --states=all: without it a job that ended recently is simply left out (rc 0, no
    # output), which cannot be told apart from a job hidden from us.
    argv = [squeue, "--noheader", f"--jobs={job_id}", "--states=all", "--format=%T"]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                timeout=SQUEUE_TIMEOUT)
    except (subprocess.TimeoutExpired, OSError):
        return None
    if result.returncode != 0:
        return True if "Invalid job id specified" in result.stderr else None
    states = result.stdout.split()
    if not states:
        return None
    return all(state in ENDED_STATES for state in states)


def detect_slurm_shard(env: Mapping[str, str]) -> tuple[int, int] | None:
    """(index, num_shards) of this Slurm array task, 0-based; None outside an array.

    index = task id - the array's first id, num_shards = the array's size. A sparse or
    stepped array (`--array=0,4,9`, `0-9:2`) has no such mapping: pass --shard instead.
    Note: a task resubmitted alone (`sbatch --array=1`) is an array of one: the scripts of
    `batchgen slurm` pass --shard explicitly for that reason.
    """
    task = env.get("SLURM_ARRAY_TASK_ID")
    if task in (None, ""):
        return None
    task_id = _env_int(env, "SLURM_ARRAY_TASK_ID")
    first = _env_int(env, "SLURM_ARRAY_TASK_MIN", default=0)
    last = _env_int(env, "SLURM_ARRAY_TASK_MAX", default=None)
    count = _env_int(env, "SLURM_ARRAY_TASK_COUNT", default=None)
    if count is None and last is None:
        raise ValueError("SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT nor "
                         "SLURM_ARRAY_TASK_MAX is: pass --shard I/N")
    if count is None:
        count = last - first + 1
    if last is not None and last - first + 1 != count:
        raise ValueError(f"the Slurm array is sparse or stepped (ids {first}..{last}, {count} "
                         "tasks): pass --shard I/N explicitly")
    index = task_id - first
    if not 0 <= index < count:
        raise ValueError(f"SLURM_ARRAY_TASK_ID={task_id} is outside the array "
                         f"({first}..{first + count - 1}): pass --shard I/N")
    return index, count


def _env_int(env: Mapping[str, str], name: str, default: int | None = -1) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        if default == -1:
            raise ValueError(f"{name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def _validate(run_argv: list[str], *, array: int, gpus_per_task: int, time: str | None,
              cpus_per_task: int | None, mem: str | None, job_name: str) -> None:
    if not isinstance(array, int) or array < 1:
        raise ValueError(f"--array must be a positive number of tasks, got {array!r}")
    if not isinstance(gpus_per_task, int) or gpus_per_task < 0:
        raise ValueError(f"--gpus-per-task must be 0 (a CPU job) or more, got {gpus_per_task!r}")
    if gpus_per_task > 1:
        raise ValueError(f"--gpus-per-task={gpus_per_task}: batchgen runs one engine per GPU; "
                         "ask for more tasks (--array) instead")
    if cpus_per_task is not None and cpus_per_task < 1:
        raise ValueError(f"--cpus-per-task must be positive, got {cpus_per_task}")
    if time is not None and not _TIME_RE.match(time):
        raise ValueError(f"--time {time!r} is not a Slurm time (MM, HH:MM:SS, D-HH:MM, ...)")
    if mem is not None and not _MEM_RE.match(mem):
        raise ValueError(f"--mem {mem!r} is not a Slurm size (e.g. 16G, 4000M)")
    if not job_name or any(c.isspace() for c in job_name) or "/" in job_name:
        raise ValueError(f"job name {job_name!r} must be non-empty, without spaces or '/'")
    for arg in run_argv:
        if arg == "--shard" or arg.startswith("--shard="):
            raise ValueError("the Slurm script sets --shard for each task: leave it out")
