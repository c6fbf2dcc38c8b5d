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


@pytest.mark.parametrize("shard_from", ["array", "flag"])
def test_array_tasks_given_one_metrics_json_write_one_file_each(tmp_path, src, monkeypatch,
                                                                shard_from):
    """Every task of a Slurm array gets the same --metrics-json: none overwrites another's.
    The shard comes from the array (a plain `run` in each task) or from --shard (the scripts
    of `batchgen slurm`)."""
    out, metrics = tmp_path / "out", tmp_path / "m.json"
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    for task in ("0", "1"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        shard = ["--shard", f"{task}/2"] if shard_from == "flag" else []
        result = invoke("run", "-i", src, "-o", out, "--rows-per-part", "3", "-q",
                        "--metrics-json", metrics, *shard)
        assert result.exit_code == 0, result.output
    tasks = [json.loads((tmp_path / f"m.shard-{i}-of-2.json").read_text()) for i in range(2)]
    assert [(m["shard"], m["num_rows"]) for m in tasks] == [("0/2", 4), ("1/2", 3)]
    assert not metrics.exists()


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
    (["--set", "engine.dtype=16"], "dtype must be one of auto, float32"),
    (["--set", "engine.max_model_len=lots"], "engine.max_model_len must be an integer"),
    (["--template", ""], "the template is empty"),
    (["--set", "prompt.chat='false'"], "prompt.chat must be true or false, got str 'false'"),
    (["--set", "output.keep=id"], "output.keep must be a list of column names"),
    (["--set", "sampling.n=2"], "sampling.n=2 is not supported"),
    (["--set", "sampling.logprobs=1"], "sampling.logprobs is not supported"),
    (["--metrics-json", "."], "--metrics-json . is a folder"),
    (["--data-parallel", "0"], "--data-parallel must be at least 1, got 0"),
    (["--data-parallel", "-1"], "--data-parallel must be at least 1, got -1"),
    (["--keep", "nope"], "--keep: no input column(s) nope"),
    (["--set", "output.keep=[nope]"], "--set output.keep: no input column(s) nope"),
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


def test_a_stop_while_a_data_parallel_launch_reads_its_input_starts_no_worker(
        tmp_path, src, monkeypatch):
    import os
    import signal
    from batchgen.job import parallel, runner
    prepare, launched = runner.prepare_job, []

    def prepare_then_stop(job):  # scancel while the launcher reads a big input
        prepared = prepare(job)
        os.kill(os.getpid(), signal.SIGTERM)
        return prepared

    out = tmp_path / "out"
    assert invoke("run", "-i", src, "-o", out, "-q").exit_code == 0
    monkeypatch.setattr(runner, "prepare_job", prepare_then_stop)
    monkeypatch.setattr(parallel, "run_data_parallel", lambda *a, **k: launched.append(a) or 0)
    result = invoke("run", "-i", src, "-o", out, "-q", "--max-tokens", "3", "--overwrite",
                    "--data-parallel", "2")
    assert result.exit_code == 75, result.output
    assert launched == [] and len(list_parts(out)) == 1  # the old job put back, whole


# ---- regressions: every bad input is one line, exit 2, and loses nothing ---------------


def one_line_error(result, message):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("batchgen: error: "), result.output
    assert message in lines[0], lines[0]


def test_n_above_one_in_a_recipe_is_refused_not_reduced(tmp_path, src):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sampling: {n: 2, temperature: 0.8}\n")
    one_line_error(invoke("run", "-i", src, "-o", tmp_path / "out", "-r", recipe, "-q"),
                   "sampling.n=2 is not supported")
    assert not (tmp_path / "out").exists()


def test_unreadable_inputs_are_one_line_errors(tmp_path, src, monkeypatch):
    import gzip
    whole = gzip.compress(src.read_bytes())
    (tmp_path / "trunc.jsonl.gz").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "notgz.jsonl.gz").write_bytes(src.read_bytes())
    (tmp_path / "dir.jsonl").mkdir()
    out = tmp_path / "out"
    for path, extra, message in [
            ("trunc.jsonl.gz", [], "Compressed file ended"),
            ("notgz.jsonl.gz", [], "Not a gzipped file"),
            ("dir.jsonl", ["--input-format", "jsonl"], "dir.jsonl: Is a directory"),
            ("w/prompts", ["--input-format", "jsonl"], "input not found: w/prompts"),
            ("w/prompts", ["--input-format", "openai"], "input not found: w/prompts")]:
        monkeypatch.chdir(tmp_path)
        one_line_error(invoke("run", "-i", path, "-o", out, "-q", *extra), message)
    assert not out.exists()


