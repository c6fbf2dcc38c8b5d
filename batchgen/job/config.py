"""JobConfig: one dataset job (input, prompt, sampling, output, engine options); validates itself.

Every user mistake raises `JobConfigError` with one line naming what is wrong; the CLI
prints it and exits 2 before any work starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from batchgen.sampling_params import SamplingParams

INPUT_FORMATS = ("auto", "jsonl", "parquet", "hf", "openai")
OUTPUT_FORMATS = ("parquet", "jsonl")
PARSE_JSON_TYPES = ("string", "integer", "number", "boolean", "json")
DEVICES = ("cpu", "cuda")
# What EngineConfig accepts (batchgen.config, which imports torch: not needed to check this).
DTYPES = ("auto", "float32", "fp32", "float", "float16", "fp16", "half", "bfloat16", "bf16")
LOAD_FORMATS = ("auto", "dummy")
REMOTE_PREFIXES = ("s3://", "gs://", "gcs://", "az://", "abfs://", "hf://", "http://", "https://")
# Columns every part has; an input column with one of these names is written as input_<name>.
OUTPUT_COLUMNS = ("row", "text", "finish_reason", "prompt_tokens", "output_tokens", "error")
DEFAULT_MAX_TOKENS = 256


class JobConfigError(ValueError):
    """A configuration mistake: the CLI prints it on one line and exits 2."""


@dataclass
class JobConfig:
    input: str
    output_dir: Path
    model: str | None = None  # None: the default small model (SmolLM2-135M-Instruct)
    input_format: str = "auto"
    split: str = "train"  # of a Hugging Face dataset, or of a Parquet folder of several
    prompt_column: str | None = None  # None and no template: the column "prompt"
    template: str | None = None  # sandboxed Jinja over the row's fields
    system: str | None = None
    chat: bool | None = None  # None: the chat template when the model has one
    # SamplingParams fields the user set (recipe `sampling:` + flags); the model's
    # generation_config fills the rest. max_tokens defaults to DEFAULT_MAX_TOKENS.
    sampling: dict[str, Any] = field(default_factory=dict)
    seed: int = 0  # job seed: row i samples with a seed derived from (seed, i)
    rows_per_part: int = 1000
    format: str = "parquet"
    keep: list[str] | None = None  # input columns to keep; None: all
    keep_source: str = "--keep"  # where `keep` was given, for its error message
    parse_json: dict[str, str] | None = None  # generated JSON -> typed columns
    limit: int | None = None
    shard_index: int = 0
    num_shards: int = 1
    overwrite: bool = False
    metrics_json: Path | None = None
    # engine
    device: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float = 0.9  # lower it when workers share a GPU
    tokenizer: str | None = None  # None: the model's (a dummy-weights folder may have none)
    load_format: str = "auto"
    tensor_parallel_size: int = 1
    # seconds a stop signal waits for in-flight rows of completable parts
    stop_grace_s: float = 20.0

    def __post_init__(self) -> None:
        for name in _FIELD_TYPES:  # first: the checks below assume the types
            problem = field_type_error(name, getattr(self, name))
            if problem is not None:
                raise JobConfigError(f"{name} {problem}")
        self.output_dir = Path(self.output_dir)
        if self.metrics_json is not None:
            self.metrics_json = Path(self.metrics_json)
        self._validate_paths()
        self._validate_choices()
        self._validate_numbers()
        self._validate_prompt()
        try:
            self.sampling_params()
        except (ValueError, TypeError) as e:  # TypeError: e.g. a temperature given as text
            raise JobConfigError(str(e)) from None

    def _validate_paths(self) -> None:
        for what, value in (("input", self.input), ("output", str(self.output_dir)),
                            ("model", self.model or "")):
            if value.startswith(REMOTE_PREFIXES):
                raise JobConfigError(
                    f"{what} {value!r}: remote paths are not supported; copy it to a local path")
        if not os.path.exists(self.input) and not self._may_be_hub_id():
            raise JobConfigError(f"input not found: {self.input}")
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise JobConfigError(f"output {self.output_dir} exists and is not a folder")
        if os.path.isdir(self.input) and _is_within(self.output_dir, Path(self.input)):
            # A folder input is scanned for its files: it would read the job's own parts.
            raise JobConfigError(f"output {self.output_dir} is inside the input folder "
                                 f"{self.input}; put the output elsewhere")
        if self.metrics_json is not None:
            _check_metrics_path(self.metrics_json)

    def _may_be_hub_id(self) -> bool:
        """A missing input that may name a Hugging Face hub dataset: only where the format
        allows one, and never a path that is plainly local (`./x`, `/x`, `~/x`, or `dir/x`
        with `dir` here: a typo, to be reported at once rather than after network retries).
        `--input-format hf` still takes `dir/x` as an id: the user said so."""
        if self.input_format == "hf":
            return not self.input.startswith(_LOCAL_PREFIXES)
        return self.input_format == "auto" and _looks_like_hub_id(self.input) \
            and not os.path.exists(self.input.split("/")[0])

    def _validate_choices(self) -> None:
        for name, allowed in (("input_format", INPUT_FORMATS), ("format", OUTPUT_FORMATS),
                              ("load_format", LOAD_FORMATS)):
            if getattr(self, name) not in allowed:
                raise JobConfigError(f"{name} must be one of {', '.join(allowed)}, "
                                     f"got {getattr(self, name)!r}")
        if self.device is not None and self.device.split(":")[0] not in DEVICES:
            raise JobConfigError(f"device must be cpu or cuda, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise JobConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.tensor_parallel_size != 1:
            raise JobConfigError(
                f"tensor_parallel_size={self.tensor_parallel_size} is not supported: batchgen runs "
                "one engine per GPU (use --data-parallel or a Slurm array)")
        for name, kind in (self.parse_json or {}).items():
            if kind not in PARSE_JSON_TYPES:
                raise JobConfigError(f"parse_json column {name!r}: type must be one of "
                                     f"{', '.join(PARSE_JSON_TYPES)}, got {kind!r}")
            if name in OUTPUT_COLUMNS:
                raise JobConfigError(f"parse_json column {name!r} collides with an output column")

    def _validate_numbers(self) -> None:
        for name in ("rows_per_part", "num_shards"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise JobConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.gpu_memory_utilization, (int, float)) \
                or not 0 < self.gpu_memory_utilization <= 1:
            raise JobConfigError("gpu_memory_utilization must be in (0, 1], "
                                 f"got {self.gpu_memory_utilization!r}")
        for name in ("limit", "max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise JobConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not _is_int(self.shard_index) or not 0 <= self.shard_index < self.num_shards:
            raise JobConfigError(f"shard must be I/N with 0 <= I < N, "
                                 f"got {self.shard_index}/{self.num_shards}")
        if not _is_int(self.seed):
            raise JobConfigError(f"seed must be an integer, got {self.seed!r}")

    def _validate_prompt(self) -> None:
        if self.prompt_column is not None and self.template is not None:
            raise JobConfigError("give either a prompt column or a template, not both")
        if self.template is not None:
            if not self.template.strip():  # every row's prompt would be empty: all error rows
                raise JobConfigError("the template is empty")
            from batchgen.recipe import PromptTemplateError, compile_template
            try:
                compile_template(self.template)
            except PromptTemplateError as e:
                raise JobConfigError(str(e)) from None

    @property
    def is_openai_batch(self) -> bool:
        return self.input_format == "openai"

    @property
    def output_format(self) -> str:
        """OpenAI-batch jobs write OpenAI batch output lines (JSONL) whatever `format` says."""
        return "jsonl" if self.is_openai_batch else self.format

    def sampling_params(self) -> SamplingParams:
        """The user's sampling fields (max_tokens defaulted); seeds are set per row."""
        kwargs = dict(self.sampling)
        # One output row per input row, with no logprobs column: refused, never dropped.
        if kwargs.get("n", 1) != 1:
            raise JobConfigError(f"sampling.n={kwargs['n']!r} is not supported: a job writes "
                                 "one output per row (only n=1)")
        if kwargs.get("logprobs") is not None:
            raise JobConfigError("sampling.logprobs is not supported: the output parts have "
                                 "no logprobs column")
        kwargs.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
        kwargs.pop("seed", None)
        return SamplingParams(**kwargs)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


