"""The `batchgen` command on the fake engine: run / status / verify / export / slurm, help,
config errors (exit 2, one line), shards."""
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from batchgen.cli import build_app, parse_shard, run_argv_from, ConfigError
from batchgen.job.writer import list_parts
from fake_engine import fake_engine_factory

ROOT = Path(__file__).resolve().parent.parent
APP = build_app(make_engine=fake_engine_factory())
CLI = CliRunner()


def invoke(*args):
    return CLI.invoke(APP, [str(a) for a in args])


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "text": "t"}) + "\n" for i in range(7)))
    return path


@pytest.mark.parametrize("command", ["run", "status", "verify", "export", "slurm"])
def test_every_command_has_help(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


def test_run_then_status_verify_export(tmp_path, src):
    out = tmp_path / "out"
    result = invoke("run", "-i", src, "-o", out, "--rows-per-part", "3", "-q",
                    "--metrics-json", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    assert sorted(list_parts(out)) == [0, 1, 2]
    assert json.loads((tmp_path / "m.json").read_text())["num_rows"] == 7
    status = invoke("status", out, "--json")
    assert status.exit_code == 0 and json.loads(status.output)["num_rows_done"] == 7
    assert invoke("verify", out).exit_code == 0
    assert invoke("export", out, tmp_path / "all.parquet").exit_code == 0
    import pyarrow.parquet as pq
    table = pq.read_table(tmp_path / "all.parquet")
    assert table.column("row").to_pylist() == list(range(7))
    assert "input_text" in table.column_names
    again = invoke("run", "-i", src, "-o", out, "--rows-per-part", "3", "-q")
    assert again.exit_code == 0


@pytest.mark.parametrize("args, message", [
    (["--input", "missing.jsonl"], "input not found"),
    (["--prompt-column", "nope"], "prompt column 'nope'"),
    (["--model", "/no/such/model"], "unknown model"),
    (["--recipe", "missing.yaml"], "recipe not found"),
    (["--set", "output.rows_per_parts=3"], "unknown key 'output.rows_per_parts'"),
    (["--format", "csv"], "format must be one of"),
    (["--input", "s3://bucket/data.jsonl"], "not supported"),
    (["--tensor-parallel-size", "2"], "not supported"),
    (["--shard", "3/3"], "--shard must be I/N"),
    (["--template", "{{ broken"], "prompt template"),
    (["--dtype", "float8"], "dtype must be one of auto, float32"),
    (["--set", "engine.dtype=16"], "engine.dtype must be a string, got int 16"),
    (["--set", "prompt.chat='false'"], "prompt.chat must be true or false, got str 'false'"),
    (["--set", "output.keep=id"], "output.keep must be a list of column names"),
])
def test_configuration_errors_exit_2_with_one_line(tmp_path, src, args, message):
    base = ["run", "-o", tmp_path / "out", "-q"]
    if "--input" not in args:
        base += ["-i", src]
    result = invoke(*base, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not list_parts(tmp_path / "out")


def test_bad_recipe_key_is_named(tmp_path, src):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("prompt:\n  templte: 'x {{ prompt }}'\n")
    result = invoke("run", "-i", src, "-o", tmp_path / "out", "-r", recipe)
    assert result.exit_code == 2 and "prompt.templte" in result.output


def test_flags_override_the_recipe(tmp_path, src):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output: {rows_per_part: 2, format: jsonl}\nsampling: {max_tokens: 3}\n")
    result = invoke("run", "-i", src, "-o", tmp_path / "out", "-r", recipe, "--rows-per-part", "4",
                    "-q")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in list_parts(tmp_path / "out").values()) == [
        "part-00000.jsonl", "part-00001.jsonl"]


def test_shard_from_flag_and_from_slurm_env():
    assert parse_shard("1/4") == (1, 4)
    assert parse_shard(None, env={}) == (0, 1)
    assert parse_shard(None, env={"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}) == (2, 3)
    with pytest.raises(ConfigError):
        parse_shard("4/2")


def test_slurm_prints_a_script_with_the_run_options(tmp_path, src):
    result = invoke("slurm", "-i", src, "-o", tmp_path / "out", "--array", "3",
                    "--gpus-per-task", "1", "--time", "01:00:00", "--max-tokens", "5")
    assert result.exit_code == 0, result.output
    assert "#SBATCH" in result.output and "--array=0-2" in result.output
    assert "--max-tokens" in result.output


def test_run_argv_round_trips_the_options():
    argv = run_argv_from({"input": "a.jsonl", "output": Path("o"), "chat": False, "set_": ["x=1"],
                          "overwrite": True, "max_tokens": 5}, drop=("overwrite",))
    assert argv == ["--input", "a.jsonl", "--output", "o", "--no-chat", "--max-tokens", "5",
                    "--set", "x=1"]


def test_a_stop_while_the_run_starts_exits_75_before_the_model(tmp_path, src, monkeypatch):
    """Signals are caught from the start of `run` (before its heavy imports), so a stop that
    comes while it starts is a stop request: exit 75 and no model loaded, never a killed
    process (SIGUSR1's default action) that Slurm would not requeue."""
    import os
    import signal

    import batchgen.cli as cli

    made = []
    build_job = cli.build_job

    def build_job_then_signal(opts, **kw):
        job = build_job(opts, **kw)
        os.kill(os.getpid(), signal.SIGUSR1)  # e.g. Slurm's time-limit warning, this early
        return job

    monkeypatch.setattr(cli, "build_job", build_job_then_signal)
    app = build_app(make_engine=fake_engine_factory(made))
    result = CLI.invoke(app, ["run", "-i", str(src), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 75, result.output
    assert made == []
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # put back after the run
    monkeypatch.undo()
    assert invoke("run", "-i", src, "-o", tmp_path / "out", "-q").exit_code == 0  # resumes


def test_a_sigterm_after_the_command_is_over_keeps_its_exit_status():
    """A finished run's process must not exit 143 for a SIGTERM that comes while it shuts
    down (everything is committed by then)."""
    import subprocess
    import sys

    script = ("import atexit, os, signal, sys\n"
              "import batchgen.cli as cli\n"
              "def app():\n"
              "    atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))\n"
              "    sys.exit(0)\n"
              "cli.app = app\n"
              "cli.main()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


def test_an_engine_that_refuses_the_settings_exits_2_and_leaves_no_record(tmp_path, src):
    def refusing_engine(job):
        raise FileNotFoundError(f"{job.model} has no *.safetensors weights")

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # and no weights
    app = build_app(make_engine=refusing_engine)
    out = tmp_path / "out"
    result = CLI.invoke(app, ["run", "-i", str(src), "-o", str(out), "-q", "--model", str(model)])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"batchgen: error: cannot start the engine: {model} has no *.safetensors weights"]
    assert not (out / "_job.json").exists()
    assert invoke("run", "-i", src, "-o", out, "-q").exit_code == 0  # the corrected command


@pytest.mark.parametrize("extra", [[], ["--data-parallel", "2"]])
def test_an_output_folder_that_cannot_be_written_exits_2(tmp_path, src, extra):
    (tmp_path / "afile").write_text("")
    result = invoke("run", "-i", src, "-o", tmp_path / "afile" / "sub", "-q", *extra)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"batchgen: error: cannot write to output {tmp_path / 'afile' / 'sub'}: Not a directory"]


@pytest.mark.parametrize("extra", [[], ["--data-parallel", "2"]])
def test_overwrite_is_refused_while_another_run_holds_the_folder(tmp_path, src, extra):
    from batchgen.job.lock import ShardLock
    out = tmp_path / "out"
    assert invoke("run", "-i", src, "-o", out, "-q", "--max-tokens", "8").exit_code == 0
    job_file = (out / "_job.json").read_text()
    with ShardLock(out, 0, 1):  # job A, still running
        result = invoke("run", "-i", src, "-o", out, "-q", "--max-tokens", "3", "--overwrite",
                        *extra)
    assert result.exit_code == 2, result.output
    assert "--overwrite:" in result.output and "in use by another run" in result.output
    assert (out / "_job.json").read_text() == job_file and len(list_parts(out)) == 1