@pytest.mark.parametrize("path, extra", [("samples/reviewz", []), ("./reviewz", []),
                                         ("./data/x", ["--input-format", "hf"])])
def test_a_mistyped_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch, path, extra):
    (tmp_path / "samples").mkdir()
    monkeypatch.chdir(tmp_path)
    import time
    start = time.monotonic()
    one_line_error(invoke("run", "-i", path, "-o", "out", "-q", *extra),
                   f"input not found: {path}")
    assert time.monotonic() - start < 10  # no network retries


def test_overwrite_refused_by_the_engine_loses_nothing(tmp_path, src):
    out = tmp_path / "out"
    assert invoke("run", "-i", src, "-o", out, "-q", "--rows-per-part", "3").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def refusing_engine(job):
        raise ValueError("max_model_len=999999 is longer than the model's")

    result = CLI.invoke(build_app(make_engine=refusing_engine), [
        "run", "-i", str(src), "-o", str(out), "-q", "--rows-per-part", "3", "--max-tokens",
        "3", "--max-model-len", "999999", "--overwrite"])
    one_line_error(result, "cannot start the engine: max_model_len=999999")
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {k: v for k, v in after.items() if not k.startswith("_lock")} == \
        {k: v for k, v in before.items() if not k.startswith("_lock")}
    assert not (out / "_overwritten").exists()
    # the accepted overwrite replaces the job and leaves nothing set aside
    result = invoke("run", "-i", src, "-o", out, "-q", "--max-tokens", "3", "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(list_parts(out)) == [0] and not (out / "_overwritten").exists()


def test_an_output_folder_inside_the_input_folder_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"prompt": ["a", "b"]}), tmp_path / "pq" / "in.parquet")
    one_line_error(invoke("run", "-i", tmp_path / "pq", "-o", tmp_path / "pq" / "out", "-q"),
                   "is inside the input folder")
    assert not (tmp_path / "pq" / "out").exists()
    assert invoke("run", "-i", tmp_path / "pq", "-o", tmp_path / "out", "-q").exit_code == 0


def test_a_bad_metrics_path_is_found_before_any_work(tmp_path, src):
    (tmp_path / "afile").write_text("")
    one_line_error(invoke("run", "-i", src, "-o", tmp_path / "out", "-q",
                          "--metrics-json", tmp_path / "afile" / "m.json"), "is not a folder")
    assert not (tmp_path / "out").exists()


def test_slurm_overwrite_clears_once_and_tasks_do_not_overwrite(tmp_path, src):
    out = tmp_path / "out"
    assert invoke("run", "-i", src, "-o", out, "-q", "--max-tokens", "8").exit_code == 0
    result = invoke("slurm", "-i", src, "-o", out, "--array", "2", "--max-tokens", "3",
                    "--overwrite")
    assert result.exit_code == 0, result.output
    assert "--overwrite" not in result.stdout
    assert not list_parts(out) and not (out / "_job.json").exists()
    assert list_parts(out / "_overwritten")  # set aside until a task's engine starts
    for shard in ("0/2", "1/2"):  # what each task runs (no --overwrite, no refusal)
        task = invoke("run", "-i", src, "-o", out, "-q", "--max-tokens", "3", "--shard", shard)
        assert task.exit_code == 0, task.output
    assert not (out / "_overwritten").exists() and sorted(list_parts(out)) == [0]


@pytest.mark.parametrize("recipe_text, flags", [
    ("prompt: {template: 'Say {{ prompt }}'}\n", ["--prompt-column", "text"]),
    ("prompt: {template: 'Say {{ prompt }}'}\n", ["--set", "input.prompt_column=text"]),
    ("input: {prompt_column: text}\n", ["--template", "Say {{ prompt }}"]),
    ("input: {prompt_column: text}\n", ["--set", "prompt.template=Say {{ prompt }}"]),
])
def test_a_prompt_source_from_flags_or_set_overrides_the_recipes(tmp_path, src, recipe_text,
                                                                 flags):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text)
    out = tmp_path / "out"
    result = invoke("run", "-i", src, "-o", out, "-r", recipe, "-q", "--format", "jsonl",
                    "--no-chat", *flags)
    assert result.exit_code == 0, result.output
    text = (out / "part-00000.jsonl").read_text()
    assert ("echo[Say p0]" in text) == ("template" in " ".join(flags))
    assert ("echo[t]" in text) == ("template" not in " ".join(flags))


