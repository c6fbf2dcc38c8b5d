"""Slurm: the sbatch script, array-task detection, and a real one-node Slurm cluster
(Debian's slurm-wlm + munge, started by the fixture) running the generated script."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from batchgen.job.slurm import detect_slurm_shard, render_sbatch_script

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import SlurmCluster, missing_programs  # noqa: E402
from test_parallel import (cli, output_rows, tiny_job_argv, tiny_reference,  # noqa: E402,F401
                           write_tiny_input)

REPO = Path(__file__).resolve().parents[1]


def _render(run_argv=("--input", "data.jsonl"), **overrides) -> str:
    options = dict(array=3, gpus_per_task=0, time=None, partition=None, account=None,
                   cpus_per_task=None, mem=None, job_name="bg", output_dir=Path("/data/out"),
                   launcher=["batchgen"], workdir=Path("/data"))
    options.update(overrides)
    return render_sbatch_script(list(run_argv), **options)


def _directives(script: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH ")]


# ---- the script ------------------------------------------------------------------------

def test_script_directives():
    script = _render(time="01:30:00", partition="gpu", account="lab", cpus_per_task=8,
                     mem="32G", gpus_per_task=1, array=4)
    assert script.startswith("#!/bin/bash\n")
    directives = _directives(script)
    for expected in ("--array=0-3", "--signal=B:USR1@120", "--requeue", "--open-mode=append",
                     "--job-name=bg", "--output=/data/out/_logs/%x-%A_%a.out", "--chdir=/data",
                     "--time=01:30:00", "--partition=gpu", "--account=lab",
                     "--cpus-per-task=8", "--mem=32G", "--gres=gpu:1", "--ntasks=1"):
        assert expected in directives, expected


def test_cpu_job_asks_for_no_gpu_and_leaves_unset_options_out():
    directives = _directives(_render(gpus_per_task=0))
    assert not any("gpu" in d for d in directives)
    assert not any(d.startswith(("--time", "--partition", "--account", "--mem",
                                 "--cpus-per-task")) for d in directives)


def test_command_line_quotes_odd_arguments_and_passes_the_shard():
    odd = ["--template", "Review: {{ text }}\nSay \"ok\"; rm -rf / $HOME `id`", "--output",
           "my out", "--system", "it's"]
    script = _render(run_argv=odd, array=5)
    start = script.index("\nbatchgen run ") + 1
    line = script[start:script.index(" &\nchild=$!", start)]  # may span lines (the \n above)
    # the command line splits back into exactly our arguments, plus the shard of this task
    words = shlex.split(line.replace("\"$SLURM_ARRAY_TASK_ID/5\"", "SHARD"))
    assert words == ["batchgen", "run", *odd, "--shard", "SHARD"]
    assert '--shard "$SLURM_ARRAY_TASK_ID/5"' in line


def test_script_forwards_usr1_and_requeues_on_75():
    script = _render()
    assert "trap " in script and "USR1" in script.split("trap ", 1)[1].splitlines()[0]
    assert 'scontrol requeue "$task"' in script
    assert 'task="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' in script
    assert '-eq 75' in script
    assert script.rstrip().endswith('exit "$status"')
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_script_runs_under_bash_and_requeues_only_after_an_interrupt(tmp_path):
    """Run the script's body with stand-ins for batchgen and scontrol: USR1 sent to the
    shell reaches batchgen, which exits 75, and the script requeues its own job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\necho \"$@\" > {tmp_path}/scontrol.args\n")
    (bin_dir / "fakebg").write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import signal, sys, time
        open("{tmp_path}/argv", "w").write(" ".join(sys.argv[1:]))
        signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75))
        open("{tmp_path}/ready", "w").close()
        time.sleep(0 if "--quick" in sys.argv else 30)
        """))
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_ARRAY_TASK_ID="1",
               SLURM_JOB_ID="4242", SLURM_ARRAY_JOB_ID="4240")
    for quick in (True, False):
        script = tmp_path / "job.sh"
        script.write_text(_render(run_argv=["--quick"] if quick else [], launcher=["fakebg"],
                                  output_dir=tmp_path / "out", workdir=tmp_path))
        (tmp_path / "ready").unlink(missing_ok=True)
        shell = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE,
                                 text=True)
        if not quick:
            deadline = time.time() + 20
            while not (tmp_path / "ready").exists() and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)
            shell.send_signal(signal.SIGUSR1)  # to the batch shell only, as B:USR1 does
        shell.communicate(timeout=30)
        assert (tmp_path / "argv").read_text().endswith("--shard 1/3")
        if quick:
            assert shell.returncode == 0
            assert not (tmp_path / "scontrol.args").exists()
        else:
            assert shell.returncode == 75
            assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4240_1"]


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="--array"):
        _render(array=0)
    with pytest.raises(ValueError, match="one engine per GPU"):
        _render(gpus_per_task=2)
    with pytest.raises(ValueError, match="--time"):
        _render(time="an hour")
    with pytest.raises(ValueError, match="--mem"):
        _render(mem="lots")
    with pytest.raises(ValueError, match="--shard"):
        _render(run_argv=["--shard", "0/2"])


# ---- array-task detection --------------------------------------------------------------

def test_detect_slurm_shard():
    assert detect_slurm_shard({}) is None
    assert detect_slurm_shard({"SLURM_JOB_ID": "7"}) is None  # a job, not an array
    env = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3",
           "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "2"}
    assert detect_slurm_shard(env) == (2, 3)
    # --array=1-4: ids start at 1
    assert detect_slurm_shard({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1",
                               "SLURM_ARRAY_TASK_MAX": "4"}) == (0, 4)
    assert detect_slurm_shard({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "5"}) == (4, 5)
    with pytest.raises(ValueError, match="sparse or stepped"):
        detect_slurm_shard({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3",
                            "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "8"})
    with pytest.raises(ValueError, match="integer"):
        detect_slurm_shard({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "3"})
    with pytest.raises(ValueError, match="--shard"):
        detect_slurm_shard({"SLURM_ARRAY_TASK_ID": "3"})


# ---- a real Slurm ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_programs()
    if missing:
        pytest.skip(f"Slurm is not installed (no {', '.join(missing)}): "
                    "run .ci/slurm-setup.sh (apt-get install slurm-wlm munge) as root")
    if os.geteuid() != 0:
        pytest.skip("the one-node Slurm test cluster must be started as root")
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


# Stands in for batchgen in the script: logs each start and signal to <output>/shard-I.log;
# shards named by --hold wait (until a signal: exit 75) on their first start only.
STAND_IN = textwrap.dedent("""
    import os, signal, sys, time
    argv = sys.argv[1:]
    out, hold = argv[argv.index("--output") + 1], argv[argv.index("--hold") + 1].split(",")
    index = argv[argv.index("--shard") + 1].split("/")[0]
    log = os.path.join(out, f"shard-{index}.log")
    def note(what):
        with open(log, "a") as f:
            f.write(what + "\\n")
    def stop(signum, frame):
        note(f"signal {signum}")
        sys.exit(75)
    signal.signal(signal.SIGUSR1, stop)
    signal.signal(signal.SIGTERM, stop)
    is_first = not os.path.exists(log)
    note("start")
    if is_first and index in hold:
        time.sleep(120)
