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
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
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
               SLURM_JOB_ID="4242")
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
            assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]


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