def test_int_and_float_settings_are_the_same_job_and_a_change_is_named(tmp_path, src):
    out = tmp_path / "out"
    assert invoke("run", "-i", src, "-o", out, "-q", "--temperature", "0").exit_code == 0
    again = invoke("run", "-i", src, "-o", out, "-q", "--set", "sampling.temperature=0")
    assert again.exit_code == 0, again.output
    one_line_error(invoke("run", "-i", src, "-o", out, "-q", "--temperature", "0",
                          "--max-tokens", "5"), "(changed: max_tokens, sampling)")


def test_empty_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "empty.jsonl").write_text("")
    one_line_error(invoke("run", "-i", tmp_path / "empty.jsonl", "-o", tmp_path / "o1", "-q"),
                   "empty.jsonl has no rows")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    out = tmp_path / "o2"
    assert invoke("run", "-i", tmp_path / "empty.parquet", "-o", out, "-q").exit_code == 0
    for name in ("all.parquet", "all.jsonl"):
        result = invoke("export", out, tmp_path / name)
        assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "all.parquet").num_rows == 0
    assert (tmp_path / "all.jsonl").read_text() == ""


def test_keep_from_the_recipe_is_named_as_such(tmp_path, src):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output: {keep: [id]}\n")
    one_line_error(invoke("run", "-i", src, "-o", tmp_path / "out", "-r", recipe, "-q"),
                   f"recipe {recipe}: output.keep: no input column(s) id")


@pytest.mark.parametrize("args, ignored", [
    (["--template", "Say {{ prompt }}"], "--template would be ignored"),
    (["--prompt-column", "prompt", "--system", "Be brief"], "--prompt-column, --system would"),
    (["--no-chat"], "--chat/--no-chat would"),
    (["--keep", "custom_id"], "--keep would"),
    (["--set", "output.parse_json={score: number}"], "parse_json would"),
    (["--format", "parquet"], "so it would ignore format parquet"),
])
def test_options_an_openai_batch_job_would_ignore_are_refused(tmp_path, args, ignored):
    src = tmp_path / "batch.jsonl"
    src.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"messages": [{"role": "user", "content": "hi"}]}}) + "\n")
    recipe = ROOT / "recipes" / "openai_batch.yaml"
    # said (--input-format, the shipped recipe) or found from the lines (auto)
    hows = [["--input-format", "openai"], ["-r", recipe]]
    if "format parquet" not in ignored:  # auto: --format parquet is the default, not said
        hows.append([])
    for how in hows:
        one_line_error(invoke("run", "-i", src, "-o", tmp_path / "out", "-q", *how, *args),
                       ignored)
    assert not (tmp_path / "out").exists()
    result = invoke("run", "-i", src, "-o", tmp_path / "out", "-q", "-r", recipe, "--format", "jsonl")
    assert result.exit_code == 0, result.output


def test_status_verify_export_of_a_job_not_started_yet_say_so(tmp_path, src):
    out = tmp_path / "out"
    for command in (["status", out], ["verify", out], ["export", out, tmp_path / "all.jsonl"]):
        one_line_error(invoke(*command), f"{out} does not exist")
    # Slurm tasks not started yet: the script made _logs/, no engine has written _job.json
    assert invoke("slurm", "-i", src, "-o", out, "--array", "2").exit_code == 0
    for command in (["status", out, "--json"], ["verify", out], ["export", out, tmp_path / "a.jsonl"]):
        one_line_error(invoke(*command), f"{out}: no job has started yet (_job.json is written")
    # an --overwrite whose new job has not started its engine: the old job is only set aside
    assert invoke("run", "-i", src, "-o", out, "-q").exit_code == 0
    assert invoke("slurm", "-i", src, "-o", out, "--max-tokens", "3", "--overwrite").exit_code == 0
    for command in (["status", out], ["verify", out], ["export", out, tmp_path / "a.jsonl"]):
        one_line_error(invoke(*command), "set the previous job aside in _overwritten/")
    plain = tmp_path / "plain"
    plain.mkdir()
    one_line_error(invoke("status", plain), f"{plain} is not a batchgen output folder")
