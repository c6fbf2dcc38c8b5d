"""The `batchgen` command: run / status / verify / export / slurm.

Each command builds a config and calls one function. `run` and `slurm` share one list of job
options (cli_options.JOB_OPTIONS), declared once. Exit codes: 0 done (or nothing left to do),
1 internal error, 2 configuration error, 75 interrupted (re-run to resume).
"""
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from batchgen.cli_options import (FLAG_FIELDS, FLAG_OF, JOB_OPTIONS, SAMPLING_FLAGS, opt,
                                  with_options)
from batchgen.job.exit_codes import EXIT_CONFIG, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK


class ConfigError(Exception):
    """Printed on one line; exit code 2."""


def fail(message: str, code: int) -> None:
    typer.echo(f"batchgen: error: {message}", err=True)
    raise typer.Exit(code)


def parse_shard(value: Optional[str], env=os.environ) -> tuple[int, int]:
    if value is None:
        from batchgen.job.slurm import detect_slurm_shard
        try:
            detected = detect_slurm_shard(env)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return detected or (0, 1)
    index, sep, num = value.partition("/")
    try:
        i, n = int(index), int(num)
    except ValueError:
        raise ConfigError(f"--shard must be I/N, e.g. 0/4, got {value!r}") from None
    if not sep or n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard must be I/N with 0 <= I < N, got {value!r}")
    return i, n


def build_job(opts: dict[str, Any], *, need_output: bool = True):
    """Recipe, then --set, then the other flags -> JobConfig (raises on a mistake). Each
    layer overrides the one before, the prompt's source included: a prompt column given
    later replaces an earlier template, and the other way round."""
    from batchgen.job.config import JobConfig
    from batchgen.recipe import apply_overrides, load_recipe

    recipe = opts.get("recipe")
    fields: dict[str, Any] = load_recipe(recipe) if recipe else {}
    if "keep" in fields:
        fields["keep_source"] = f"recipe {recipe}: output.keep"
    overrides: dict[str, Any] = {}
    apply_overrides(overrides, opts.get("set_") or [])
    if "keep" in overrides:
        overrides["keep_source"] = "--set output.keep"
    _override(fields, overrides)
    flags: dict[str, Any] = {"sampling": {}}
    for name, field in FLAG_FIELDS.items():
        if opts.get(name) is not None and not (name == "overwrite" and not opts[name]):
            flags[field] = opts[name]
    for name in SAMPLING_FLAGS:
        if opts.get(name) is not None:
            flags["sampling"][name] = opts[name]
    if opts.get("keep") is not None:
        flags["keep"] = [c.strip() for c in opts["keep"].split(",") if c.strip()]
        flags["keep_source"] = "--keep"
    _override(fields, flags)
    sampling = dict(fields.pop("sampling", None) or {})
    if fields.get("input_format") == "openai":
        _check_openai_batch_options(fields)
    if not opts.get("input"):
        raise ConfigError("--input is required")
    if need_output and not opts.get("output"):
        raise ConfigError("--output is required")
    fields["shard_index"], fields["num_shards"] = parse_shard(opts.get("shard"))
    return JobConfig(input=opts["input"], output_dir=opts.get("output") or Path("."),
                     sampling=sampling, **fields)


_PROMPT_SOURCES = ("prompt_column", "template")


def _check_openai_batch_options(fields: dict[str, Any]) -> None:
    """An OpenAI batch job writes OpenAI batch output lines (JSONL). Checked on the merged
    options, not on JobConfig, whose `format` is parquet unless someone said otherwise: a
    `--format parquet` someone gave is refused. (The prompt options it would ignore are
    refused in prepare_job, which also sees an input found to be OpenAI batch lines.)"""
    if fields.get("format") not in (None, "jsonl"):
        raise ConfigError(f"an OpenAI batch input writes OpenAI batch output lines (JSONL), so "
                          f"it would ignore format {fields['format']}: leave it out")


def _override(fields: dict[str, Any], layer: dict[str, Any]) -> None:
    """`layer` over `fields` in place: sampling key by key; a prompt column or template in
    `layer` replaces both of `fields`' (giving both in one layer is still refused)."""
    if any(layer.get(name) is not None for name in _PROMPT_SOURCES):
        for name in _PROMPT_SOURCES:
            fields.pop(name, None)
    for key, value in layer.items():
        if key == "sampling":
            fields["sampling"] = {**(fields.get("sampling") or {}), **value}
        else:
            fields[key] = value


def _config_errors() -> tuple[type[BaseException], ...]:
    from batchgen.job.config import JobConfigError
    from batchgen.recipe import PromptTemplateError, RecipeError
    return (ConfigError, JobConfigError, RecipeError, PromptTemplateError)