_TEXT, _FLAG, _INT, _NUMBER, _PATH = "a string", "true or false", "an integer", "a number", "a path"
# field -> (what it must be, whether None is allowed); recipes and --set give any YAML value.
_FIELD_TYPES: dict[str, tuple[str, bool]] = {
    "input": (_TEXT, False), "output_dir": (_PATH, False), "model": (_TEXT, True),
    "input_format": (_TEXT, False), "split": (_TEXT, False), "prompt_column": (_TEXT, True),
    "template": (_TEXT, True), "system": (_TEXT, True), "chat": (_FLAG, True),
    "sampling": ("a mapping", False), "seed": (_INT, False), "rows_per_part": (_INT, False),
    "format": (_TEXT, False), "keep": ("a list of column names", True),
    "parse_json": ("a mapping of column name to type", True), "limit": (_INT, True),
    "shard_index": (_INT, False), "num_shards": (_INT, False), "overwrite": (_FLAG, False),
    "metrics_json": (_PATH, True), "device": (_TEXT, True), "dtype": (_TEXT, False),
    "max_model_len": (_INT, True), "max_num_seqs": (_INT, True),
    "max_num_batched_tokens": (_INT, True), "gpu_memory_utilization": (_NUMBER, False),
    "tokenizer": (_TEXT, True), "load_format": (_TEXT, False),
    "tensor_parallel_size": (_INT, False), "stop_grace_s": (_NUMBER, False),
}