""")


def _wait(predicate, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{cluster.logs()}")
        time.sleep(0.2)


@pytest.mark.slurm
def test_slurm_requeues_on_the_warning_and_a_cancelled_task_can_be_resubmitted(slurm, tmp_path):
    out = tmp_path / "out"
    (out / "_logs").mkdir(parents=True)
    stand_in = tmp_path / "stand_in.py"
    stand_in.write_text(STAND_IN)
    script = tmp_path / "job.sh"
    script.write_text(render_sbatch_script(
        ["--output", str(out), "--hold", "0,2"], array=3, gpus_per_task=0, time=None,
        partition=None, account=None, cpus_per_task=None, mem=None, job_name="standin",
        output_dir=out, launcher=[sys.executable, str(stand_in)], workdir=tmp_path))
    job = slurm.sbatch(script)
    shard_log = lambda i: out / f"shard-{i}.log"  # noqa: E731
    _wait(lambda: shard_log(0).exists() and shard_log(2).exists(), 60, "tasks 0 and 2", slurm)

    # the time-limit warning (USR1 to the batch shell) -> batchgen exits 75 -> requeued.
    # Task 2 is the one whose job id is also the array's: only it may be requeued.
    slurm.scancel(f"{job}_2", "--signal=USR1", "--batch")
    _wait(lambda: all(s in slurm.job_info(f"{job}_2") for s in ("Restarts=1", "PENDING")),
          60, "task 2 requeued", slurm)
    # Slurm holds a requeued job back for two minutes (BeginTime); let it start sooner (not
    # at once: slurmd refuses a relaunch while the last run's credential is still revoked)
    subprocess.run(["scontrol", "update", f"JobId={job}_2", "StartTime=now+5"], env=slurm.env,
                   check=True, capture_output=True)
    assert "Restarts=0" in slurm.job_info(f"{job}_0")  # untouched by task 2's requeue

    # scancel: SIGTERM, the task ends cancelled (no requeue); resubmit it alone
    slurm.scancel(f"{job}_0")
    _wait(lambda: f"{job}_0" not in slurm.states(job), 60, "task 0 cancelled", slurm)
    again = slurm.sbatch(script, "--array=0")
    slurm.wait_until_done(job, 120)
    slurm.wait_until_done(again, 60)

    assert shard_log(0).read_text().split("\n")[:3] == ["start", "signal 15", "start"]
    assert shard_log(2).read_text().split("\n")[:3] == ["start", "signal 10", "start"]
    assert shard_log(1).read_text() == "start\n"
    assert "REQUEUE" not in (out / "_logs" / f"standin-{job}_0.out").read_text()
    task_log = (out / "_logs" / f"standin-{job}_2.out").read_text()
    assert "requeueing" in task_log and task_log.count("batchgen: task 2 of 3") == 2


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_array_of_the_real_cli_survives_cancel_and_requeue(slurm, smol_model_dir,
                                                                 tiny_reference, tmp_path):
    """`batchgen slurm` -> sbatch a 3-task CPU array on the small model; the time warning
    (USR1) requeues task 2, scancel stops task 1, which is resubmitted alone; then `verify`
    passes and the rows equal a single-process run's."""
    data = write_tiny_input(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    made = cli("slurm", *tiny_job_argv(smol_model_dir, data, out), "--array", "3",
               "--gpus-per-task", "0", "--job-name", "tiny", "--script-out", "job.sh",
               cwd=tmp_path, env=slurm.env)
    assert made.returncode == 0, made.stderr
    script = tmp_path / "job.sh"
    assert "--array=0-2" in script.read_text() and (out / "_logs").is_dir()

    job = slurm.sbatch(script)
    # Each signal comes once batchgen holds its shard's lock (its stop handlers are then in
    # place) and is loading the model: the task stops with none of its parts done.
    _wait((out / "_lock-1-of-3.json").exists, 180, "task 1 to start batchgen", slurm)
    time.sleep(0.5)
    slurm.scancel(f"{job}_1")  # SIGTERM: batchgen exits 75, the task ends cancelled
    _wait((out / "_lock-2-of-3.json").exists, 180, "task 2 to start batchgen", slurm)
    time.sleep(0.5)
    slurm.scancel(f"{job}_2", "--signal=USR1", "--batch")  # the time-limit warning
    _wait(lambda: all(s in slurm.job_info(f"{job}_2") for s in ("Restarts=1", "PENDING")),
          60, "task 2 requeued", slurm)
    subprocess.run(["scontrol", "update", f"JobId={job}_2", "StartTime=now+5"],
                   env=slurm.env, check=True, capture_output=True)
    _wait(lambda: f"{job}_1" not in slurm.states(job), 60, "task 1 to end", slurm)
    again = slurm.sbatch(script, "--array=1")
    slurm.wait_until_done(job, 240)
    slurm.wait_until_done(again, 120)

    logs = {p.name: p.read_text() for p in (out / "_logs").glob("tiny-*.out")}
    task1, task2 = logs[f"tiny-{job}_1.out"], logs[f"tiny-{job}_2.out"]
    assert "CANCELLED" in task1 and "requeueing" not in task1
    assert "requeueing" in task2 and task2.count("batchgen: task 2 of 3") == 2
    assert "REQUEUE" not in logs[f"tiny-{job}_0.out"]  # task 2's requeue was its own
    assert f"tiny-{again}_1.out" in logs  # the resubmitted shard 1
    verify = cli("verify", str(out))
    assert verify.returncode == 0, verify.stdout + verify.stderr + "\n".join(logs.values())
    assert output_rows(out) == tiny_reference
    assert not list(out.glob("_lock-*"))


# Runs in a job: tries shard locks 0/2 and 1/2 of the folder and reports what it met.
LOCK_CHECKER = textwrap.dedent("""
    import json, os, sys
    import batchgen.job.slurm as slurm
    from batchgen.job.lock import ShardLock
    slurm.SQUEUE_TIMEOUT = 60.0  # on a loaded machine a slow answer must not read as none
    out = sys.argv[1]
    report = {}
    for shard in (0, 1):
        lock = ShardLock(out, shard, 2)
        report[shard] = [lock.acquire(), lock.holder_description()]
        lock.release()
    with open(os.path.join(out, "report.json.tmp"), "w") as f:
        json.dump(report, f)
    os.replace(os.path.join(out, "report.json.tmp"), os.path.join(out, "report.json"))
""")


@pytest.mark.slurm
def test_slurm_a_new_job_takes_the_lock_of_an_ended_job_at_once(slurm, tmp_path):
    """Locks that look alive (fresh heartbeat, another host) left by two tasks of an earlier
    array: the one whose task has ended is taken at once by a task of a new job, the one
    whose task still runs is left alone. The ended task is the array's last, whose job id
    is also the array's: asking about that id would see the running task too."""
    out = tmp_path / "out"
    out.mkdir()
    earlier = tmp_path / "earlier.sh"
    earlier.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        env | grep ^SLURM_ > {out}/env-$SLURM_ARRAY_TASK_ID.tmp
        mv {out}/env-$SLURM_ARRAY_TASK_ID.tmp {out}/env-$SLURM_ARRAY_TASK_ID
        if [ "$SLURM_ARRAY_TASK_ID" = 0 ]; then sleep 300; fi
        """))
    job = slurm.sbatch(earlier, "--array=0-1", f"--output={tmp_path}/earlier-%a.out")
    try:
        _wait(lambda: (out / "env-0").exists() and (out / "env-1").exists()
              and f"{job}_1" not in slurm.states(job), 60, "task 1 done, task 0 running", slurm)
        assert slurm.states(job) == {f"{job}_0": "RUNNING"}
        for shard, task in ((0, 1), (1, 0)):
            env = dict(line.split("=", 1) for line in
                       (out / f"env-{task}").read_text().splitlines())
            (out / f"_lock-{shard}-of-2.json").write_text(json.dumps({
                "host": "dead-node", "pid": 1, "pid_start": None, "uid": os.getuid(),
                "token": f"task-{task}", "shard": f"{shard}/2", "start_time": time.time(),
                "heartbeat": time.time(), "slurm_job_id": env["SLURM_JOB_ID"],
                "slurm_array_job_id": env["SLURM_ARRAY_JOB_ID"],
                "slurm_array_task_id": env["SLURM_ARRAY_TASK_ID"],
                "slurm_cluster_name": env["SLURM_CLUSTER_NAME"]}))
        checker = tmp_path / "checker.py"
        checker.write_text(LOCK_CHECKER)
        script = tmp_path / "check.sh"
        script.write_text(f"#!/bin/bash\n{shlex.quote(sys.executable)} {checker} {out}\n")
        again = slurm.sbatch(script, f"--output={tmp_path}/check.out")
        slurm.wait_until_done(again, 60)
        report_path = out / "report.json"
        assert report_path.exists(), (tmp_path / "check.out").read_text()
        report = json.loads(report_path.read_text())
        assert report["0"][0] is True, report
        assert report["1"][0] is False and f"Slurm job {job}_0" in report["1"][1], report
        assert json.loads((out / "_lock-1-of-2.json").read_text())["token"] == "task-0"
    finally:
        slurm.scancel(job)