def run_argv_from(opts: dict[str, Any], drop: tuple[str, ...] = ()) -> list[str]:
    """The `run` argv that reproduces `opts` (for data-parallel workers and Slurm tasks)."""
    argv: list[str] = []
    for param in JOB_OPTIONS:
        name, value = param.name, opts.get(param.name)
        if name in drop or value is None or (value is False and name != "chat"):
            continue
        flag = FLAG_OF[name]
        if name == "chat":
            argv.append("--chat" if value else "--no-chat")
        elif value is True:
            argv.append(flag)
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def build_app(make_engine: Optional[Callable] = None) -> typer.Typer:
    """The Typer app; tests pass a fake `make_engine` (default: the real LLM)."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, help=(
        "Run an LLM over a whole dataset: JSONL / Parquet / Hugging Face datasets / OpenAI "
        "batch files in, checkpointed output parts out; re-run the same command to resume. "
        "Exit codes: 0 done, 1 internal error, 2 configuration error, 75 interrupted."))

    @app.command(help="Run (or resume) a job over --input, writing parts into --output.")
    @with_options(JOB_OPTIONS + [opt(
        "data_parallel", Optional[int], ("--data-parallel",),
        "Run K engine processes on this machine (one per GPU), each a shard of the job.")])
    def run(**opts: Any) -> None:
        raise typer.Exit(_run(opts, make_engine))

    @app.command(help="Print an sbatch script running the job as a Slurm job array "
                      "(same job options as `run`).")
    @with_options(JOB_OPTIONS + [
        opt("array", int, ("--array",), "Number of array tasks (shards).", default=1),
        opt("gpus_per_task", int, ("--gpus-per-task",), "GPUs per task (0: CPU only).", default=1),
        opt("time", Optional[str], ("--time",), "Time limit per task, e.g. 04:00:00."),
        opt("partition", Optional[str], ("--partition",), "Slurm partition."),
        opt("account", Optional[str], ("--account",), "Slurm account."),
        opt("cpus_per_task", Optional[int], ("--cpus-per-task",), "CPUs per task."),
        opt("mem", Optional[str], ("--mem",), "Memory per task, e.g. 64G."),
        opt("job_name", str, ("--job-name",), "Slurm job name.", default="batchgen"),
        opt("script_out", Optional[Path], ("--script-out",), "Write the script here instead of printing it."),
    ])
    def slurm(**opts: Any) -> None:
        raise typer.Exit(_slurm(opts))

    @app.command(help="Show a job's progress: parts committed / total, rows, errors, throughput.")
    def status(output_dir: Annotated[Path, typer.Argument(help="The job's output folder.")],
               as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
        from batchgen.job.progress import print_status
        raise typer.Exit(_guard(lambda: print_status(output_dir, as_json=as_json)))

    @app.command(help="Check every committed part: readable, rows complete and unique, "
                      "gaps listed. Exit 0 only for a complete, intact job.")
    def verify(output_dir: Annotated[Path, typer.Argument(help="The job's output folder.")]) -> None:
        from batchgen.job.progress import print_verify
        raise typer.Exit(_guard(lambda: print_verify(output_dir)))

    @app.command(help="Write the committed parts as one file in input order (.jsonl or "
                      ".parquet; an OpenAI batch job gives the OpenAI batch output file).")
    def export(output_dir: Annotated[Path, typer.Argument(help="The job's output folder.")],
               file: Annotated[Path, typer.Argument(help="The file to write.")],
               partial: Annotated[bool, typer.Option(
                   "--partial", help="Export even if the job is not complete.")] = False) -> None:
        from batchgen.job.export import export_job
        raise typer.Exit(_guard(lambda: export_job(output_dir, file, allow_partial=partial)))

    return app


def _guard(fn: Callable[[], int]) -> int:
    try:
        return fn()
    except _config_errors() as e:
        typer.echo(f"batchgen: error: {e}", err=True)
        return EXIT_CONFIG


def _run(opts: dict[str, Any], make_engine: Optional[Callable]) -> int:
    from batchgen.job.signals import StopSignals

    # Caught from before the heavy imports to the end: a stop at any moment is a stop request
    # (exit 75, "resume me"), never a process killed mid-start.
    with StopSignals() as stop:
        return _run_with(opts, make_engine, stop)


def _run_with(opts: dict[str, Any], make_engine: Optional[Callable], stop) -> int:
    try:
        from batchgen.job.progress import ProgressReporter
        from batchgen.job.runner import default_make_engine, run_job

        job = build_job(opts)
        workers = opts.get("data_parallel")
        if workers is not None and workers < 1:
            raise ConfigError(f"--data-parallel must be at least 1, got {workers}")
        if workers is not None and workers > 1:
            if stop.reason is not None:
                return EXIT_INTERRUPTED
            return _run_data_parallel(opts, job, workers, stop)
        reporter = ProgressReporter(enabled=not opts.get("quiet"))
        metrics = run_job(job, make_engine=make_engine or default_make_engine, reporter=reporter,
                          stop=stop)
    except _config_errors() as e:
        typer.echo(f"batchgen: error: {e}", err=True)
        return EXIT_CONFIG
    except Exception as e:  # Ctrl-C is no KeyboardInterrupt here: StopSignals has it
        traceback.print_exc()
        typer.echo(f"batchgen: internal error: {type(e).__name__}: {e}", err=True)
        return EXIT_INTERNAL
    return metrics.exit_code


def _run_data_parallel(opts: dict[str, Any], job, workers: int, stop) -> int:
    from batchgen.job import checkpoint as ckpt
    from batchgen.job import overwrite
    from batchgen.job.parallel import run_data_parallel
    from batchgen.job.runner import prepare_job
    from batchgen.job.slurm import LOG_DIR_NAME

    if opts.get("shard") is not None:
        raise ConfigError("--data-parallel and --shard do not mix")
    # Checked (and --overwrite applied, or a killed one's leftovers settled, unless another
    # run holds a lock in the folder) once here, before the workers start, whose locks would
    # stop it; the first worker whose engine starts writes _job.json.
    prepared = prepare_job(job)
    # With --overwrite the old job is set aside: put back below if no worker's engine starts.
    note = overwrite.clear_or_recover(job.output_dir, prepared.record, is_overwrite=job.overwrite)
    if note is not None:
        typer.echo(note, err=True)
    ckpt.existing_job(job.output_dir, prepared.record)
    try:
        if stop.reason is not None:  # came while the input was read (seconds, for a big one)
            return EXIT_INTERRUPTED
        with ckpt.writing_to(job.output_dir):
            (job.output_dir / LOG_DIR_NAME).mkdir(parents=True, exist_ok=True)
        # The memory share goes to each worker as its own flag, split from the resolved value
        # (flag, recipe, --set or default alike), so the user's flag is not passed on as well.
        # Each worker writes its own metrics file; the launcher writes the job's total.
        argv = run_argv_from(opts, drop=("overwrite", "shard", "gpu_memory_utilization",
                                         "metrics_json"))
        return run_data_parallel(argv, workers, job.output_dir,
                                 gpu_memory_utilization=job.gpu_memory_utilization,
                                 metrics_json=job.metrics_json)
    finally:
        if job.overwrite:
            overwrite.finish_overwrite(job.output_dir)


def _slurm(opts: dict[str, Any]) -> int:
    from batchgen.job.checkpoint import writing_to
    from batchgen.job.slurm import LOG_DIR_NAME, render_sbatch_script
    try:
        if opts.get("shard") is not None:
            raise ConfigError("slurm: each array task picks its shard; drop --shard")
        job = build_job(dict(opts, shard="0/1"))
        if job.overwrite:
            _set_aside_for_overwrite(job)
        # Never --overwrite in a task: tasks that start together would refuse each other.
        script = render_sbatch_script(
            run_argv_from(opts, drop=("shard", "overwrite")), array=opts["array"],
            gpus_per_task=opts["gpus_per_task"], time=opts.get("time"),
            partition=opts.get("partition"), account=opts.get("account"),
            cpus_per_task=opts.get("cpus_per_task"), mem=opts.get("mem"),
            job_name=opts["job_name"], output_dir=job.output_dir)
        with writing_to(job.output_dir):
            (job.output_dir / LOG_DIR_NAME).mkdir(parents=True, exist_ok=True)
    except (ValueError, *_config_errors()) as e:
        typer.echo(f"batchgen: error: {e}", err=True)
        return EXIT_CONFIG
    if opts.get("script_out"):
        Path(opts["script_out"]).write_text(script, encoding="utf-8")
        typer.echo(f"wrote {opts['script_out']}; submit it with: sbatch {opts['script_out']}",
                   err=True)
    else:
        sys.stdout.write(script)
    return EXIT_OK


def _set_aside_for_overwrite(job) -> None:
    """`slurm --overwrite`: done once, here, as --data-parallel does. The old job waits in
    _overwritten/ until the first task's engine starts (then it is deleted), so tasks that
    refuse the settings lose nothing."""
    from batchgen.job import overwrite
    from batchgen.job.runner import prepare_job
    overwrite.clear_for_overwrite(job.output_dir, prepare_job(job).record)
    if (job.output_dir / overwrite.OVERWRITTEN_DIR).is_dir():
        typer.echo(f"batchgen: the old job in {job.output_dir} is set aside in "
                   f"{overwrite.OVERWRITTEN_DIR}/ until the first task starts its engine", err=True)


app = build_app()


def main() -> None:
    # SIGUSR1 is only ever a stop request here (Slurm's time-limit warning). `run` turns it
    # into one while it works; before that (parsing the command line) and after (the
    # interpreter shutting down, everything committed) its default action would kill the
    # process with exit 138, a failed task. SIG_IGN, because Python puts back the default
    # for its own handlers when it shuts down; the processes we start inherit it, and they
    # are batchgen workers (which catch it again) or Slurm's tools (which do not use it).
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        app()
    finally:
        # The command is over and its exit status decided (a run's work is committed): a
        # SIGTERM now, while the interpreter shuts down, would turn that status into 143, a
        # killed task. A shutdown that hangs can still be killed (Slurm follows with SIGKILL).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


if __name__ == "__main__":
    main()