def field_type_error(name: str, value: Any) -> str | None:
    """'must be <kind>, got <value>' when `value` is of the wrong type for JobConfig field
    `name` (recipes name the key their own way); None when it is fine."""
    kind, is_optional = _FIELD_TYPES[name]
    if (value is None and is_optional) or _IS_KIND[kind](value):
        return None
    return f"must be {kind}, got {type(value).__name__} {value!r}"


_IS_KIND = {
    _TEXT: lambda v: isinstance(v, str),
    _FLAG: lambda v: isinstance(v, bool),
    _INT: lambda v: _is_int(v),
    _NUMBER: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    _PATH: lambda v: isinstance(v, (str, os.PathLike)),
    "a mapping": lambda v: isinstance(v, dict),
    "a list of column names": lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),
    "a mapping of column name to type": lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(t, str) for k, t in v.items()),
}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_within(path: Path, folder: Path) -> bool:
    path, folder = path.expanduser().resolve(), folder.expanduser().resolve()
    return path == folder or folder in path.parents


def _check_metrics_path(path: Path) -> None:
    """--metrics-json is written at the end of the run: a path it cannot take is found now,
    not after hours of work (where it would also hide an interrupted run's exit 75)."""
    if path.is_dir():
        raise JobConfigError(f"--metrics-json {path} is a folder; give a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise JobConfigError(f"--metrics-json {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise JobConfigError(f"--metrics-json {path}: {parent} is not writable")


_LOCAL_PREFIXES = ("./", "../", "/", "~")


def _looks_like_hub_id(path: str) -> bool:
    """`owner/name` with no such local path and no file suffix: a Hugging Face hub dataset id."""
    parts = path.split("/")
    return (len(parts) == 2 and all(parts) and not path.startswith((".", "~"))
            and not os.path.exists(path) and Path(parts[1]).suffix.lower() not in _FILE_SUFFIXES)


_FILE_SUFFIXES = {".jsonl", ".json", ".gz", ".parquet", ".arrow", ".csv", ".txt"}
